"""The model runtime: targeting, injection through functional_call, stacking, steering, merging.

Params at model level are plain nested dicts, ``params[module_path][variant_name][leaf]``.
Nothing here branches on a variant's name: a variant is looked up in the registry and used
through its ``init`` / ``apply`` (and, for data-driven ones, ``stat`` / ``plan``).
"""

from __future__ import annotations

import contextlib
import difflib
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import _base, _checks, _inject, _keys, _layers, linalg, variants
from ._contract import VariantSpec
from .calibration import collect as collect_statistics
from .trees import Params, _declared, tree_map

# Output heads and embedding-like names never targeted by default.
_DEFAULT_EXCLUDE = re.compile(r"(^|\.)(lm_head|embed_out|embed_tokens|wte|wpe|score|classifier|pooler\.dense|cls\..*)$")


# ----------------------------------------------------------------------------- targeting
def target_paths(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """Module paths that ``targets`` selects (regex search on ``named_modules()`` names).

    Args:
        model: any nn.Module.
        targets: a regex or a list of regexes searched in module paths; ``None``: every nn.Linear /
            Conv1D / quantized linear except output heads (``get_output_embeddings()`` and names like
            lm_head, score, classifier).
    Returns:
        The matching module paths, in ``named_modules()`` order.
    Raises:
        ValueError: a bad regex, or nothing matches (the message lists linear layers that exist).
        TypeError: a match is not a layer lite_fn can adapt (names the module and its type).

    Example:
        >>> import torch, lite_fn as lf
        >>> lf.target_paths(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
        ['0', '2']
    """
    modules = dict(model.named_modules())
    if targets is None:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        paths = [
            p
            for p, m in modules.items()
            if (_layers.is_adaptable(m) or isinstance(m, nn.Linear)) and m is not head and not _DEFAULT_EXCLUDE.search(p)
        ]
        if not paths:
            raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D layers to adapt; pass `targets` explicitly")
    else:
        paths = _match_targets(model, modules, targets)
    for p in paths:
        _layers.kind_of(modules[p], p)  # TypeError naming any layer lite_fn cannot adapt
    return paths


def _match_targets(model, modules, targets) -> list[str]:
    patterns = [targets] if isinstance(targets, str) else list(targets)
    try:
        compiled = [re.compile(t) for t in patterns]
    except (re.error, TypeError) as e:
        raise ValueError(f"targets={targets!r} is not a regex or a list of regexes: {e}") from e
    paths = [p for p in modules if p and any(c.search(p) for c in compiled)]
    if not paths:
        linear = [p for p, m in modules.items() if _layers.is_adaptable(m)][:8]
        raise ValueError(f"targets={targets!r} matches no module of {type(model).__name__}; linear layers look like {linear}")
    return paths


# ----------------------------------------------------------------------------- init
def init(
    key: _keys.Key,
    model: nn.Module,
    cfg,
    targets: str | Sequence[str] | None = None,
    calibration: Iterable | None = None,
    *,
    progress: bool | None = None,
    max_batches: int | None = None,
    base: Mapping[str, Tensor] | None = None,
) -> Params:
    """Adapter params for every targeted layer: ``{path: {variant: {leaf: Tensor}}}``.

    Each layer's key is ``fold_in(key, path)``, so a layer's params do not depend on which
    other layers are targeted. Trainable leaves (the variant's ``TRAINABLE``) have
    ``requires_grad=True``; every leaf is contiguous and has the weight's dtype and device.

    Args:
        key: an int seed (or a 0-d integer tensor); the same key gives bit-identical params.
        model: the model; it is never modified.
        cfg: a variant config, e.g. ``lf.LoRAConfig(r=8, alpha=16)``.
        targets: which layers (see ``target_paths``).
        calibration: for data-driven configs (EVA, AntiPaSTO with ``select="data"``): an iterable
            of model inputs (tensors, tuples or kwargs dicts), streamed once with fixed memory.
        progress: a calibration progress bar (tqdm) on stderr: None shows it on a terminal only, True
            always, False never.
        max_batches: read at most this many calibration batches (a positive int).
        base: the weights of a stateless model, ``{name: Tensor}`` (see ``call``).
    Returns:
        The params tree.
    Raises:
        ValueError / TypeError naming the bad config value, target, key, calibration input or
        ``base`` entry; calibration given to a config that does not use it is an error too.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.LoRAConfig(r=2, alpha=4), targets=r"^0$")
        >>> {k: tuple(v.shape) for k, v in params["0"]["lora"].items()}
        {'A': (2, 8), 'B': (8, 2), 'scale': ()}
    """
    variant = variants.module_for(cfg)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches <= 0):
        raise ValueError(f"max_batches={max_batches!r} must be a positive int (or None for all of the calibration data)")
    swap, _ = _base.swap_map(model, base, freeze=True)
    modules = dict(model.named_modules())
    paths = target_paths(model, targets)
    weights = {p: _layers.values(_layers.weight_view(modules[p], _layers.kind_of(modules[p], p), swap)).detach() for p in paths}
    meta = [p for p, W in weights.items() if W.is_meta]
    if meta:
        raise ValueError(
            f"the weights of {meta[:3]}{' …' if len(meta) > 3 else ''} are on the meta device (a skeleton or an "
            f"offloaded model): pass the weights with base={{name: tensor}} so init can read their values"
        )
    cfgs = {p: cfg for p in paths}

    stats = {}
    if variant.stat is not None:
        stats = {p: variant.stat(cfg, weights[p]) for p in paths}
        stats = {p: s for p, s in stats.items() if s is not None}
    if stats:
        if calibration is None:
            raise ValueError(
                f"{type(cfg).__name__} initialises from data: pass calibration=<iterable of model inputs> to lf.init"
            )
        collect_statistics(model, stats, calibration, progress=progress, max_batches=max_batches, base=base)
        if variant.plan is not None:
            cfgs = variant.plan(stats, cfgs, {p: tuple(W.shape) for p, W in weights.items()})
    elif calibration is not None:  # never ignore data the caller thought was used
        raise ValueError(
            f"{cfg!r} does not use calibration data; drop calibration=… (or use a data-driven config, "
            f"e.g. EVAConfig or AntiPaSTOConfig(select='data'))"
        )

    out: Params = {}
    for p in paths:
        if cfgs.get(p) is None:  # a plan may give a layer no adapter (e.g. EVA rank 0)
            continue
        leaves = variant.init(_keys.fold_in(key, p), weights[p], cfgs[p], stats.get(p))
        out[p] = {variant.NAME: {k: _contiguous(v) for k, v in leaves.items()}}
    return _declared(out)


