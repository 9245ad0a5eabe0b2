"""The model runtime: targeting, injection through functional_call, stacking, steering, merging.

Params at model level are plain nested dicts, ``params[module_path][variant_name][leaf]``.
Nothing here branches on a variant's name: a variant is looked up in the registry and used
through its ``init`` / ``apply`` (and, for data-driven ones, ``stat`` / ``plan``).
"""
from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import NamedTuple

import optree
import torch
from torch import Tensor, nn
from torch.func import vmap

from . import _checks, _inject, _keys, _layers, linalg, variants
from .trees import Params, _declared, _functorch_wrapped


# Output heads and embedding-like names never targeted by default.
_DEFAULT_EXCLUDE = re.compile(r"(^|\.)(lm_head|embed_out|embed_tokens|wte|wpe|score|classifier|pooler\.dense|cls\..*)$")


# ----------------------------------------------------------------------------- targeting
def target_paths(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """Module paths that ``targets`` selects (regex search on ``named_modules()`` names).

    ``targets=None``: every nn.Linear / Conv1D except output heads (the module returned by
    ``get_output_embeddings()`` and names like lm_head, score, classifier).
    """
    modules = dict(model.named_modules())
    if targets is None:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        paths = [p for p, m in modules.items() if (_layers.is_adaptable(m) or isinstance(m, nn.Linear)) and m is not head
                 and not _DEFAULT_EXCLUDE.search(p)]
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


# ----------------------------------------------------------------------------- base weights
def _base_swap(model: nn.Module, base, freeze: bool) -> tuple[dict[int, Tensor], dict[int, list[str]]]:
    """(swap, aliases): ``swap`` maps id(model tensor) -> the tensor a forward should use (the
    detached weight when ``freeze``, or ``base[name]`` for a stateless model); ``aliases`` maps
    id(parameter) -> every name it has (tied weights have several)."""
    aliases: dict[int, list[str]] = {}
    owners: dict[int, Tensor] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    if base is not None:
        named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        aliases.setdefault(id(t), []).append(name)
        owners[id(t)] = t
    swap: dict[int, Tensor] = {}
    if base is None:
        if freeze:
            swap = {i: t.detach() for i, t in owners.items() if t.requires_grad and not t.is_meta}
        return swap, aliases
    if not isinstance(base, Mapping):
        raise TypeError(f"base must be a dict {{parameter or buffer name: Tensor}} (as torch.func.functional_call takes), got {type(base).__name__}")
    known = {n for names in aliases.values() for n in names}
    extra = sorted(set(base) - known)
    if extra:
        hints = {n: difflib.get_close_matches(str(n), known, n=1) for n in extra[:5]}
        raise ValueError(f"base has names that are not parameters or buffers of {type(model).__name__}: "
                         + ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items()))
    missing = []
    for i, names in aliases.items():
        t = owners[i]
        given = [n for n in names if n in base]
        if not given:
            if t.is_meta:
                missing.append(names[0])
            elif freeze and t.requires_grad:
                swap[i] = t.detach()
            continue
        value = base[given[0]]
        for n in given[1:]:
            if base[n] is not value:
                raise ValueError(f"base[{given[0]!r}] and base[{n!r}] are different tensors, but the model ties them (one "
                                 f"parameter); pass one of the two names")
        if not isinstance(value, Tensor):
            raise TypeError(f"base[{given[0]!r}] is a {type(value).__name__}; pass a Tensor")
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"base[{given[0]!r}] has shape {tuple(value.shape)} but the model's {given[0]!r} has shape "
                             f"{tuple(t.shape)}")
        swap[i] = value.detach() if freeze else value
    if missing:
        raise ValueError(f"base is missing {len(missing)} tensors that the model holds on the meta device: {missing[:6]}"
                         f"{' …' if len(missing) > 6 else ''}. Non-persistent buffers (e.g. rotary inv_freq) are not in a state_dict: add "
                         f"them, e.g. from a real model's named_buffers(). A tied weight (e.g. lm_head.weight) is missing when "
                         f"the skeleton lost its ties: `.to('meta')` unties them; call skeleton.tie_weights() or build the "
                         f"skeleton under `with torch.device('meta'):`")
    return swap, aliases


def _current(module: nn.Module, kind: _layers.LayerKind, swap: dict[int, Tensor]) -> Tensor:
    """The module's weight as (d_out, d_in), with ``base=`` / detaching applied; for a quantized
    (module) kind, a ``QuantizedWeight`` (shape, dtype, device; values on demand)."""
    if kind.op is None:
        return _layers.QuantizedWeight(module, kind)  # type: ignore[return-value]
    w = module.weight
    return kind.dense(swap.get(id(w), w))


