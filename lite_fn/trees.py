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


def stack(params_list: Sequence[Params], pad: bool = False) -> Params:
    """K param trees -> one tree with a leading axis K on every leaf (for ``vmap`` or ``route=``).

    Args:
        params_list: K params trees. Without ``pad`` they must have equal structure and leaf shapes.
        pad: also stack adapters of different ranks and different target sets, padded so that every
            adapter computes exactly what it computed alone:

            * rank: zero rank rows/columns — LoRA, EVA, DoRA (its norm ‖W + s·BA‖ is unchanged), PiSSA
              (A, B, A0, B0); DeLoRA with λ rescaled to λ·r'/r (its λ/r factor counts rows); AntiPaSTO
              with zero singular directions and identity blocks (equal block sizes only);
            * a layer an adapter does not target gets that variant's identity: LoRA-family zeros (the
              scale, DeLoRA's λ and norms taken from another adapter at that layer), IA3/IA3-FF g = 1,
              RoAd θ = 0, α = 1, AntiPaSTO another adapter's frozen U, S, V with δs = 0 and no rotation
              (the identity at any alpha, which stays the adapter's own);
            * RoAd layers of the same group size but different forms are lifted exactly to the larger
              form (road_1 → road_2 → road_4), and a missing AntiPaSTO rotation side is a zero rotation.

            Refused, naming the variant: HRA with different ranks or target sets (a reflection of a
            zero vector is undefined, and a pair of equal reflections is the identity only up to
            rounding), a DoRA layer missing from an adapter (its identity needs m = ‖W‖_row, the
            model's weights), different variants at one layer, and anything else that cannot be made
            equal exactly. Padded leaves keep trainability from each variant's ``TRAINABLE``.

    Returns:
        The stacked tree: every leaf of shape (K, ...), in the (union of) layers of the inputs.

    Raises:
        ValueError: trees that differ in structure or shapes (without ``pad``), or cannot be padded exactly.

    Example::

        stacked = lf.stack([lf.load_peft(d, model=model) for d in dirs], pad=True)
        logits = lf.call(model, stacked, ids, route=torch.arange(len(dirs)))
    """
    if not params_list:
        raise ValueError("lf.stack needs at least one params tree")
    if pad:
        params_list = _padded(list(params_list))
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


# ----------------------------------------------------------------------------- exact padding for stack(pad=True)
# Rank axis of each leaf that grows with r; a variant listed here pads by appending zeros on those axes.
_RANK_AXES = {
    "lora": {"A": 0, "B": 1}, "eva": {"A": 0, "B": 1}, "dora": {"A": 0, "B": 1}, "delora": {"A": 0, "B": 1},
    "pissa": {"A": 0, "B": 1, "A0": 0, "B0": 1},
    "antipasto": {"U": 1, "S": 0, "V": 1, "delta_s": 0, "rot_v": 0, "rot_u": 0},
}


def _grown(t: Tensor, size: int, axis: int) -> Tensor:
    """``t`` with zeros appended along ``axis`` up to ``size``."""
    t = t.detach()
    if t.shape[axis] == size:
        return t
    shape = list(t.shape)
    shape[axis] = size - t.shape[axis]
    return torch.cat([t, t.new_zeros(shape)], dim=axis)


def _refuse(name: str, path: str, why: str):
    raise ValueError(f"lf.stack(pad=True): cannot pad {name} at {path!r} exactly: {why}")


def _same_leaf_names(name: str, path: str, present: dict) -> None:
    names = {k: sorted(v) for k, v in present.items()}
    if len({tuple(v) for v in names.values()}) > 1:
        _refuse(name, path, f"the adapters hold different leaves there: {names}")


