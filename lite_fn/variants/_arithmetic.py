"""Adapter arithmetic: the ``MERGE`` rules (``lite_fn._contract.MergeRule``) that variants declare, for
``lite_fn.merging.merge_adapters`` (peft's ``add_weighted_adapter``; its arguments, transforms and deviations
from peft are described there).

n adapters, weights w = (w_1 … w_n). Each layer is merged over the adapters that target it; an adapter that
does not target a layer holds its identity there (a zero low-rank update, a gain of 1).

LOWRANK (lora, eva) — leaves A (r, d_in), B (d_out, r), scale s, LoRA's forward y = x Wᵀ + b + s·(x Aᵀ) Bᵀ —
with task vectors ΔW_i = s_i B_i A_i. Every method gives s = 1 (peft: lora_alpha = r):

    cat        A = [w_1 s_1 A_1; …; w_n s_n A_n]  (Σ r_i, d_in),   B = [B_1 … B_n]  (d_out, Σ r_i)
               BA = Σ w_i ΔW_i exactly, for weights of any sign (task-vector negation, scaling).
    linear     a_i = sgn(w_i s_i) √|w_i s_i|,  b_i = √|w_i s_i|   (sgn 0 = +1; the sign goes on A only)
               A = Σ a_i A_i,  B = Σ b_i B_i   (equal ranks)
               BA = Σ_i w_i ΔW_i + Σ_{i≠j} b_i a_j B_i A_j: peft's "rough approximation", exact only without
               the cross terms — for one adapter (w·ΔW: one task vector negated or scaled, what peft does for
               n = 1 whatever the method) or adapters whose A's or B's are mutually orthogonal. For an exact
               weighted sum with negative weights use "cat" (exact, rank Σ r_i) or "svd" (best rank k).
    ties, dare_linear, dare_ties, magnitude_prune
               the same a_i, b_i, with Σ replaced by that combiner (below), run on the A's and on the B's apart.
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
               D = combiner(ΔW_1 … ΔW_n; w) (svd: D = Σ w_i ΔW_i), D = U Σ Vᵀ, k = min(svd_rank, d_out, d_in):
               B = U_k Σ_k, A = V_kᵀ — the best rank-k approximation of D (Eckart–Young); svd_rank defaults to
               the largest rank of any input layer. svd_clamp = q: c = the q-quantile of the entries of B and A
               together (linear interpolation); both are clamped to [−c, c].
    A lora_bias leaf ``bias`` is refused: peft's add_weighted_adapter combines lora_A / lora_B only and leaves the
    merged adapter's lora_B.bias at its zero init — the adapters' biases are dropped, which lite_fn will not do
    silently (remove the leaves first to get peft's result).

Combiners of task tensors T_i of one shape with weights v_i (torch ops; the masks never depend on v):

    linear            Σ v_i T_i                                                     (task arithmetic)
    magnitude_prune   Σ v_i trim(T_i),  trim(T) keeps the k = ⌊density·numel(T)⌋ entries of largest |·|
    ties              TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim T̂_i = trim(T_i); elect the sign
                      γ = sgn Σ_i T̂_i  ("total") or sgn Σ_i sgn T̂_i  ("frequency"), sgn 0 = +1 — on the
                      unweighted T̂_i, as peft; disjoint merge  Σ_i v_i T̂_i [sgn T̂_i = γ] / max(1, Σ_i [sgn T̂_i = γ])
    dare_linear       DARE (Yu et al. 2024, arXiv 2311.03099): drop and rescale T̃_i = m_i ⊙ T_i / density,
                      m_i ~ Bernoulli(density) entrywise (``keep_mask``);  Σ v_i T̃_i
    dare_ties         T̃_i, then ties' elect and disjoint merge

GAIN (ia3, ia3_ff) — leaf g ((IA)³ on either side): g = Σ w_i g_i (peft's IA3 add_weighted_adapter), "linear" only;
an adapter that does not target the layer counts with g_i = 1.

The leaves' math runs in at least float32 (no half-precision SVD) and in the weights' dtype; the results are cast
back to the first present adapter's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import _keys, linalg
from .._contract import Leaves, MergeOptions, MergePresent, MergeRule

__all__ = ["COMBINERS", "GAIN", "LOWRANK", "METHODS", "keep_mask"]

COMBINERS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
METHODS += ("magnitude_prune", "magnitude_prune_svd")
_WHO = "merge_adapters"


def keep_mask(key: _keys.Key, path: str, index: int, part: str, shape: Sequence[int], density: float, device=None) -> Tensor:
    """DARE's keep mask for adapter ``index``'s tensor ``part`` at layer ``path``: entries kept with probability
    ``density``, a pure function of its arguments (the same under vmap, grad and on every device).

    Args:
        key: the key given to ``merge_adapters``.
        path: the layer's module path; index: the adapter's position in the list.
        part: "A" or "B" (the factors, for dare_linear / dare_ties) or "delta" (ΔW_i, for the *_svd methods).
        shape: the tensor's shape; density: the keep probability; device: where the mask is built.

    Returns:
        A boolean tensor m of ``shape``: m = u < density, u = ``linalg.hash_uniform(fold_in(key, …), shape)``.

    Example:
        >>> import torch
        >>> from lite_fn.merging import keep_mask
        >>> m = keep_mask(0, "model.layers.0.q_proj", 1, "A", (64, 64), 0.25)
        >>> m.dtype, abs(m.float().mean().item() - 0.25) < 0.02  # about a quarter of the entries kept
        (torch.bool, True)
        >>> torch.equal(m, keep_mask(0, "model.layers.0.q_proj", 1, "A", (64, 64), 0.25))  # a pure function
        True
    """
    u = linalg.hash_uniform(_keys.fold_in(key, f"dare|{path}|{index}|{part}"), tuple(shape), device=device)
    return u < density


# ----------------------------------------------------------------------------- checks shared by the rules
def _check_leaves(
    path: str, name: str, present: MergePresent, kind: str, ndim: Mapping[str, int], required: frozenset[str]
) -> None:
    """Every present adapter holds the ``required`` leaves (and only leaves in ``ndim``), unstacked."""
    for i, leaves in present:
        where = f"adapters[{i}][{path!r}][{name!r}]"
        if not required <= leaves.keys() <= ndim.keys():
            raise ValueError(
                f"{_WHO}: {where} has leaves {sorted(leaves)}; {kind} leaves are {sorted(required)} "
                f"(optional: {sorted(ndim.keys() - required)})"
            )
        got = {k: v.ndim for k, v in leaves.items()}
        want = {k: ndim[k] for k in leaves}
        if got == want:
            continue
        if all(got[k] == want[k] + 1 for k in got) and len({v.shape[0] for v in leaves.values()}) == 1:
            K = next(iter(leaves.values())).shape[0]
            raise ValueError(
                f"{_WHO}: {where} is stacked (a leading axis of {K} adapters, from lf.stack); merge unstacked trees: "
                f"merge_adapters(lf.unstack(stacked), weights)"
            )
        raise ValueError(f"{_WHO}: {where} has leaves of {got} dimensions; {kind} leaves have {want}")


def _compute_dtype(dtype: torch.dtype, floor: torch.dtype) -> torch.dtype:
    """The dtype the leaves' math runs in: at least float32 (no half-precision SVD), and the weights' dtype."""
    return torch.promote_types(torch.promote_types(dtype, torch.float32), floor)


# ----------------------------------------------------------------------------- low-rank leaves (A, B, scale)
_LOWRANK_NDIM = {"A": 2, "B": 2, "scale": 0, "dropout": 0}
_LOWRANK_LEAVES = frozenset({"A", "B", "scale"})


def _lowrank_check(path: str, name: str, present: MergePresent) -> None:
    for i, leaves in present:
        if "bias" in leaves:
            raise ValueError(
                f"{_WHO}: adapters[{i}][{path!r}][{name!r}] has a lora_bias leaf 'bias'; peft's add_weighted_adapter "
                f"combines lora_A / lora_B only and leaves the merged lora_B.bias at its zero init (the biases are "
                f"dropped), so lite_fn refuses rather than drop them silently. For peft's result remove the leaves "
                f"first ({{k: v for k, v in leaves.items() if k != 'bias'}})"
            )
    _check_leaves(path, name, present, "low-rank", _LOWRANK_NDIM, _LOWRANK_LEAVES)
    dims = {i: (lv["B"].shape[0], lv["A"].shape[1]) for i, lv in present}
    for i, lv in present:
        if lv["B"].shape[1] != lv["A"].shape[0]:
            raise ValueError(
                f"{_WHO}: adapters[{i}][{path!r}][{name!r}] has A {tuple(lv['A'].shape)} and B {tuple(lv['B'].shape)}; "
                f"B's columns must equal A's rows (the rank)"
            )
    if len(set(dims.values())) > 1:
        raise ValueError(f"{_WHO}: layer {path!r} has (d_out, d_in) {dims} across the adapters; merge adapters of one model")


def _lowrank(path: str, present: MergePresent, w: Tensor, opts: MergeOptions) -> Leaves:
    first = present[0][1]
    dtype, device = first["A"].dtype, first["A"].device
    ct = _compute_dtype(dtype, opts.floor)
    idx = [i for i, _ in present]
    wi = w.to(device)[idx]  # (k,) the weights of the adapters at this layer
    s = torch.stack([lv["scale"] for _, lv in present]).to(device=device, dtype=torch.promote_types(wi.dtype, dtype))
    As = [lv["A"].to(ct) for _, lv in present]
    Bs = [lv["B"].to(ct) for _, lv in present]
    if opts.method == "cat":
        ws = (wi * s).to(ct)
        A = torch.cat([a * ws[j] for j, a in enumerate(As)])  # (Σ r, d_in)
        B = torch.cat(Bs, dim=1)  # (d_out, Σ r)
    elif opts.svd:
        deltas = [(b @ a) * lv["scale"].to(ct) for a, b, (_, lv) in zip(As, Bs, present)]  # ΔW_i, (d_out, d_in)
        D = _combine(deltas, wi.to(ct), opts, path, "delta", idx)
        A, B = _truncated_svd(D, opts, path)
    else:
        ranks = {i: a.shape[0] for i, a in zip(idx, As)}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"{_WHO}: method={opts.method!r} adds the factors, which needs one rank at layer {path!r}; the ranks "
                f"are {ranks} — use method='cat' (exact, rank Σ r) or 'svd' (rank svd_rank)"
            )
        ws = wi * s
        root = ws.abs().sqrt()
        A = _combine(As, torch.where(ws >= 0, root, -root).to(ct), opts, path, "A", idx)
        B = _combine(Bs, root.to(ct), opts, path, "B", idx)
    out = {"A": A.to(dtype), "B": B.to(dtype), "scale": torch.ones((), dtype=dtype, device=device)}
    return {**out, **{k: v for k, v in first.items() if k not in out}}  # dropout: the first adapter's


def _truncated_svd(D: Tensor, opts: MergeOptions, path: str) -> tuple[Tensor, Tensor]:
    """(A, B) = (V_kᵀ, U_k Σ_k) of D, clamped at the svd_clamp quantile."""
    if opts.driver is not None and D.device.type != "cuda":
        raise ValueError(
            f"{_WHO}: svd_driver={opts.driver!r} selects a cuSOLVER driver, for CUDA tensors only; layer {path!r} is on "
            f"{D.device}: leave svd_driver=None"
        )
    U, S, Vh = torch.linalg.svd(D, full_matrices=opts.full_matrices, driver=opts.driver)
    k = min(opts.rank, *D.shape)
    B, A = U[:, :k] * S[:k], Vh[:k].clone()  # U_k diag(Σ_k): the columns scaled (== U_k @ diag(Σ_k))
    if opts.clamp is not None:
        c = _quantile(torch.cat([B.flatten(), A.flatten()]), opts.clamp)
        B, A = (torch.minimum(torch.maximum(t, -c), c) for t in (B, A))  # torch.clamp's order: max first
    return A, B


def _quantile(x: Tensor, q: float) -> Tensor:
    """torch.quantile(x, q) (linear interpolation) of a 1-D x, by a sort: it has a vmap batching rule."""
    s = torch.sort(x).values
    pos = q * (x.shape[0] - 1)
    lo = math.floor(pos)
    return torch.lerp(s[lo], s[min(lo + 1, x.shape[0] - 1)], pos - lo)


def _combine(T: list[Tensor], v: Tensor, opts: MergeOptions, path: str, part: str, idx: list[int]) -> Tensor:
    """The combiner of the task tensors T_i (one shape) with weights v (k,): see the module docstring."""
    kind, density = opts.combiner, opts.density
    if kind in ("ties", "magnitude_prune"):
        T = [t * _top_mask(t, density) for t in T]
    elif kind.startswith("dare"):
        T = [t * keep_mask(opts.key, path, i, part, t.shape, density, t.device) / density for i, t in zip(idx, T)]  # type: ignore[arg-type]
    X = torch.stack(T)  # (k, ...)
    weighted = X * v.reshape(-1, *([1] * (X.ndim - 1)))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(0)
    sgn = X.sign()
    elected = (X if opts.sign == "total" else sgn).sum(0)
    agree = sgn == torch.where(elected >= 0, 1.0, -1.0).to(X.dtype)  # zero entries never agree
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _top_mask(t: Tensor, density: float | None) -> Tensor:
    """1 at the k = ⌊density·numel⌋ entries of largest |t| (peft's magnitude prune; topk breaks ties), else 0."""
    flat = t.abs().reshape(-1)
    k = int(density * t.numel())  # type: ignore[operator]  # peft's own rounding
    mask = torch.zeros_like(flat).scatter(0, torch.topk(flat, k=k).indices, 1.0)
    return mask.reshape(t.shape)


# ----------------------------------------------------------------------------- gains (g)
def _gain_check(path: str, name: str, present: MergePresent) -> None:
    _check_leaves(path, name, present, "gain", {"g": 1}, frozenset({"g"}))
    sizes = {i: tuple(lv["g"].shape) for i, lv in present}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{_WHO}: layer {path!r} has gains of shapes {sizes} across the adapters; merge adapters of one model")


def _gain(path: str, present: MergePresent, w: Tensor, opts: MergeOptions) -> Leaves:
    g0 = present[0][1]["g"]
    ct = _compute_dtype(g0.dtype, opts.floor)
    own = dict(present)
    G = torch.stack([own[i]["g"].to(ct) if i in own else torch.ones_like(g0, dtype=ct) for i in range(opts.n)])  # (n, d)
    return {"g": (G * w.to(device=g0.device, dtype=ct)[:, None]).sum(0).to(g0.dtype)}


LOWRANK = MergeRule(
    methods=METHODS,
    check=_lowrank_check,
    merge=_lowrank,
    what=f"low-rank leaves {sorted(_LOWRANK_LEAVES)}",
    rank=lambda leaves: leaves["A"].shape[0],
)
GAIN = MergeRule(methods=("linear",), check=_gain_check, merge=_gain, what="gain leaves ['g']")
