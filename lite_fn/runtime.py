"""The model runtime: targeting, injection through functional_call, stacking, steering, merging.

Params at model level are plain nested dicts, ``params[module_path][variant_name][leaf]``.
Nothing here branches on a variant's name: a variant is looked up in the registry and used
through its ``init`` / ``apply`` (and, for data-driven ones, ``stat`` / ``plan``).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence

import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import _keys, _layers, variants

Params = dict[str, dict[str, dict[str, Tensor]]]

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
        paths = [p for p, m in modules.items() if _layers.is_adaptable(m) and m is not head and not _DEFAULT_EXCLUDE.search(p)]
        if not paths:
            raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D layers to adapt; pass `targets` explicitly")
        return paths
    patterns = [targets] if isinstance(targets, str) else list(targets)
    try:
        compiled = [re.compile(t) for t in patterns]
    except (re.error, TypeError) as e:
        raise ValueError(f"targets={targets!r} is not a regex or a list of regexes: {e}") from e
    paths = [p for p in modules if p and any(c.search(p) for c in compiled)]
    if not paths:
        linear = [p for p, m in modules.items() if _layers.is_adaptable(m)][:8]
        raise ValueError(f"targets={targets!r} matches no module of {type(model).__name__}; linear layers look like {linear}")
    for p in paths:
        _layers.weight_bias(modules[p], p)  # TypeError naming any non-linear match
    return paths


# ----------------------------------------------------------------------------- init
def init(key: _keys.Key, model: nn.Module, cfg, targets: str | Sequence[str] | None = None,
         calibration: Iterable | None = None, *, progress: bool = True, max_batches: int | None = None) -> Params:
    """Adapter params for every targeted layer: ``{path: {variant: {leaf: Tensor}}}``.

    Each layer's key is ``fold_in(key, path)``, so a layer's params do not depend on which
    other layers are targeted. Data-driven variants (EVA, AntiPaSTO with select="data") read
    ``calibration``, an iterable of model inputs (tensor, tuple, or kwargs dict), streamed once.
    """
    from . import calibration as calib

    mod = variants.module_for(cfg)
    modules = dict(model.named_modules())
    paths = target_paths(model, targets)
    weights = {p: _layers.weight_bias(modules[p], p)[0].detach() for p in paths}
    cfgs = {p: cfg for p in paths}

    stats = {}
    if hasattr(mod, "stat"):
        stats = {p: mod.stat(cfg, weights[p]) for p in paths}
        stats = {p: s for p, s in stats.items() if s is not None}
    if stats:
        if calibration is None:
            raise ValueError(f"{type(cfg).__name__} initialises from data: pass calibration=<iterable of model inputs> to lf.init")
        calib.collect(model, stats, calibration, progress=progress, max_batches=max_batches)
        if hasattr(mod, "plan"):
            cfgs = mod.plan(stats, cfgs)
    elif calibration is not None:  # never ignore data the caller thought was used
        raise ValueError(f"{cfg!r} does not use calibration data; drop calibration=… (or use a data-driven config, "
                         f"e.g. EVAConfig or AntiPaSTOConfig(select='data'))")

    out: Params = {}
    for p in paths:
        if cfgs.get(p) is None:  # a plan may give a layer no adapter (e.g. EVA rank 0)
            continue
        out[p] = {mod.NAME: mod.init(_keys.fold_in(key, p), weights[p], cfgs[p], stats.get(p))}
    return out


# ----------------------------------------------------------------------------- call
def _layer_entries(model: nn.Module, params: Params):
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict returned by lf.init ({{path: {{variant: {{leaf: Tensor}}}}}}), got {type(params).__name__}")
    entries = []
    for path, by_variant in params.items():
        try:
            module = model.get_submodule(path)  # per path: no walk over the whole model each call
        except AttributeError:
            near = [p for p, _ in model.named_modules() if p.split(".")[-1] == path.split(".")[-1]][:3]
            raise KeyError(f"params path {path!r} is not a module of {type(model).__name__}" + (f"; similar paths: {near}" if near else "")) from None
        if not isinstance(by_variant, dict) or len(by_variant) != 1:
            raise ValueError(f"params[{path!r}] must hold exactly one variant, got {list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}")
        (name, leaves), = by_variant.items()
        _layers.weight_bias(module, path)  # TypeError for an unsupported layer
        entries.append((path, module, variants.get(name), leaves))
    return entries


def _adapted_forward(path, module, mod, leaves, route):
    def forward(x, *args, **kwargs):
        if args or kwargs:
            raise TypeError(f"{path}: an adapted {type(module).__name__} takes one input tensor, got extra arguments")
        W, b = _layers.weight_bias(module, path)
        try:
            if route is None:
                return mod.apply(leaves, W, x, b)
            if x.shape[0] != route.shape[0]:
                raise ValueError(f"route has {route.shape[0]} entries but the input to {path} has batch size {x.shape[0]}; pass one adapter index per example")
            per_example = optree.tree_map(lambda v: v[route], leaves)
            return vmap(mod.apply, in_dims=(0, None, 0, None))(per_example, W, x, b)
        except RuntimeError as e:
            shapes = {k: tuple(v.shape) for k, v in leaves.items()}
            raise ValueError(f"params for {path!r} ({mod.NAME}, leaves {shapes}) do not fit its weight {tuple(W.shape)}: {e}") from e
    return forward


@contextlib.contextmanager
def _injected(entries, route):
    """Adapted forwards on the targeted modules for the duration of one call; always restored."""
    try:
        for path, module, mod, leaves in entries:
            module.forward = _adapted_forward(path, module, mod, leaves, route)
        yield
    finally:
        for _, module, _, _ in entries:
            module.__dict__.pop("forward", None)


def call(model: nn.Module, params: Params, *args, route: Tensor | None = None, freeze_base: bool = True, **kwargs):
    """``model(*args, **kwargs)`` with the adapters in ``params`` applied; the model is untouched.

    ``route`` (B,) int: a mixed batch where example i uses adapter ``route[i]`` of a stacked
    params set (``lf.stack``). ``freeze_base``: the base weights enter as detached tensors, so
    no gradient (and no backward work) goes to them.
    """
    entries = _layer_entries(model, params)
    if route is not None:
        route = torch.as_tensor(route)
        if route.ndim != 1 or route.is_floating_point():
            raise ValueError(f"route must be a 1-D integer tensor of adapter indices, got shape {tuple(route.shape)} dtype {route.dtype}")
    base = {n: (p.detach() if freeze_base else p) for n, p in model.named_parameters()}
    with _injected(entries, route):
        return functional_call(model, base, args, kwargs, tie_weights=True, strict=False)


# ----------------------------------------------------------------------------- trees
def stack(params_list: Sequence[Params]) -> Params:
    """K param trees of equal structure -> one tree with a leading axis K on every leaf."""
    if not params_list:
        raise ValueError("lf.stack needs at least one params tree")
    first = params_list[0]
    spec = optree.tree_structure(first)
    for i, p in enumerate(params_list[1:], 1):
        if optree.tree_structure(p) != spec:
            raise ValueError(f"params #{i} has a different structure than params #0 (paths/variants/leaves must match): {optree.tree_structure(p)} vs {spec}")
    def stack_leaf(*xs):
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack leaves of shapes {sorted(shapes)}; all adapters must have equal shapes (same r, same targets)")
        return torch.stack([x.detach() for x in xs]).requires_grad_(xs[0].requires_grad)
    return optree.tree_map(stack_leaf, *params_list)


def unstack(stacked: Params) -> list[Params]:
    """Inverse of ``stack``."""
    leaves = optree.tree_leaves(stacked)
    K = leaves[0].shape[0]
    return [optree.tree_map(lambda v: v[k].detach().requires_grad_(v.requires_grad), stacked) for k in range(K)]


def with_alpha(params: Params, alpha: float | Tensor) -> Params:
    """A copy of ``params`` with every steering leaf (AntiPaSTO's alpha) set to ``alpha``.

    ``alpha`` may be a float or a 0-d tensor (also a vmapped one: ``vmap(lambda a: lf.call(model,
    with_alpha(p, a), x))(alphas)`` sweeps in one call). Stacked params keep their leading axis.
    """
    out, found = {}, False
    for path, by_variant in params.items():
        out[path] = {}
        for name, leaves in by_variant.items():
            leaf = getattr(variants.get(name), "STEERING_LEAF", None)
            if leaf is not None:
                found = True
                old = leaves[leaf]
                a = alpha.to(old.dtype) if isinstance(alpha, Tensor) else torch.tensor(float(alpha), dtype=old.dtype)
                leaves = {**leaves, leaf: torch.ones_like(old) * a}
            out[path][name] = leaves
    if not found:
        raise ValueError("with_alpha: params contain no steerable variant (e.g. AntiPaSTO); nothing to set")
    return out


def trainable(params: Params) -> list[Tensor]:
    """The leaves an optimizer should see (``requires_grad=True``)."""
    return [v for v in optree.tree_leaves(params) if v.requires_grad]


def partition(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two trees with the same paths, each holding its half of the leaves."""
    def split(keep):
        return {p: {n: {k: v for k, v in leaves.items() if v.requires_grad == keep} for n, leaves in bv.items()} for p, bv in params.items()}
    return split(True), split(False)


def combine(trainable_part: Params, frozen_part: Params) -> Params:
    """Inverse of ``partition`` (works on the gradient-tracking tensors torch.func.grad passes)."""
    out = {}
    for p in frozen_part.keys() | trainable_part.keys():
        out[p] = {}
        for n in frozen_part.get(p, {}).keys() | trainable_part.get(p, {}).keys():
            out[p][n] = {**frozen_part.get(p, {}).get(n, {}), **trainable_part.get(p, {}).get(n, {})}
    return out


# ----------------------------------------------------------------------------- merge
@torch.no_grad()
def merge(model: nn.Module, params: Params) -> dict[str, Tensor]:
    """Dense weights (and biases) that reproduce ``call``: ``functional_call(model, merge(model, p), x)``.

    Keys are parameter names (``f"{path}.weight"``, ``f"{path}.bias"``), stored the way each
    module stores them (Conv1D transposed).
    """
    out = {}
    for path, module, mod, leaves in _layer_entries(model, params):
        W, b = _layers.weight_bias(module, path)
        W_new, b_new = variants.merge(mod, leaves, W.detach(), None if b is None else b.detach())
        out[f"{path}.weight"] = _layers.stored_weight(module, path, W_new)
        if b_new is not None:
            out[f"{path}.bias"] = b_new
    return out