def _pad_lowrank(name, path, present, K, own):
    """LoRA/EVA/DoRA/PiSSA/DeLoRA: zero rank rows/columns; a missing layer is all-zero factors."""
    _same_leaf_names(name, path, present)
    axes = _RANK_AXES[name]
    R = max(leaves["A"].shape[0] for leaves in present.values())
    out = {}
    for k, leaves in present.items():
        new = {leaf: (_grown(v, R, axes[leaf]) if leaf in axes else v) for leaf, v in leaves.items()}
        if name == "delora" and leaves["A"].shape[0] != R:  # λ/r counts rows: keep λ/r, so λ' = λ·R/r
            new["lam"] = leaves["lam"].detach() * (R / leaves["A"].shape[0])
        out[k] = new
    missing = [k for k in range(K) if k not in present]
    if missing and name == "dora":
        _refuse(name, path, f"adapter(s) {missing} do not target it, and DoRA's identity there needs m = ‖W‖_row, "
                            f"which only the model's weights give; add a DoRA layer for it to those adapters first "
                            f"(lf.init(key, model, lf.DoRAConfig(...), targets=...) gives the identity m)")
    donor = out[min(present)]
    for k in missing:  # zero factors: the update is exactly 0 whatever the scale (taken from another adapter)
        out[k] = {leaf: (torch.zeros_like(v) if leaf in axes else v.detach().clone()) for leaf, v in donor.items()}
    return out


def _pad_gain(name, path, present, K, own):
    """IA3 / IA3-FF: a missing layer is g = 1."""
    _same_leaf_names(name, path, present)
    donor = present[min(present)]
    return {k: present[k] if k in present else {"g": torch.ones_like(donor["g"]).detach()} for k in range(K)}


def _pad_road(name, path, present, K, own):
    """RoAd: one group size; forms lifted exactly to the largest (road_1 → road_2 → road_4); missing: θ = 0, α = 1."""
    _same_leaf_names(name, path, present)
    groups = {k: (v["theta"].shape[0], v["theta"].shape[-1]) for k, v in present.items()}
    if len(set(groups.values())) > 1:
        _refuse(name, path, "the adapters use different group sizes there ("
                + ", ".join(f"adapter {k}: group_size={2 * h}" for k, (_, h) in groups.items())
                + "), which pair different output features")
    G, h = next(iter(groups.values()))
    ndim = max(v["theta"].ndim for v in present.values())
    rows = max(v["theta"].shape[1] for v in present.values() if v["theta"].ndim == 3) if ndim == 3 else 2

    def lift(t: Tensor) -> Tensor:
        t = t.detach()
        if t.ndim == 3 and t.shape[1] == 1 and (ndim == 4 or rows == 2):
            t = t.expand(G, 2, h)  # road_1 → road_2: the pair's (θ, α) for both halves
        if t.ndim == 3 and ndim == 4:
            t = t.unsqueeze(1).expand(G, 2, 2, h)  # road_2 → road_4: the same (θ, α) for c₁ and c₂
        return t.contiguous()

    out = {k: {leaf: lift(v) for leaf, v in leaves.items()} for k, leaves in present.items()}
    like = out[min(present)]["theta"]
    for k in range(K):
        if k not in out:
            out[k] = {"theta": torch.zeros_like(like), "alpha": torch.ones_like(like)}
    return out


