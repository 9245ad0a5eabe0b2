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
from .._contract import PeftCodec, PeftConfig, PeftLayer
from . import _padding
from .lora import (
    PEFT_LORA,
    check_dropout,
    dropout_leaf,
    dropped,
    factor_names,
    peft_factors,
    peft_init,
    peft_lowrank,
    projected,
    scaling,
)
from .lora import shapes as lora_shapes

# the variant contract; other names are shared helpers
__all__ = ["NAME", "PEFT", "TRAINABLE", "Config", "PiSSAConfig", "apply", "init", "merged", "pad", "random_init", "shapes"]
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


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W + s·(BA − B₀A₀), b): the dense layer ``apply`` computes, in O(r·d_out·d_in). Written as
    s·((B − B₀) A + B₀ (A − A₀)), as ``apply`` splits it, so both terms are exactly zero at init and W' = W."""
    B0 = params["B0"]
    return W + params["scale"] * ((params["B"] - B0) @ params["A"] + B0 @ (params["A"] - params["A0"])), b


# ----------------------------------------------------------------------------- peft: LORA, residual inits
# Reading: a peft LoRA file with init_lora_weights "pissa" or "olora" — peft's from_pretrained re-runs that
# init on the model it is given and subtracts s·B₀A₀ from its weights; here the frozen A0/B0 are computed
# from the model's weights the way peft computes them, and the model is left alone. So, exactly like peft,
# load such an adapter onto the *original* base model (never onto the saved residual model).
# Writing: the plain LoRA of rank 2r that equals it on the unmodified base, s·(BA − B₀A₀) = s·[B, −B₀]·[A; A₀].


def _residual_factors(cfg: PeftConfig, layer: PeftLayer, r: int, s: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A0, B0, scale) of what peft's pissa_init / olora_init subtract from the base at load."""
    how, W = str(cfg.get("init_lora_weights")), layer.W
    if W.is_meta:
        raise ValueError(
            f"{cfg.where} sets init_lora_weights={how!r}: its frozen factors come from the base weights, "
            f"but {layer.path}.weight is on the meta device; load the model's weights first"
        )
    alpha = cfg.per_path("alpha_pattern", "lora_alpha", 8, layer.path)
    if how == "pissa":
        if alpha <= 0:
            raise ValueError(
                f"{cfg.where}: PiSSA with lora_alpha={alpha!r} at {layer.path!r} takes the square root of S/scale < 0"
            )
        p = init(0, W.detach(), PiSSAConfig(r=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora"))))
        return p["A0"], p["B0"], p["scale"]
    if layer.kind == "Conv1D":
        raise ValueError(
            f"{cfg.where} sets init_lora_weights='olora' on the Conv1D layer {layer.path!r}: peft's olora_init takes "
            f"the QR of the stored (d_in, d_out) weight, which lite_fn does not reproduce"
        )
    Q, R = torch.linalg.qr(W.detach().to(torch.float32))  # peft olora_init: W = QR, B0 = Q[:, :r], A0 = R[:r]
    return R[:r].contiguous(), Q[:, :r].contiguous(), torch.tensor(s, dtype=torch.float64)


def _peft_tensors(cfg: PeftConfig, layer: PeftLayer) -> tuple[str, ...]:
    if layer.kind == "Conv":
        raise ValueError(
            f"{cfg.where} sets init_lora_weights={cfg.get('init_lora_weights')!r} and targets the convolution "
            f"{layer.path!r}: peft itself cannot load it (its conv layers raise 'Unknown initialization'); exclude "
            f"the layer from target_modules, or convert the adapter to a plain LoRA with peft's "
            f"save_pretrained(path_initial_model_for_weight_conversion=...)"
        )
    return factor_names(layer)


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    leaves = peft_factors(cfg, layer)
    if layer.kind == "Embedding":
        # peft's embedding layers ignore a residual init (they take their plain init and leave the base alone): the
        # file's factors are a plain LoRA there — zero frozen factors, s·(BA − 0·0)
        A, B = leaves["A"], leaves["B"]
        return {**leaves, "A0": torch.zeros_like(A), "B0": torch.zeros_like(B)}
    A0, B0, s = _residual_factors(cfg, layer, leaves["A"].shape[0], float(leaves["scale"]))
    return {**leaves, "scale": s, "A0": A0, "B0": B0}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    A = torch.cat([leaves["A"].detach(), leaves["A0"].detach()], dim=0)
    B = torch.cat([leaves["B"].detach(), -leaves["B0"].detach()], dim=1)
    return peft_lowrank(A, B, float(leaves["scale"]), layer)


PEFT = PeftCodec(
    format=PEFT_LORA,
    claims=lambda cfg, path: not cfg.get("use_dora") and peft_init(cfg) == "residual",
    tensors=_peft_tensors,
    read=_peft_read,
    write=_peft_write,
)
