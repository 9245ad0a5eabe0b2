"""Operations on params trees: stacking, steering, and the trainable/frozen split.

A params tree is ``{module_path: {variant_name: {leaf: Tensor}}}``. Which leaves are trained is
declared once by each variant (``TRAINABLE``); ``trainable``, ``partition``, ``stack`` and
``unstack`` derive from that declaration.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import optree
import torch
from torch import Tensor

from . import variants

Params = dict[str, dict[str, dict[str, Tensor]]]


def _functorch_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


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
        return torch.stack([x.detach() for x in xs])
    return _declared(optree.tree_map(stack_leaf, *params_list))


def unstack(stacked: Params) -> list[Params]:
    """Inverse of ``stack``."""
    leaves = optree.tree_leaves(stacked)
    K = leaves[0].shape[0]
    return [_declared(optree.tree_map(lambda v: v[k].detach().clone(), stacked)) for k in range(K)]


def with_alpha(params: Params, alpha: float | Tensor) -> Params:
    """A copy of ``params`` with every steering leaf (AntiPaSTO's alpha) set to ``alpha``.

    ``alpha`` may be a finite float or a 0-d floating tensor (also a vmapped one: ``vmap(lambda a:
    lf.call(model, with_alpha(p, a), x))(alphas)`` sweeps in one call). Stacked params keep their
    leading axis. The returned tree is new at every level; leaves other than alpha are shared.
    """
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point() or alpha.ndim != 0:
            raise ValueError(f"with_alpha: alpha must be a finite number or a 0-d floating tensor, got a tensor of shape "
                             f"{tuple(alpha.shape)} dtype {alpha.dtype}; sweep several values with vmap over a 1-D tensor")
        if not torch.compiler.is_compiling() and not _functorch_wrapped(alpha) and not bool(torch.isfinite(alpha)):
            raise ValueError(f"with_alpha: alpha={alpha.item()} is not finite; pass a finite steering coefficient (e.g. 1.0)")
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"with_alpha: alpha={alpha!r} must be a finite number (e.g. 0.5) or a 0-d floating tensor")
    if not isinstance(params, dict):
        raise TypeError(f"with_alpha: params must be the dict returned by lf.init, got {type(params).__name__}")
    out, found = {}, False
    for path, by_variant in params.items():
        out[path] = {}
        for name, leaves in by_variant.items():
            leaves = dict(leaves)
            leaf = getattr(variants.get(name), "STEERING_LEAF", None)
            if leaf is not None and leaf in leaves:
                found = True
                old = leaves[leaf]
                a = alpha.to(old.dtype) if isinstance(alpha, Tensor) else torch.tensor(float(alpha), dtype=old.dtype)
                leaves[leaf] = torch.ones_like(old) * a
            out[path][name] = leaves
    if not found:
        raise ValueError("with_alpha: params contain no steerable variant (e.g. AntiPaSTO); nothing to set")
    return out


def is_trainable(variant_name: str, leaf: str) -> bool:
    """Whether ``leaf`` of a variant is trained: the variant's ``TRAINABLE`` declaration says so."""
    return leaf in variants.get(variant_name).TRAINABLE


def _declared(params: Params) -> Params:
    """``params`` with ``requires_grad`` set on each leaf from its variant's declaration (in place)."""
    for by_variant in params.values():
        for name, leaves in by_variant.items():
            for leaf, v in leaves.items():
                if v.is_floating_point() and v.is_leaf:
                    v.requires_grad_(is_trainable(name, leaf))
    return params


def trainable(params: Params) -> list[Tensor]:
    """The leaves an optimizer should see: those each variant declares trainable (``TRAINABLE``)."""
    return [v for by_variant in params.values() for name, leaves in by_variant.items()
            for leaf, v in leaves.items() if is_trainable(name, leaf)]


def partition(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two trees with the same paths, each holding its half of the leaves."""
    def split(keep):
        return {path: {name: {leaf: v for leaf, v in leaves.items() if is_trainable(name, leaf) == keep}
                       for name, leaves in by_variant.items()} for path, by_variant in params.items()}
    return split(True), split(False)


def combine(trainable_part: Params, frozen_part: Params) -> Params:
    """Inverse of ``partition`` (works on the gradient-tracking tensors torch.func.grad passes)."""
    out = {}
    for p in frozen_part.keys() | trainable_part.keys():
        out[p] = {}
        for n in frozen_part.get(p, {}).keys() | trainable_part.get(p, {}).keys():
            out[p][n] = {**frozen_part.get(p, {}).get(n, {}), **trainable_part.get(p, {}).get(n, {})}
    return out