def _values(W) -> Tensor:
    """Dense values of a weight (dequantized for quantized layers): what init and merge read."""
    return W.dense() if isinstance(W, _layers.QuantizedWeight) else W


# ----------------------------------------------------------------------------- init
def init(key: _keys.Key, model: nn.Module, cfg, targets: str | Sequence[str] | None = None,
         calibration: Iterable | None = None, *, progress: bool = True, max_batches: int | None = None,
         base: Mapping[str, Tensor] | None = None) -> Params:
    """Adapter params for every targeted layer: ``{path: {variant: {leaf: Tensor}}}``.

    Each layer's key is ``fold_in(key, path)``, so a layer's params do not depend on which
    other layers are targeted. Data-driven variants (EVA, AntiPaSTO with select="data") read
    ``calibration``, an iterable of model inputs (tensor, tuple, or kwargs dict), streamed once
    (at most ``max_batches`` batches; ``progress`` shows a bar). ``base``: the weights of a
    stateless model (see ``call``).
    """
    from . import calibration as calib

    variant = variants.module_for(cfg)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches <= 0):
        raise ValueError(f"max_batches={max_batches!r} must be a positive int (or None for all of the calibration data)")
    swap, _ = _base_swap(model, base, freeze=True)
    modules = dict(model.named_modules())
    paths = target_paths(model, targets)
    weights = {p: _values(_current(modules[p], _layers.kind_of(modules[p], p), swap)).detach() for p in paths}
    meta = [p for p, W in weights.items() if W.is_meta]
    if meta:
        raise ValueError(f"the weights of {meta[:3]}{' …' if len(meta) > 3 else ''} are on the meta device (a skeleton or an "
                         f"offloaded model): pass the weights with base={{name: tensor}} so init can read their values")
    cfgs = {p: cfg for p in paths}

    stats = {}
    if variant.stat is not None:
        stats = {p: variant.stat(cfg, weights[p]) for p in paths}
        stats = {p: s for p, s in stats.items() if s is not None}
    if stats:
        if calibration is None:
            raise ValueError(f"{type(cfg).__name__} initialises from data: pass calibration=<iterable of model inputs> to lf.init")
        calib.collect(model, stats, calibration, progress=progress, max_batches=max_batches, base=base)
        if variant.plan is not None:
            cfgs = variant.plan(stats, cfgs, {p: tuple(W.shape) for p, W in weights.items()})
    elif calibration is not None:  # never ignore data the caller thought was used
        raise ValueError(f"{cfg!r} does not use calibration data; drop calibration=… (or use a data-driven config, "
                         f"e.g. EVAConfig or AntiPaSTOConfig(select='data'))")

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
    variant: ModuleType
    leaves: dict[str, Tensor]


