"""PiSSA — Meng et al. 2024, arXiv 2404.02948 (principal singular values and vectors adaptation).

    W = U S Vᵀ (fp32),   S' = S_r / s,   s = alpha / r   (rsLoRA: s = alpha / √r)
    A = diag(√S') V_rᵀ,   B = U_r diag(√S')                  so  s·BA = U_r S_r V_rᵀ for any alpha
    y = x Wᵀ + b + s · ((x Aᵀ) Bᵀ − (x A₀ᵀ) B₀ᵀ)

    A (r, d_in), B (d_out, r)   = the factors above;         trainable
    A0, B0                      = frozen copies of A, B;     frozen
    scale ()                    = s;                         frozen leaf

Identity at init: A = A₀, B = B₀, and both branches run the same ops, so they cancel exactly.
Dropout (``dropout`` leaf, with the runtime's ``noise``) acts on the trained branch's input only: the
frozen term belongs to peft's residual weight W − s·B₀A₀, which sees x itself.
The paper (and peft) overwrite W with the residual W − s·BA; here W stays shared and
bit-identical and the residual is the frozen branch −s·B₀A₀ (same output, K adapters cost K
low-rank sets, not K dense copies). S is divided by s as in peft (SPEC §4: otherwise the
magnitudes of A and B are wrong whenever alpha ≠ r).

niter=None is the exact SVD (peft's init_lora_weights="pissa"); the key is then unused.
niter=K is a randomized SVD with K power iterations, like peft's "pissa_niter_K"; its sketch is
drawn from the key (peft draws from torch's global RNG and uses no oversampling; linalg.top_svd
oversamples by 10 columns, so it is at least as accurate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from . import _padding
from .lora import check_dropout, dropout_leaf, dropped, projected, scaling
from .lora import shapes as lora_shapes

# the variant contract; other names are shared helpers
__all__ = ["NAME", "TRAINABLE", "Config", "PiSSAConfig", "apply", "init", "pad", "random_init", "shapes"]
NAME = "pissa"
TRAINABLE = frozenset({"A", "B"})  # leaves an optimizer updates


def random_init(cfg: PiSSAConfig) -> bool:
    """Whether different keys give different params for this config (randomized SVD only)."""
    return cfg.niter is not None


@dataclass(frozen=True)
class PiSSAConfig:
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    niter: int | None = None  # None: exact SVD; K: randomized SVD with K power iterations
    dropout: float = 0.0  # as LoRAConfig.dropout
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("alpha", self.alpha, who)
        if self.alpha <= 0:
            raise ValueError(
                f"{who}: alpha={self.alpha!r} must be > 0: PiSSA divides S by s = alpha/r and takes "
                f"its square root (e.g. alpha={2 * self.r})"
            )
        if self.niter is not None and (isinstance(self.niter, bool) or not isinstance(self.niter, int) or self.niter < 0):
            raise ValueError(
                f"{who}: niter={self.niter!r} must be None (exact SVD) or an int >= 0 "
                f"(power iterations of the randomized SVD, e.g. niter=4)"
            )
        check_dropout(self.dropout, who)

    @property
    def scale(self) -> float:
        return scaling(self.alpha, self.r, self.use_rslora)


Config = PiSSAConfig


def init(key: _keys.Key, W: Tensor, cfg: PiSSAConfig, statistic=None) -> dict[str, Tensor]:
    _keys.as_seed(key)  # validate the key even when the exact SVD does not use it
    d_out, d_in = _checks.check_weight(W, "pissa.init")
    _checks.check_rank(cfg.r, d_out, d_in, "pissa.init")
    U, S, V = linalg.top_svd(W, cfg.r, niter=cfg.niter, key=key)  # fp32: (d_out, r), (r,), (d_in, r)
    root = (S / cfg.scale).sqrt()  # √S'
    A = (root[:, None] * V.T).to(W.dtype)  # (r, d_in)
    B = (U * root).to(W.dtype)  # (d_out, r)
    return {
        "A": A.clone().requires_grad_(True),
        "B": B.clone().requires_grad_(True),
        "scale": torch.tensor(cfg.scale, dtype=W.dtype, device=W.device),
        "A0": A,
        "B0": B,
        **dropout_leaf(cfg, _checks.like(W)),
    }


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): LoRA's plus the frozen A0, B0."""
    out = lora_shapes(leaves, d_out, d_in)
    return {**out, "A0": out["A"], "B0": out["B"]}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank rows/columns of A, B, A0, B0; no adapter here: zero factors."""
    return _padding.lowrank(NAME, path, present, K, {"A": 0, "B": 1, "A0": 0, "B0": 1})


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "pissa.apply")
    # dropout acts on the trained branch only; the frozen term belongs to peft's residual weight W − s·B0A0.
    # h Bᵀ − h0 B0ᵀ is written as h (B − B0)ᵀ + (h − h0) B0ᵀ, both accumulated into the base output:
    # each term is exactly zero at init (B = B0 and h = h0 there: same inputs, same ops), so identity
    # at init holds bit for bit, and autograd keeps only h and B − B0 (B0 needs no gradient) — no
    # concatenated copies of the factors or of the projections
    s = params["scale"]
    h = projected(params, dropped(params, x, noise))  # (..., r)  s · x̃ Aᵀ
    dh = h - projected({"A": params["A0"], "scale": s}, x)  # h − s·x A0ᵀ
    y = linalg.linear_add(x, W, b, h, params["B"] - params["B0"])
    return linalg.add_product(y, dh, params["B0"])