def _pad_antipasto(name, path, present, K, own):
    """AntiPaSTO: zero singular directions in whole blocks of the common block size (identity rotations);
    a missing rotation side is a zero rotation; a missing layer is another adapter's U, S, V with δs = 0."""
    rots = sorted({leaf for v in present.values() for leaf in v if leaf in ("rot_v", "rot_u")})
    sizes = {}
    for k, v in present.items():
        r = v["S"].shape[0]
        sizes[k] = {r // v[rot].shape[0] for rot in rots if rot in v}
    if len({bs for s in sizes.values() for bs in s}) > 1:
        _refuse(name, path, f"the adapters use different rotation block sizes there ({sizes}); only equal block sizes "
                            f"pad with identity blocks")
    bs = next(iter(next(iter(sizes.values()))))
    R = max(v["S"].shape[0] for v in present.values())
    axes = _RANK_AXES[name]
    out = {}
    for k, leaves in present.items():
        leaves = dict(leaves)
        for rot in rots:  # zero rotation params: R = cayley(0) = I exactly
            if rot not in leaves:
                p = (leaves["S"].shape[0] // bs, bs * (bs - 1) // 2)
                leaves[rot] = leaves["S"].new_zeros(p)
        out[k] = {leaf: (_grown(v, R // bs if leaf in rots else R, axes[leaf]) if leaf in axes else v)
                  for leaf, v in leaves.items()}
    donor = out[min(present)]
    for k in range(K):
        if k in out:
            continue
        new = {}
        for leaf, v in donor.items():
            if leaf in ("U", "S", "V"):
                new[leaf] = v.detach().clone()
            elif leaf in ("alpha", "max_angle"):
                mine = own(k, name, leaf)  # the adapter's own steering value, if it has one elsewhere
                new[leaf] = (mine if mine is not None else v).detach().clone()
            else:
                new[leaf] = torch.zeros_like(v).detach()
        out[k] = new
    return out


def _pad_hra(name, path, present, K, own):
    _refuse(name, path, "HRA's reflections cannot be padded: a reflection of the zero vector is undefined "
                        "(I − 2uuᵀ/‖u‖² at u = 0), and a pair of equal reflections is the identity only up to rounding; "
                        "stack HRA adapters of equal r on equal target sets")


_PAD_RULES = {"lora": _pad_lowrank, "eva": _pad_lowrank, "dora": _pad_lowrank, "pissa": _pad_lowrank,
              "delora": _pad_lowrank, "ia3": _pad_gain, "ia3_ff": _pad_gain, "road": _pad_road,
              "antipasto": _pad_antipasto, "hra": _pad_hra}


def _padded(params_list: list[Params]) -> list[Params]:
    """The K trees made equal in structure and shapes, each computing exactly what it did (see ``stack``)."""
    K = len(params_list)
    paths: dict[str, None] = {}
    for i, p in enumerate(params_list):
        if not isinstance(p, dict):
            raise TypeError(f"lf.stack: params #{i} is a {type(p).__name__}, not a params dict")
        for path, bv in p.items():
            if not isinstance(bv, dict) or len(bv) != 1:
                raise ValueError(f"params #{i}[{path!r}] must hold exactly one variant, got "
                                 f"{list(bv) if isinstance(bv, dict) else type(bv).__name__}")
            paths.setdefault(path)

    def own(k: int, name: str, leaf: str):
        for bv in params_list[k].values():
            if name in bv and leaf in bv[name]:
                return bv[name][leaf]
        return None

    out: list[Params] = [{} for _ in range(K)]
    for path in paths:
        present = {k: p[path] for k, p in enumerate(params_list) if path in p}
        names = {k: next(iter(bv)) for k, bv in present.items()}
        if len(set(names.values())) > 1:
            raise ValueError(f"lf.stack(pad=True): layer {path!r} holds different variants across adapters "
                             f"({ {k: n for k, n in names.items()} }); padding keeps one variant per layer — stack "
                             f"adapters of one method per layer")
        name = next(iter(names.values()))
        leaves = {k: bv[name] for k, bv in present.items()}
        shapes = {k: {leaf: tuple(v.shape) for leaf, v in lv.items()} for k, lv in leaves.items()}
        if len(present) == K and all(s == shapes[0] for s in shapes.values()):
            padded = leaves
        elif name in _PAD_RULES:
            padded = _PAD_RULES[name](name, path, leaves, K, own)
        else:
            _refuse(name, path, f"the variant has no padding rule, and the adapters differ there (shapes {shapes}, "
                                f"present in adapters {sorted(present)} of {K})")
        after = {k: {leaf: tuple(v.shape) for leaf, v in padded[k].items()} for k in range(K)}
        if any(s != after[0] for s in after.values()):
            _refuse(name, path, f"its leaves differ in more than the rank: {after}")
        for k in range(K):
            out[k][path] = {name: padded[k]}
    return out


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
            leaf = variants.get(name).STEERING_LEAF
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
