"""AntiPaSTO — Clark 2026, arXiv 2601.07473 (reference implementation "antipasto3").

    W = U S Vᵀ (fp32 SVD), r chosen dims:  U (d_out, r), S (r,), V (d_in, r)           frozen
    per block b of size bs:  A_b = ½(P_b − P_bᵀ) from its bs(bs−1)/2 upper-triangle params,
        A_b ← a·tanh(A_b / a),  a = 2·tan(θ_max / 2)       (soft clamp of the rotation angle)
        X_b = α·A_b / 2,  R_b = (I − X_b)⁻¹ (I + X_b)      (Cayley: R(−α) = R(α)⁻¹, R(0) = I)
    V' = V·blockdiag(R_v),  U' = U·blockdiag(R_u),  S' = S + α·δs
    y = x Wᵀ + b + ((x V') ⊙ S') U'ᵀ − ((x V) ⊙ S) Uᵀ

    delta_s (r,)                 4e-4 + 4e-4·N(0,1), truncated ±2σ;               trainable
    rot_v / rot_u (n_blocks, bs(bs−1)/2)   1e-4·N(0,1), truncated ±2σ;             trainable
    alpha ()      steering coefficient (lf.with_alpha sets it);                   frozen
    max_angle ()  θ_max;                                                          frozen

Identity at init: only at alpha = 0, and then bit-exactly for ANY params (see apply).
The small random init breaks the ±alpha symmetry that stalls training from exactly zero.

Computed on the r-wide projection h = x V only (no d×d matrix): with K = R − I (blockwise,
exactly 0 at α = 0) and g = h ⊙ S,
    e = (h K_v) ⊙ S' + h ⊙ (α·δs)           = (x V') ⊙ S' − g
    e ← e + (g + e) K_uᵀ                     (then (g + e) R_uᵀ − g = e)
    y = x Wᵀ + b + e Uᵀ
Both steps are linear in h, so e = h M for one r × r matrix M per call (``prepare`` builds it for
all layers at once): per token a LoRA's two rank-r GEMMs (x V, then e Uᵀ accumulated into
x Wᵀ + b) and one r × r product. Only M depends on α, so in a vmapped alpha sweep U is shared and
e Uᵀ is one GEMM over every alpha's rows. M is built from differences that are exactly zero at
α = 0 (no cancellation of two large terms, robust to TF32/bf16 matmuls), so y is x Wᵀ + b bit
for bit there.

Defaults: r=16, rotate_v=True, rotate_u=False, alpha=1.0 as the reference; block_size=4
(the reference rotates one dense r×r block; blocks keep rotations local and cheap);
max_angle=0.5 rad (reference: π/3, whose own note says angles ≲ 0.3 keep Δy(+1) ≈ −Δy(−1);
0.5 is a compromise). select="top" (top-r by S) or "data" (score_i = S_i · mean|x·v_i| over
calibration inputs, best r kept in index order; needs a Stat, see ``stat``).
Deviation: the reference keeps a dense residual W_res = W − U S Vᵀ; we keep W shared and
subtract ((x V) ⊙ S) Uᵀ instead (same function, no dense copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftLayer
from . import _padding, lora

__all__ = [
    "NAME",
    "PEFT",
    "STEERING_LEAF",
    "TRAINABLE",
    "AntiPaSTOConfig",
    "Config",
    "Stat",
    "apply",
    "init",
    "merged",
    "pad",
    "prepare",
    "shapes",
    "stat",
]  # the variant contract; other names are shared helpers
NAME = "antipasto"
TRAINABLE = frozenset({"delta_s", "rot_v", "rot_u"})  # leaves an optimizer updates
STEERING_LEAF = "alpha"


@dataclass(frozen=True)
class AntiPaSTOConfig:
    r: int = 16
    block_size: int = 4
    max_angle: float = 0.5  # radians, soft clamp per Cayley block
    rotate_v: bool = True
    rotate_u: bool = False
    select: str = "top"  # "top" | "data"
    alpha: float = 1.0  # initial steering coefficient (a leaf; sweep it with lf.with_alpha)
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(
                f"{who}: block_size={self.block_size!r} must be an int >= 2 (a rotation block needs two dims; e.g. block_size=4)"
            )
        if self.r % self.block_size:
            lo, hi = self.r // self.block_size * self.block_size, (self.r // self.block_size + 1) * self.block_size
            valid = f"r={lo} or r={hi}" if lo else f"r={hi}"
            raise ValueError(
                f"{who}: r={self.r} is not a multiple of block_size={self.block_size}; use {valid} (or a block_size dividing {self.r})"
            )
        _checks.finite_number("max_angle", self.max_angle, who)
        if not 0.0 < self.max_angle < math.pi:
            raise ValueError(f"{who}: max_angle={self.max_angle!r} must be in (0, π) radians (e.g. max_angle=0.5)")
        _checks.one_of("select", self.select, {"top", "data"}, who)
        if not (self.rotate_v or self.rotate_u):
            raise ValueError(
                f"{who}: rotate_v=False and rotate_u=False leaves nothing to rotate; set rotate_v=True (the reference default) and/or rotate_u=True"
            )
        _checks.finite_number("alpha", self.alpha, who)


Config = AntiPaSTOConfig


class Stat:
    """select="data": Σ_tokens |x · v_i| for every right singular vector v_i of W (float64), and the count."""

    def __init__(self, W: Tensor):
        self.d_in = W.shape[1]
        self.share_key = None  # the statistic depends on W
        self.tokens = 0
        self.converged = False  # no early stop: every token moves the scores
        self.V_full = _svd(W)[2].T.contiguous()  # (d_in, min(d_out, d_in)) fp32
        self.abs_sum = torch.zeros(self.V_full.shape[1], dtype=torch.float64, device=W.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.V_full, self.abs_sum))

    def update(self, x: Tensor) -> None:
        who = "antipasto.Stat.update"
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[-1] != self.d_in:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{who}: x has shape {shape} but the layer expects d_in={self.d_in}; pass inputs of shape (..., {self.d_in})"
            )
        X = x.detach().reshape(-1, self.d_in)
        if not bool(torch.isfinite(X).all()):
            raise ValueError(
                f"{who}: x contains {int((~torch.isfinite(X)).sum())} NaN/inf entries; calibration inputs must be finite"
            )
        proj = X.to(self.V_full) @ self.V_full  # (tokens, k) per-token projections in fp32 ...
        self.abs_sum = self.abs_sum + proj.abs().sum(0, dtype=torch.float64)  # ... summed in float64
        self.tokens += X.shape[0]


def stat(cfg: AntiPaSTOConfig, W: Tensor) -> Stat | None:
    """The calibration statistic for select="data"; None for select="top" (no data needed)."""
    _checks.check_weight(W, "antipasto.stat")
    return Stat(W) if cfg.select == "data" else None


def _svd(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(W.detach().to(torch.float32), full_matrices=False)


def _select(S: Tensor, cfg: AntiPaSTOConfig, statistic: Stat | None, d_in: int) -> Tensor:
    """Indices of the r chosen singular dims, ascending."""
    if cfg.select == "top":
        return torch.arange(cfg.r, device=S.device)
    who = "antipasto.init"
    _checks.calibration_stat(statistic, Stat, cfg.r, who, "AntiPaSTO select='data'", "antipasto.stat(cfg, W)")
    assert isinstance(statistic, Stat)  # calibration_stat raised otherwise
    if statistic.d_in != d_in or statistic.abs_sum.numel() != S.numel():
        raise ValueError(
            f"{who}: stat was built for another weight shape (d_in={statistic.d_in}); build it with antipasto.stat(cfg, W) for this layer"
        )
    score = S.double() * statistic.abs_sum.to(S.device) / statistic.tokens  # S_i · mean |x · v_i|
    return torch.topk(score, cfg.r).indices.sort().values


def init(key: _keys.Key, W: Tensor, cfg: AntiPaSTOConfig, statistic: Stat | None = None) -> dict[str, Tensor]:
    who = "antipasto.init"
    d_out, d_in = _checks.check_weight(W, who)
    _checks.check_rank(cfg.r, d_out, d_in, who)
    U, S, Vh = _svd(W)
    idx = _select(S, cfg, statistic, d_in)
    n_blocks, n_params = cfg.r // cfg.block_size, cfg.block_size * (cfg.block_size - 1) // 2
    k_s, k_v, k_u = _keys.split(key, 3)  # one key per leaf: toggling rotate_u leaves the others unchanged
    opts = _checks.like(W)
    params = {
        "U": U[:, idx].to(**opts),
        "S": S[idx].to(**opts),
        "V": Vh[idx].T.to(**opts),
        "delta_s": linalg.truncated_normal(_keys.generator(k_s), (cfg.r,), std=4e-4, mean=4e-4).to(**opts).requires_grad_(True),
    }
    if cfg.rotate_v:
        params["rot_v"] = (
            linalg.truncated_normal(_keys.generator(k_v), (n_blocks, n_params), std=1e-4).to(**opts).requires_grad_(True)
        )
    if cfg.rotate_u:
        params["rot_u"] = (
            linalg.truncated_normal(_keys.generator(k_u), (n_blocks, n_params), std=1e-4).to(**opts).requires_grad_(True)
        )
    params["alpha"] = torch.tensor(cfg.alpha, **opts)
    params["max_angle"] = torch.tensor(cfg.max_angle, **opts)
    return params


def rotation(p: Tensor, alpha: Tensor, max_angle: Tensor, bs: int) -> Tensor:
    """Block Cayley rotations R (n_blocks, bs, bs) from upper-triangle params p (n_blocks, bs(bs−1)/2).

    Computed in at least fp32 (torch has no half-precision solve).
    """
    dt = torch.promote_types(p.dtype, torch.float32)
    A = linalg.skew_from_triu(p.to(dt), bs)
    a = 2.0 * torch.tan(max_angle.to(dt) / 2.0)
    A = a * torch.tanh(A / a)  # entrywise soft clamp (bs=2, |α| <= 1: the angle stays below max_angle)
    return linalg.cayley(alpha.to(dt) * A / 2.0)


def _rotation_step(p: Tensor, alpha: Tensor, max_angle: Tensor, bs: int, dtype: torch.dtype) -> Tensor:
    """K = R − I: exactly 0 at α = 0 (R(0) = solve(I, I) = I bit for bit), cast to the compute dtype."""
    R = rotation(p, alpha, max_angle, bs)
    return (R - torch.eye(bs, dtype=R.dtype, device=R.device)).to(dtype)


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); r is read from S, the block count from the
    rotation leaves present (at least one of rot_v, rot_u)."""
    r = leaves["S"][0] if len(leaves.get("S", ())) == 1 else 0
    out = {"U": (d_out, r), "S": (r,), "V": (d_in, r), "delta_s": (r,), "alpha": (), "max_angle": ()}
    rots = [k for k in ("rot_v", "rot_u") if k in leaves] or ["rot_v"]
    for k in rots:
        p = leaves.get(k, ())
        n_blocks = p[0] if len(p) == 2 and p[0] > 0 else 1
        bs = r // n_blocks if r % n_blocks == 0 else 0
        out[k] = (n_blocks, bs * (bs - 1) // 2)
    return out


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero singular directions in whole blocks of the common block size (identity
    rotations); a missing rotation side is a zero rotation; an adapter that does not target the layer
    gets another adapter's U, S, V with δs = 0 and no rotation — the identity at any alpha, which stays
    the adapter's own (``own``)."""
    axes = {"U": 1, "S": 0, "V": 1, "delta_s": 0, "rot_v": 0, "rot_u": 0}
    rots = sorted({leaf for v in present.values() for leaf in v if leaf in ("rot_v", "rot_u")})
    sizes = {k: {v["S"].shape[0] // v[rot].shape[0] for rot in rots if rot in v} for k, v in present.items()}
    if len({bs for s in sizes.values() for bs in s}) > 1:
        _padding.refuse(
            NAME,
            path,
            f"the adapters use different rotation block sizes there ({sizes}); only equal block sizes pad with identity blocks",
        )
    bs = next(iter(next(iter(sizes.values()))))
    R = max(v["S"].shape[0] for v in present.values())
    out = {}
    for k, leaves in present.items():
        leaves = dict(leaves)
        for rot in rots:  # zero rotation params: R = cayley(0) = I exactly
            if rot not in leaves:
                leaves[rot] = leaves["S"].new_zeros((leaves["S"].shape[0] // bs, bs * (bs - 1) // 2))
        out[k] = {
            leaf: (_padding.grown(v, R // bs if leaf in rots else R, axes[leaf]) if leaf in axes else v)
            for leaf, v in leaves.items()
        }
    donor = out[min(present)]
    for k in range(K):
        if k in out:
            continue
        new = {}
        for leaf, v in donor.items():
            if leaf in ("U", "S", "V"):
                new[leaf] = v.detach().clone()
            elif leaf in ("alpha", "max_angle"):
                mine = own(k, leaf)  # the adapter's own steering value, if it has one elsewhere
                new[leaf] = (mine if mine is not None else v).detach().clone()
            else:
                new[leaf] = torch.zeros_like(v).detach()
        out[k] = new
    return out


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "antipasto.apply")
    h = torch.nn.functional.linear(x, params["V"].mT.contiguous())  # (..., r)  x V, the only projection of x
    # e = h M (r-wide, see the module docstring), then e Uᵀ accumulated into the layer's output: per
    # token a LoRA's two rank-r GEMMs plus one r × r product; U is shared by every alpha of a sweep
    M = params["M"] if "M" in params else _mixing(params, h.dtype)
    return linalg.linear_add(x, W, b, torch.matmul(h, M), params["U"])


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W + U (V M)ᵀ, b): apply's x Wᵀ + b + (x V M) Uᵀ as one dense weight, with apply's mixing M (the
    prepared leaf when present); exactly W at α = 0 (M = 0). The bias passes through."""
    M = params["M"] if "M" in params else _mixing(params, W.dtype)
    return W + params["U"] @ (params["V"] @ M).mT, b


_FULL_WIDTH = ("U", "V")  # the leaves M does not depend on; every other leaf is r-sized


def prepare(layers: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Per call, before the forward: every layer's r × r mixing M (leaf ``M``, which ``apply`` uses
    when present). M depends only on the r-sized leaves, so it is built for all layers of equal rank
    and block size at once — one batched Cayley solve for the whole model instead of one per layer.
    Same math as ``apply`` alone."""
    groups: dict[tuple, list[str]] = {}  # r-sized leaves' signature -> paths
    for path, leaves in layers.items():
        key = tuple(
            (k, tuple(leaves[k].shape), leaves[k].dtype, leaves[k].device) for k in sorted(leaves) if k not in _FULL_WIDTH
        )
        groups.setdefault(key + (leaves["U"].dtype,), []).append(path)
    out: dict[str, dict[str, Tensor]] = {}
    for paths in groups.values():
        small = {k: torch.stack([layers[p][k] for p in paths]) for k in layers[paths[0]] if k not in _FULL_WIDTH}
        M = _mixing(small, layers[paths[0]]["U"].dtype)  # (L, r, r)
        out.update({p: {**layers[p], "M": m} for p, m in zip(paths, M.unbind(0))})
    return out


def _mixing(params: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """M (..., r, r) with e = h M, exactly 0 at α = 0; leaves may carry leading (layer) axes:
    e = (h K_v) ⊙ S' + h ⊙ δ        ->  M  = K_v diag(S') + diag(δ),   δ = α·δs = S' − S
    e ← e + (g + e) K_uᵀ, g = h ⊙ S  ->  M ← M + (diag(S) + M) K_uᵀ"""
    S, alpha = params["S"], params["alpha"]
    ds = alpha[..., None] * params["delta_s"]
    M = torch.diag_embed(ds)
    if "rot_v" in params:
        M = M + _block_step(params["rot_v"], params, dtype) * (S + ds).unsqueeze(-2)
    if "rot_u" in params:
        M = M + (torch.diag_embed(S) + M) @ _block_step(params["rot_u"], params, dtype).mT
    return M


def _block_step(p: Tensor, params: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """blockdiag(K_0, …, K_{n−1}) (..., r, r) of K = R − I for rotation params p (..., n, bs(bs−1)/2)."""
    scalar = (..., None, None, None)  # α, θ_max (...,) against the blocks (..., n, bs, bs)
    bs = params["S"].shape[-1] // p.shape[-2]
    return linalg.block_diag(_rotation_step(p, params["alpha"][scalar], params["max_angle"][scalar], bs, dtype))


# ----------------------------------------------------------------------------- peft: written as LoRA
# peft has no AntiPaSTO; save_peft writes the LoRA that equals it exactly at its current alpha:
#     ΔW = U'S'V'ᵀ − USVᵀ,
# rank r when only one side rotates (U·(S'V'ᵀ − SVᵀ), or (U'S' − US)·Vᵀ), else 2r
# ([U'S' − US, US]·[V', V' − V]ᵀ), computed in float64 from differences that are exactly 0 at alpha = 0
# (R = I, S' = S bit for bit), so the export of an unsteered adapter is exactly the base model and no two
# large terms cancel near alpha = 0.
def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    p = {k: v.detach().to(torch.float64) for k, v in leaves.items()}
    U, S, V, alpha = p["U"], p["S"], p["V"], p["alpha"]
    S2 = S + alpha * p["delta_s"]
    r = S.shape[-1]

    def rotated(M: Tensor, rot: str) -> Tensor:  # M · blockdiag(R), the variant's own rotation
        return M if rot not in p else linalg.block_rotate(M, rotation(p[rot], alpha, p["max_angle"], r // p[rot].shape[-2]))

    V2, U2 = rotated(V, "rot_v"), rotated(U, "rot_u")
    if "rot_u" not in p:  # U' = U: ΔW = U (S'V'ᵀ − SVᵀ)
        B, A = U, S2[:, None] * V2.T - S[:, None] * V.T
    elif "rot_v" not in p:  # V' = V: ΔW = (U'S' − US) Vᵀ
        B, A = U2 * S2 - U * S, V.T
    else:  # ΔW = (U'S' − US) V'ᵀ + US (V' − V)ᵀ = [U'S' − US, US] · [V'ᵀ; (V' − V)ᵀ]
        B, A = torch.cat([U2 * S2 - U * S, U * S], dim=1), torch.cat([V2.T, (V2 - V).T], dim=0)
    dtype = layer.W.dtype
    return lora.peft_lowrank(A.to(dtype).contiguous(), B.to(dtype).contiguous(), 1.0, layer.path)


PEFT = PeftCodec(format=lora.PEFT_LORA, write=_peft_write)