def _contiguous(v: Tensor) -> Tensor:
    # a view (e.g. a transposed SVD factor) would save and reload with another layout, and give
    # outputs that differ in the last bit; every returned leaf owns contiguous memory
    return v if v.is_contiguous() else v.detach().contiguous().requires_grad_(v.requires_grad)


# ----------------------------------------------------------------------------- call
class _Entry(NamedTuple):
    path: str
    module: nn.Module
    kind: _layers.LayerKind
    variant: VariantSpec
    leaves: dict[str, Tensor]


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` through the registered children's dicts (the common case, a few
    dict lookups); anything else, and every error, goes through ``get_submodule`` itself."""
    m = model
    for part in path.split("."):
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if m is None:
            return model.get_submodule(path)
    return m


def _entries(
    model: nn.Module, params: Params, swap: dict[int, Tensor], aliases: dict[int, list[str]], batch_dims: int = 0
) -> tuple[list[_Entry], int | None]:
    """Every layer of ``params``, checked against the model (paths, layer types, ties, exact leaves)."""
    if not isinstance(params, dict):
        raise TypeError(
            f"params must be the dict returned by lf.init ({{path: {{variant: {{leaf: Tensor}}}}}}), got {type(params).__name__}"
        )
    entries, Ks = [], {}
    for path, by_variant in params.items():
        try:
            module = _submodule(model, path)  # per path: no walk over the whole model each call
        except AttributeError:
            near = difflib.get_close_matches(path, [p for p, _ in model.named_modules()], n=3)
            raise KeyError(
                f"params path {path!r} is not a module of {type(model).__name__}" + (f"; similar paths: {near}" if near else "")
            ) from None
        if not isinstance(by_variant, dict) or len(by_variant) != 1:
            raise ValueError(
                f"params[{path!r}] must hold exactly one variant, got {list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}"
            )
        ((name, leaves),) = by_variant.items()
        kind = _layers.kind_of(module, path)
        tied = [
            n
            for n in aliases.get(id(module.weight), [])
            if n.rsplit(".", 1)[0] != path and _layers.is_adaptable(model.get_submodule(n.rsplit(".", 1)[0]))
        ]
        if tied:
            raise ValueError(
                f"{path}.weight is tied to {tied} of another linear layer, so an adapter on {path!r} cannot be "
                f"told apart from it; untie them (give {path!r} its own weight) before adapting"
            )
        variant = variants.get(name)
        Ks[path] = _checks.check_leaves_once(
            f"params[{path!r}][{name!r}]", variant, leaves, _layers.weight_view(module, kind, swap), batch_dims
        )
        entries.append(_Entry(path, module, kind, variant, leaves))
    K = None
    if batch_dims:
        if len(set(Ks.values())) > 1:
            raise ValueError(
                f"stacked params hold different numbers of adapters per layer: {Ks}; stack whole params trees with lf.stack"
            )
        K = next(iter(Ks.values()), None)
    return entries, K


class _Plan(NamedTuple):
    """What ``_entries`` found for one params tree on one model, and what it read: weak references to
    each layer's module, weight and leaves with their metadata, so a later call can tell exactly
    whether anything it checked has changed (a leaf or module replaced, a weight cast or resized)."""

    rows: tuple  # (path, variant name, id(by-variant dict), id(leaves dict), module ref, kind, variant, weight ref, weight meta, leaf refs+meta)
    K: int | None


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], _Plan]] = weakref.WeakKeyDictionary()
_PLANS_PER_MODEL = 8


def _meta(t: Tensor) -> tuple:
    return (t.shape, t.dtype, t.device)


def _planned_entries(
    model: nn.Module, params: Params, swap: dict[int, Tensor], aliases: dict[int, list[str]], batch_dims: int = 0
) -> tuple[list[_Entry], int | None]:
    """``_entries``, remembered per (model, params tree): a call whose params and model still hold the
    very objects (and metadata) the last check read skips the checks; anything else is checked anew.
    Tied weights (``aliases``) are always checked anew."""
    if not isinstance(params, dict) or aliases or torch.compiler.is_compiling():
        return _entries(model, params, swap, aliases, batch_dims)
    replayed = _replayed(model, params, batch_dims)
    if replayed is not None:
        return replayed
    entries, K = _entries(model, params, swap, aliases, batch_dims)
    rows = []
    for e in entries:
        by_variant = params[e.path]
        w = e.module.weight
        if not isinstance(w, Tensor):
            return entries, K
        leaves = tuple((k, weakref.ref(v), _meta(v)) for k, v in e.leaves.items())
        rows.append(
            (
                e.path,
                e.variant.NAME,
                id(by_variant),
                id(e.leaves),
                weakref.ref(e.module),
                e.kind,
                e.variant,
                weakref.ref(w),
                _meta(w),
                leaves,
            )
        )
    plans = _PLANS.setdefault(model, {})
    if len(plans) >= _PLANS_PER_MODEL:
        plans.clear()
    plans[(id(params), batch_dims)] = _Plan(tuple(rows), K)
    return entries, K


def _replayed(model: nn.Module, params: Params, batch_dims: int) -> tuple[list[_Entry], int | None] | None:
    """The remembered entries of (model, params), if nothing they were checked on has changed."""
    plans = _PLANS.get(model) if isinstance(params, dict) and not torch.compiler.is_compiling() else None
    plan = None if plans is None else plans.get((id(params), batch_dims))
    if plan is None:
        return None
    entries = _replay(plan, model, params)
    return None if entries is None else (entries, plan.K)


def _replay(plan: _Plan, model: nn.Module, params: Params) -> list[_Entry] | None:
    if len(params) != len(plan.rows):
        return None
    entries = []
    for (path, name, bv_id, leaves_id, module_ref, kind, variant, w_ref, w_meta, leaves), (p, by_variant) in zip(
        plan.rows, params.items()
    ):
        if p != path or id(by_variant) != bv_id or len(by_variant) != 1 or variants.REGISTRY.get(name) is not variant:
            return None
        ((n, current),) = by_variant.items()
        if n != name or id(current) != leaves_id or len(current) != len(leaves):
            return None
        for (k, ref, meta), (k2, v) in zip(leaves, current.items()):
            if k != k2 or ref() is not v or _meta(v) != meta:
                return None
        try:
            module = _submodule(model, path)
        except AttributeError:  # gone: _entries names it
            return None
        w = getattr(module, "weight", None)
        if module is not module_ref() or w is not w_ref() or _meta(w) != w_meta:  # pyright: ignore[reportArgumentType]
            return None
        entries.append(_Entry(path, module, kind, variant, current))
    return entries


def _check_route(route, K: int | None) -> Tensor:
    if isinstance(route, (list, tuple)):
        route = torch.tensor(route)
    if not isinstance(route, Tensor):
        raise TypeError(f"route must be a 1-D integer tensor of adapter indices, got {type(route).__name__}")
    if route.dtype == torch.bool or route.is_floating_point() or route.is_complex() or route.ndim != 1:
        raise ValueError(
            f"route must be a 1-D integer tensor of adapter indices (one per example), got shape "
            f"{tuple(route.shape)} dtype {route.dtype}" + ("; a boolean mask is not a route" if route.dtype == torch.bool else "")
        )
    if K is None:
        raise ValueError("route= needs stacked params (lf.stack([...])) with a leading adapter axis")
    if route.numel() and linalg.eager_values(route):
        lo, hi = int(route.min()), int(route.max())
        if lo < 0 or hi >= K:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"route holds adapter index {bad}, but the stacked params hold {K} adapters; use indices in 0..{K - 1}"
            )
    return route


def _noise(seed: int | None, x: Tensor) -> Tensor | None:
    """Uniform noise for dropout, a pure function of (key, layer path, position) — see linalg.hash_uniform."""
    return None if seed is None else linalg.hash_uniform(seed, x.shape, device=x.device)


class _Segments(NamedTuple):
    """A route whose examples come in runs of equal length, one adapter per run (``torch.arange(K)
    .repeat_interleave(n)`` and the like): rows are viewed as (runs, n, ...) and each run meets its
    adapter's leaves directly — no per-example copy of any leaf. ``adapters`` is None when the runs
    are exactly adapters 0..K−1 in order (then not even a gather of the stack)."""

    adapters: Tensor | None
    per_run: int


def _segments(route: Tensor, K: int) -> _Segments | None:
    if route.numel() == 0 or not linalg.eager_values(route):
        return None  # data-dependent shapes: the per-example path, which compiles and vmaps
    adapters, counts = torch.unique_consecutive(route, return_counts=True)
    n = int(counts[0])
    if bool((counts != n).any()):
        return None
    in_order = adapters.numel() == K and bool((adapters == torch.arange(K, device=adapters.device)).all())
    return _Segments(None if in_order else adapters, n)


def _routed(
    path: str, variant: VariantSpec, leaves: dict[str, Tensor], route: Tensor, seed: int | None, segments: _Segments | None
) -> _inject.Handler:
    def handler(x, W, b, base):
        B, N = route.shape[0], x.shape[0] if x.ndim >= 2 else -1
        if N == B:
            xs = x
        elif N > 0 and N % B == 0:  # batch and sequence flattened before the layer: rows are example-major
            xs = x.reshape(B, N // B, *x.shape[1:])
        else:
            raise ValueError(
                f"route has {B} entries but the input to {path} has shape {tuple(x.shape)}; its leading dimension "
                f"must be the batch (or batch × sequence, example-major); pass one adapter index per example"
            )
        if isinstance(W, _layers.QuantizedWeight):  # the quantized kernel cannot run under vmap: one group per adapter
            y = _grouped(variant, leaves, route, xs, W, b, seed)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        noise = _noise(seed, xs)
        if segments is None:  # one copy of the leaves per example
            per, rows = tree_map(lambda v: v[route], leaves), xs
        else:  # one adapter per run of examples: the stacked leaves themselves (or one copy per run)
            runs = segments.adapters
            per = leaves if runs is None else tree_map(lambda v: v[runs], leaves)
            rows = xs.reshape(-1, segments.per_run, *xs.shape[1:])
            noise = None if noise is None else noise.reshape(rows.shape)
        if noise is None and segments is not None and variant.apply_runs is not None:
            y = variant.apply_runs(per, W, rows, b)
        elif noise is None:
            y = vmap(variant.apply, in_dims=(0, None, 0, None))(per, W, rows, b)
        else:
            y = vmap(variant.apply, in_dims=(0, None, 0, None, 0))(per, W, rows, b, noise)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return handler


def _grouped(
    variant: VariantSpec,
    leaves: dict[str, Tensor],
    route: Tensor,
    xs: Tensor,
    W: _layers.QuantizedWeight,
    b: Tensor | None,
    seed: int | None,
) -> Tensor:
    """Routed rows of a quantized layer: one ``apply`` per adapter present, on its own rows, with the
    layer's own output for those rows as the base product (its kernel cannot run under vmap)."""
    y = W._y  # the layer's output for its whole input, or None
    ys = None if y is None else y.reshape(*xs.shape[:-1], y.shape[-1])
    noise = _noise(seed, xs)
    out = None
    for k in torch.unique(route).tolist():
        index = (route == k).nonzero().squeeze(1)
        x_k = xs[index]
        W_k = _layers.QuantizedWeight(W.module, W.kind, x_k, None if ys is None else ys[index])
        extra = () if noise is None else (noise[index],)
        y_k = variant.apply(tree_map(lambda v: v[k], leaves), W_k, x_k, b, *extra)
        out = y_k.new_zeros((xs.shape[0], *y_k.shape[1:])) if out is None else out
        out = out.index_copy(0, index, y_k)
    assert out is not None  # a route has at least one entry
    return out


def _applying(
    entry: _Entry, route: Tensor | None, key, segments: _Segments | None = None, light: bool = False
) -> _inject.Handler:
    # dropout noise only for layers whose params carry a dropout rate; a pure function of (key, path, position)
    seed = None if key is None or "dropout" not in entry.leaves else _keys.fold_in(key, entry.path)
    if route is not None:
        return _routed(entry.path, entry.variant, entry.leaves, route, seed, segments)
    variant, leaves = entry.variant, entry.leaves
    if seed is None:
        return _rows(lambda x, W, b: variant.apply(leaves, W, x, b), entry.kind, light)
    return _rows(lambda x, W, b: variant.apply(leaves, W, x, b, _noise(seed, x)), entry.kind, light)


def _rows(
    apply: Callable[[Tensor, Tensor, Tensor | None], Tensor], kind: _layers.LayerKind, light: bool = False
) -> _inject.Handler:
    """A handler that gives ``apply`` a contiguous N-d input as its (rows, d_in) matrix and views the
    result back: the same values (a linear layer acts row by row; dropout noise is a function of the
    flat position), but the fresh layer output inside ``apply`` is then a plain matrix, which an
    adapter can accumulate into in place without autograd tracking a view. Module kinds and light
    modes (the module computed its output for its own input shape) get x as it is."""
    if kind.op is None or light:
        return lambda x, W, b, base: apply(x, W, b)

    def handler(x: Tensor, W: Tensor, b: Tensor | None, base) -> Tensor:
        if x.ndim > 2 and x.is_contiguous():
            y = apply(x.view(-1, x.shape[-1]), W, b)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return apply(x, W, b)

    return handler


def _prepared(entries: list[_Entry]) -> list[_Entry]:
    """Entries whose leaves went through their variant's ``prepare`` hook (once per variant, all its
    layers together); the caller's params are not touched."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        if e.variant.prepare is not None:
            groups.setdefault(id(e.variant), []).append(i)
    entries = list(entries)
    for idx in groups.values():
        prepare = entries[idx[0]].variant.prepare
        assert prepare is not None
        done = prepare({entries[i].path: entries[i].leaves for i in idx})
        paths = {entries[i].path for i in idx}
        if not isinstance(done, dict) or set(done) != paths:
            got = sorted(done) if isinstance(done, dict) else type(done).__name__
            raise ValueError(
                f"variant {entries[idx[0]].variant.NAME!r}: prepare() must return {{path: leaves}} for exactly the "
                f"layers it was given ({sorted(paths)[:4]}…), got {got}"
            )
        for i in idx:
            entries[i] = entries[i]._replace(leaves=done[entries[i].path])
    return entries


def _prepare(model, params, route, freeze_base, base, key=None, one_forward=True):
    batch_dims = 0 if route is None else 1
    # without gradient and base=, nothing is substituted unless a forward turns gradients on: a remembered plan
    # needs no walk over the model's weights now (the mode makes the detached copies if it ever needs them)
    replayed = _replayed(model, params, batch_dims) if base is None and route is None and not torch.is_grad_enabled() else None
    if replayed is not None:
        (entries, K), swap = replayed, None
    else:
        swap, aliases = _base.swap_map(model, base, freeze_base)
        entries, K = _planned_entries(model, params, swap, aliases, batch_dims)
    if route is not None:
        route = _check_route(route, K)
    if key is not None:
        _keys.as_seed(key)  # a clear error for a bad key
        if not any("dropout" in e.leaves for e in entries):
            raise ValueError(
                "key= turns on adapter dropout, but no layer of params has a dropout rate; build them with "
                "e.g. lf.LoRAConfig(r=8, dropout=0.1), or drop key="
            )
    if route is None and one_forward:  # derived leaves live for one forward: a block may see leaves change in place
        entries = _prepared(entries)
    segments = None if route is None or K is None else _segments(route, K)
    light = _light(swap, route, base, one_forward)
    layers = [
        _inject.Layer(e.path, e.module, e.kind, _applying(e, route, key, segments, light), _float_weight_dtype(e.module))
        for e in entries
    ]
    owner = "lf.call" if one_forward else "lf.applied"
    if not one_forward:  # a block trains only if the model is in training mode (generation runs in eval)
        trains = lambda: model.training and _any_requires_grad(entries)
    else:
        trains = lambda: _any_requires_grad(entries)
    own_weights = None if swap is not None else lambda: _base.swap_map(model, None, freeze_base)[0]
    return _inject.mode(
        layers,
        swap if swap is not None else {},
        freeze_base,
        detach_only=base is None,
        owner=owner,
        training=trains,
        model=model if light else None,
        own_weights=own_weights,
    )


def _light(swap: dict | None, route, base, one_forward: bool) -> bool:
    """Whether the adapters can act around the targeted layers' own module calls (one module hook per
    call) instead of through a mode that sees every op: nothing to substitute (no ``base=``; base weights
    detached only while autograd records, and then the mode is pushed for the model's calls), plain eager
    code (torch.compile and torch.func transforms trace the op-by-op mode), one adapter per layer."""
    if base is not None or route is not None or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():  # pyright: ignore[reportAttributeAccessIssue]
        return False
    return not (one_forward and swap and torch.is_grad_enabled())  # a training call: op by op from the start


def _float_weight_dtype(module: nn.Module) -> torch.dtype | None:
    w = getattr(module, "weight", None)
    return w.dtype if isinstance(w, Tensor) and w.is_floating_point() else None


def _any_requires_grad(entries: list[_Entry]) -> bool:
    return any(v.requires_grad for e in entries for v in e.leaves.values())


def _batch_of(args: tuple, kwargs: dict) -> tuple[str, int] | None:
    """(name, leading size) of the model's first tensor input: the batch a route must match."""
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.ndim:
            return f"args[{i}]", a.shape[0]
    for k, v in kwargs.items():
        if isinstance(v, Tensor) and v.ndim:
            return k, v.shape[0]
    return None


_VMAP_HINT = (
    "\n\nlite_fn: this model's forward cannot run under torch.func.vmap (above). To evaluate K stacked adapters "
    "without vmap, pass one adapter index per example: lf.call(model, stacked, x, route=route)"
)


def call(
    model: nn.Module,
    params: Params,
    *args,
    route: Tensor | None = None,
    freeze_base: bool = True,
    base: Mapping[str, Tensor] | None = None,
    key: _keys.Key | None = None,
    **kwargs,
):
    """``model(*args, **kwargs)`` with the adapters in ``params`` applied; the model is untouched.

    Nothing is assigned to the model: a per-thread TorchFunctionMode answers each targeted
    layer's product (see README, "How adapters reach the model"), so calls from many threads on
    one model, nested calls and other libraries' hooks are all exact.

    Args:
        model: the model.
        params: from ``init`` / ``load`` / ``stack`` (stacked params need ``route`` or a ``vmap``).
        *args, **kwargs: the model's own inputs.
        route: (B,) integer adapter indices, one per example of a stacked params set: a mixed
            batch (rows of inputs that flatten batch × sequence follow their example).
        freeze_base: the base weights enter detached, so no gradient goes to them.
        base: ``{name: Tensor}`` replacing the model's parameters and buffers (required for those
            on the meta device: a stateless skeleton), as ``torch.func.functional_call`` takes them.
        key: turns on adapter dropout (configs with ``dropout=p``); masks are a pure function of
            (key, layer path, position). No key, no dropout.
    Returns:
        What ``model(*args, **kwargs)`` returns.
    Raises:
        ValueError / TypeError / KeyError naming the path, leaf, expected and given shape, dtype, route
        index or ``base`` name; RuntimeError after the forward if a targeted layer was never
        computed through its recognised operation.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^0$")
        >>> x = torch.randn(3, 8)
        >>> torch.equal(lf.call(model, params, x), model(x))  # identity at init
        True
    """
    m = _prepare(model, params, route, freeze_base, base, key)
    if route is not None:
        batch = _batch_of(args, kwargs)
        if batch is not None and batch[1] != len(route) and linalg.eager_values(route):
            raise ValueError(
                f"route has {len(route)} entries but the batch ({batch[0]}) has {batch[1]} examples; lf.call takes one "
                f"adapter index per example (repeat them yourself, e.g. route.repeat_interleave(n), for n rows each)"
            )
    try:
        with m:
            out = model(*args, **kwargs)
    except RuntimeError as e:
        if ("vmap" in str(e) or "functorch" in str(e)) and _VMAP_HINT not in str(e):
            raise RuntimeError(f"{e}{_VMAP_HINT}") from e
        raise
    finally:
        _inject.close(m)
    missed = m.missed()
    if missed:
        raise _inject.missed_error(missed, "lf.call")
    return out


class Block:
    """What ``with lf.applied(...) as block:`` gives: ``block.bind(fn)`` is ``fn`` running inside the
    block's adapters on whatever thread calls it (a pool made before the block, a callback); once
    the block has ended, a targeted layer computed there raises."""

    def __init__(self, mode):
        self._mode = mode

    def bind(self, fn: Callable) -> Callable:
        """``fn`` bound to this block (and any call or block it is nested in)."""
        return _inject.bound(fn, self._mode)

    def __repr__(self) -> str:
        state = "ended" if self._mode.closed else "open"
        return f"<lf.applied block ({state}), {len(self._mode.layers)} layers>"


@contextlib.contextmanager
def applied(
    model: nn.Module,
    params: Params,
    *,
    route: Tensor | None = None,
    key: _keys.Key | None = None,
    freeze_base: bool = True,
    base: Mapping[str, Tensor] | None = None,
) -> Iterator[Block]:
    """Every forward of ``model`` inside the block, on this thread, is adapted as ``call`` adapts one.

    So ``model.generate``, pipelines and evaluation harnesses run with adapters. Same guarantees
    as ``call``: nothing is assigned to the model, other threads see the plain model, blocks nest.

    Args:
        model, params, freeze_base, base, key: as in ``call``.
        route: as in ``call``; it follows the batch through generation: an input of N = B·n rows
            (beams, or batch × sequence flattened) uses each entry for n consecutive rows.
    Raises:
        As ``call``; at the end of the block, a RuntimeError if some targeted layers were computed
        and others never were.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^2$")
        >>> x = torch.randn(3, 8)
        >>> with lf.applied(model, params):
        ...     y = model(x)  # any code that calls the model
        >>> torch.equal(y, lf.call(model, params, x))
        True
    """
    # no prepare hooks here: the block runs many forwards, and leaves may change in place between them
    m = _prepare(model, params, route, freeze_base, base, key, one_forward=False)
    try:
        with m:
            yield Block(m)
    finally:
        _inject.close(m)
    missed = m.missed()
    if m.hit and missed:
        raise _inject.missed_error(missed, "lf.applied")


# ----------------------------------------------------------------------------- merge
@torch.no_grad()
def merge(model: nn.Module, params: Params, *, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Dense weights (and biases) that reproduce ``call``: ``functional_call(model, merge(model, p), x)``.

    One exact rule for every variant (each is affine in x). For quantized layers the result is
    dense (dequantized weight + adapter); quantizing it again changes outputs.

    Args:
        model, params: as in ``call`` (unstacked params).
        base: the weights of a stateless model (see ``call``).
    Returns:
        ``{f"{path}.weight": W', f"{path}.bias": b'}`` for each adapted layer, stored the way the
        module stores them (Conv1D transposed); biases only where the variant changes them.
    Raises:
        ValueError: a targeted weight tied to another parameter (``functional_call`` would replace
        both), or leaves that do not fit their layer.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.IA3Config(), targets=r"^0$")
        >>> sorted(lf.merge(model, params))
        ['0.bias', '0.weight']
    """
    swap, aliases = _base.swap_map(model, base, freeze=True)
    out = {}
    for path, module, kind, variant, leaves in _entries(model, params, swap, aliases)[0]:
        names = aliases.get(id(module.weight), [])
        if len(names) > 1:
            raise ValueError(
                f"{path}.weight is tied to {[n for n in names if n != path + '.weight']}: a merged "
                f"{path}.weight passed to functional_call would replace those too. Untie it first "
                f"(model.{path}.weight = nn.Parameter(model.{path}.weight.clone())) or use lf.call"
            )
        W = _layers.values(_layers.weight_view(module, kind, swap))
        bias: Tensor | None = getattr(module, "bias", None)
        b = None if bias is None else swap.get(id(bias), bias).detach()
        W_new, b_new = variants.merge(variant, leaves, W.detach(), b)
        out[f"{path}.weight"] = kind.store(W_new)
        if b_new is not None:
            out[f"{path}.bias"] = b_new
    return out