def _entries(model: nn.Module, params: Params, swap: dict[int, Tensor], aliases: dict[int, list[str]],
             batch_dims: int = 0) -> tuple[list[_Entry], int | None]:
    """Every layer of ``params``, checked against the model (paths, layer types, ties, exact leaves)."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict returned by lf.init ({{path: {{variant: {{leaf: Tensor}}}}}}), got {type(params).__name__}")
    entries, Ks = [], {}
    for path, by_variant in params.items():
        try:
            module = model.get_submodule(path)  # per path: no walk over the whole model each call
        except AttributeError:
            near = difflib.get_close_matches(path, [p for p, _ in model.named_modules()], n=3)
            raise KeyError(f"params path {path!r} is not a module of {type(model).__name__}" + (f"; similar paths: {near}" if near else "")) from None
        if not isinstance(by_variant, dict) or len(by_variant) != 1:
            raise ValueError(f"params[{path!r}] must hold exactly one variant, got {list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}")
        (name, leaves), = by_variant.items()
        kind = _layers.kind_of(module, path)
        tied = [n for n in aliases.get(id(module.weight), []) if n.rsplit(".", 1)[0] != path
                and _layers.is_adaptable(model.get_submodule(n.rsplit(".", 1)[0]))]
        if tied:
            raise ValueError(f"{path}.weight is tied to {tied} of another linear layer, so an adapter on {path!r} cannot be "
                             f"told apart from it; untie them (give {path!r} its own weight) before adapting")
        variant = variants.get(name)
        Ks[path] = _checks.check_leaves(f"params[{path!r}][{name!r}]", variant, leaves, _current(module, kind, swap), batch_dims)
        entries.append(_Entry(path, module, kind, variant, leaves))
    K = None
    if batch_dims:
        if len(set(Ks.values())) > 1:
            raise ValueError(f"stacked params hold different numbers of adapters per layer: {Ks}; stack whole params trees with lf.stack")
        K = next(iter(Ks.values()), None)
    return entries, K


def _check_route(route, K: int | None) -> Tensor:
    if isinstance(route, (list, tuple)):
        route = torch.tensor(route)
    if not isinstance(route, Tensor):
        raise TypeError(f"route must be a 1-D integer tensor of adapter indices, got {type(route).__name__}")
    if route.dtype == torch.bool or route.is_floating_point() or route.is_complex() or route.ndim != 1:
        raise ValueError(f"route must be a 1-D integer tensor of adapter indices (one per example), got shape "
                         f"{tuple(route.shape)} dtype {route.dtype}" + ("; a boolean mask is not a route" if route.dtype == torch.bool else ""))
    if K is None:
        raise ValueError("route= needs stacked params (lf.stack([...])) with a leading adapter axis")
    if route.numel() and not torch.compiler.is_compiling() and not _functorch_wrapped(route):
        lo, hi = int(route.min()), int(route.max())
        if lo < 0 or hi >= K:
            bad = lo if lo < 0 else hi
            raise ValueError(f"route holds adapter index {bad}, but the stacked params hold {K} adapters; use indices in 0..{K - 1}")
    return route


def _noise(seed: int | None, x: Tensor) -> Tensor | None:
    """Uniform noise for dropout, a pure function of (key, layer path, position) — see linalg.hash_uniform."""
    return None if seed is None else linalg.hash_uniform(seed, x.shape, device=x.device)


def _routed(path: str, variant: ModuleType, leaves: dict[str, Tensor], route: Tensor, seed: int | None) -> _inject.Handler:
    def handler(x, W, b, base):
        B, N = route.shape[0], x.shape[0] if x.ndim >= 2 else -1
        if N == B:
            xs = x
        elif N > 0 and N % B == 0:  # batch and sequence flattened before the layer: rows are example-major
            xs = x.reshape(B, N // B, *x.shape[1:])
        else:
            raise ValueError(f"route has {B} entries but the input to {path} has shape {tuple(x.shape)}; its leading dimension "
                             f"must be the batch (or batch × sequence, example-major); pass one adapter index per example")
        if isinstance(W, _layers.QuantizedWeight):  # the quantized kernel cannot run under vmap: one group per adapter
            y = _grouped(variant, leaves, route, xs, W, b, seed)
            return y if xs is x else y.reshape(N, *y.shape[2:])
        per_example = optree.tree_map(lambda v: v[route], leaves)
        if seed is None:
            y = vmap(variant.apply, in_dims=(0, None, 0, None))(per_example, W, xs, b)
        else:
            noise = _noise(seed, xs)
            y = vmap(variant.apply, in_dims=(0, None, 0, None, 0))(per_example, W, xs, b, noise)
        return y if xs is x else y.reshape(N, *y.shape[2:])
    return handler


def _grouped(variant: ModuleType, leaves: dict[str, Tensor], route: Tensor, xs: Tensor, W: _layers.QuantizedWeight,
             b: Tensor | None, seed: int | None) -> Tensor:
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
        y_k = variant.apply(optree.tree_map(lambda v: v[k], leaves), W_k, x_k, b, *extra)
        out = y_k.new_zeros((xs.shape[0], *y_k.shape[1:])) if out is None else out
        out = out.index_copy(0, index, y_k)
    return out


def _applying(entry: _Entry, route: Tensor | None, key) -> _inject.Handler:
    # dropout noise only for layers whose params carry a dropout rate; a pure function of (key, path, position)
    seed = None if key is None or "dropout" not in entry.leaves else _keys.fold_in(key, entry.path)
    if route is not None:
        return _routed(entry.path, entry.variant, entry.leaves, route, seed)
    variant, leaves = entry.variant, entry.leaves
    if seed is None:
        return lambda x, W, b, base: variant.apply(leaves, W, x, b)
    return lambda x, W, b, base: variant.apply(leaves, W, x, b, _noise(seed, x))


def _prepare(model, params, route, freeze_base, base, key=None):
    swap, aliases = _base_swap(model, base, freeze_base)
    entries, K = _entries(model, params, swap, aliases, batch_dims=0 if route is None else 1)
    if route is not None:
        route = _check_route(route, K)
    if key is not None:
        _keys.as_seed(key)  # a clear error for a bad key
        if not any("dropout" in e.leaves for e in entries):
            raise ValueError("key= turns on adapter dropout, but no layer of params has a dropout rate; build them with "
                             "e.g. lf.LoRAConfig(r=8, dropout=0.1), or drop key=")
    layers = [_inject.Layer(e.path, e.module, e.kind, _applying(e, route, key)) for e in entries]
    return _inject.mode(layers, swap, freeze_base)


_VMAP_HINT = ("\n\nlite_fn: this model's forward cannot run under torch.func.vmap (above). To evaluate K stacked adapters "
              "without vmap, pass one adapter index per example: lf.call(model, stacked, x, route=route)")


def call(model: nn.Module, params: Params, *args, route: Tensor | None = None, freeze_base: bool = True,
         base: Mapping[str, Tensor] | None = None, key: _keys.Key | None = None, **kwargs):
    """``model(*args, **kwargs)`` with the adapters in ``params`` applied; the model is untouched.

    ``route`` (B,) int: a mixed batch where example i uses adapter ``route[i]`` of a stacked
    params set (``lf.stack``). ``freeze_base``: the base weights enter as detached tensors, so
    no gradient (and no backward work) goes to them. ``base``: ``{name: Tensor}`` for every
    parameter and buffer the model holds on the meta device (a stateless skeleton), as
    ``torch.func.functional_call`` takes them; given names replace the model's own tensors.
    ``key``: turns on adapter dropout (configs with ``dropout=p``); the masks are a pure function of
    (key, layer path, position), so a call is reproducible under vmap, grad and compile. No key,
    no dropout.
    """
    m = _prepare(model, params, route, freeze_base, base, key)
    try:
        with m:
            out = model(*args, **kwargs)
    except RuntimeError as e:
        if ("vmap" in str(e) or "functorch" in str(e)) and _VMAP_HINT not in str(e):
            raise RuntimeError(f"{e}{_VMAP_HINT}") from e
        raise
    missed = m.missed()
    if missed:
        raise _inject.missed_error(missed, "lf.call")
    return out


@contextlib.contextmanager
def applied(model: nn.Module, params: Params, *, route: Tensor | None = None, key: _keys.Key | None = None,
            freeze_base: bool = True, base: Mapping[str, Tensor] | None = None) -> Iterator[None]:
    """Every forward of ``model`` inside the block, on this thread, is adapted as ``call`` adapts one.

    So ``model.generate``, pipelines and evaluation harnesses run with adapters. Same guarantees
    as ``call``: nothing is assigned to the model, other threads see the plain model, blocks nest.
    ``route`` rows follow the batch through generation: an input with N = B·n rows (beams, or
    batch × sequence flattened) uses ``route`` repeated n times, example-major. ``key``: adapter
    dropout, as in ``call``.
    """
    m = _prepare(model, params, route, freeze_base, base, key)
    with m:
        yield
    missed = m.missed()
    if m.hit and missed:
        raise _inject.missed_error(missed, "lf.applied")


# ----------------------------------------------------------------------------- merge
@torch.no_grad()
def merge(model: nn.Module, params: Params, *, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Dense weights (and biases) that reproduce ``call``: ``functional_call(model, merge(model, p), x)``.

    Keys are parameter names (``f"{path}.weight"``, ``f"{path}.bias"``), stored the way each
    module stores them (Conv1D transposed). A targeted weight tied to another parameter (e.g. a
    tied ``lm_head``) is refused: ``functional_call`` would replace both.
    """
    swap, aliases = _base_swap(model, base, freeze=True)
    out = {}
    for path, module, kind, variant, leaves in _entries(model, params, swap, aliases)[0]:
        names = aliases.get(id(module.weight), [])
        if len(names) > 1:
            raise ValueError(f"{path}.weight is tied to {[n for n in names if n != path + '.weight']}: a merged "
                             f"{path}.weight passed to functional_call would replace those too. Untie it first "
                             f"(model.{path}.weight = nn.Parameter(model.{path}.weight.clone())) or use lf.call")
        W = _values(_current(module, kind, swap))
        b = getattr(module, "bias", None)
        b = None if b is None else swap.get(id(b), b).detach()
        W_new, b_new = variants.merge(variant, leaves, W.detach(), b)
        out[f"{path}.weight"] = kind.store(W_new)
        if b_new is not None:
            out[f"{path}.bias"] = b_new
    return out
