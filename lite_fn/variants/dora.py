"""DoRA — Liu et al. 2024, arXiv 2402.09353 (weight-decomposed low-rank adaptation).

    y = (m / n) ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b,      s = alpha / r   (rsLoRA: s = alpha / √r)
    n = ‖W + s·BA‖_row  (one norm per output row), treated as a constant: no gradient

    A (r, d_in)  ~ kaiming-uniform(a=√5) (peft default), or N(0, 1/r²) with init="gaussian"; trainable
    B (d_out, r) = 0;                                                                        trainable
    scale ()     = s;                                                                        frozen leaf
    m (d_out,)   = ‖W‖_row;                                                                  trainable

Identity at init: B = 0 so n = ‖W‖_row = m, and m / n = 1 exactly (m and n come from the same code).
The norm is detached (paper §4.3 "treat ‖V + ΔV‖_c as a constant"; peft's DoraLinearLayer does the same).
The bias passes through unscaled, as in peft (which subtracts it from the base result before rescaling).

n is computed without forming the dense d_out × d_in matrix W + s·BA: for each row o,
    n_o² = ‖W_o‖² + 2s · Σ_r B_or (W Aᵀ)_or + s² · B_o (A Aᵀ) B_oᵀ          (clamped ≥ 0)
which needs only (d_out, r) and (r, r) intermediates. Exact algebra; in floating point it loses
relative accuracy only when s·BA nearly cancels a row of W (n_o ≪ ‖W_o‖), far from DoRA's regime.
Dropout (``dropout`` leaf, with the runtime's ``noise``; peft's DoRA path with lora_dropout):
    y = x Wᵀ + b + (m/n − 1) ⊙ x̃ Wᵀ + (m/n) ⊙ s·(x̃ Aᵀ) Bᵀ,   x̃ = x ⊙ [u ≥ p] / (1 − p)
which is the formula above when x̃ = x.
No lora_bias: peft refuses LoraConfig(use_dora=True, lora_bias=True), so DoRAConfig(lora_bias=True) is refused
and a DoRA layer holds no bias leaf.
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
    LoRAConfig,
    delta,
    dropped,
    factor_names,
    factor_shapes,
    init_factors,
    linear_delta,
    peft_factors,
    peft_lowrank,
)

__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "DoRAConfig",
    "apply",
    "init",
    "merged",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "dora"
TRAINABLE = frozenset({"A", "B", "m"})  # leaves an optimizer updates


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """LoRA's fields (r, alpha, use_rslora, init, dropout) and scale; only the variant differs. lora_bias=True
    is refused, as peft refuses it for DoRA."""

    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        super().__post_init__()
        if self.lora_bias:
            raise ValueError(
                "DoRAConfig: lora_bias=True is not supported: peft refuses it for DoRA ('lora_bias=True is not "
                "supported for DoRA'), so there is no peft math to match; use lf.LoRAConfig(lora_bias=True), or "
                "DoRAConfig with lora_bias=False"
            )


Config = DoRAConfig


def weight_norm(W: Tensor, A: Tensor, B: Tensor, scale: Tensor) -> Tensor:
    """‖W + s·BA‖_row (d_out,), detached, from (d_out, r) and (r, r) pieces only."""
    W, A, B, scale = W.detach(), A.detach(), B.detach(), scale.detach()
    WA = W @ A.T  # (d_out, r)
    AA = A @ A.T  # (r, r)
    cross = (B * WA).sum(-1)  # Σ_r B_or (W Aᵀ)_or = ⟨W_o, (BA)_o⟩, (d_out,)
    square = ((B @ AA) * B).sum(-1)  # B_o (A Aᵀ) B_oᵀ = ‖(BA)_o‖², (d_out,)
    n2 = linalg.row_norm(W).square() + 2.0 * scale * cross + scale.square() * square
    return n2.clamp_min(0.0).sqrt()


def init(key: _keys.Key, W: Tensor, cfg: DoRAConfig, statistic=None) -> dict[str, Tensor]:
    p = init_factors(key, W, cfg, "dora.init")
    m = weight_norm(W, p["A"], p["B"], p["scale"])  # B = 0: the row norms of W, bit-equal to n at init
    return {**p, "m": m.requires_grad_(True)}


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): LoRA's factors plus the magnitude m (no bias leaf)."""
    return {**factor_shapes(leaves, d_out, d_in), "m": (d_out,)}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank rows/columns (the norm ‖W + s·BA‖ is unchanged). A layer an
    adapter does not target is refused: its identity needs m = ‖W‖_row, which only W gives."""
    missing = [k for k in range(K) if k not in present]
    if missing:
        _padding.refuse(
            NAME,
            path,
            f"adapter(s) {missing} do not target it, and DoRA's identity there needs m = ‖W‖_row, "
            f"which only the model's weights give; add a DoRA layer for it to those adapters first "
            f"(lf.init(key, model, lf.DoRAConfig(...), targets=...) gives the identity m)",
        )
    return _padding.lowrank(NAME, path, present, K, {"A": 0, "B": 1})


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "dora.apply")
    n = weight_norm(W, params["A"], params["B"], params["scale"])  # (d_out,), no gradient
    g = params["m"] / n  # (d_out,)
    if noise is not None and "dropout" in params:
        # peft with dropout: the base output keeps x, the magnitude correction and the low-rank term see x̃
        xd = dropped(params, x, noise)
        return torch.nn.functional.linear(x, W, b) + (g - 1.0) * torch.nn.functional.linear(xd, W) + g * delta(params, xd)
    y = linear_delta(x, W, None, params, x)  # x (W + s·BA)ᵀ, (..., d_out)
    y = g * y
    return y if b is None else y + b


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """((m / n) ⊙_row (W + s·BA), b): the dense layer ``apply`` computes, with the same detached norm n and the bias
    passed through unscaled (peft's DoRA merge: dora_factor · (W + ΔW)). O(r·d_out·d_in); exactly W at init
    (B = 0 and m = n)."""
    n = weight_norm(W, params["A"], params["B"], params["scale"])  # (d_out,), no gradient
    return (params["m"] / n)[:, None] * (W + params["scale"] * (params["B"] @ params["A"])), b


# ----------------------------------------------------------------------------- peft: LORA with use_dora
# LoRA's factors (lora_A.weight / lora_B.weight, or lora_embedding_A / _B on an embedding; conv-shaped on a conv) and
# lora_magnitude_vector = m: (d_out,), or (1, out, 1, …) on a conv (peft's _DoraConvNdLayer keeps the norm's keepdim
# shape; its norm over dims (1, 2, …) of W + s·ΔW per output channel is lite_fn's row norm of the (out, in·∏k) view).


def _peft_tensors(cfg: PeftConfig, layer: PeftLayer) -> tuple[str, ...]:
    return (*factor_names(layer), "lora_magnitude_vector")


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    leaves = peft_factors(cfg, layer)
    m, d_out = layer.tensors["lora_magnitude_vector"], leaves["B"].shape[0]
    want = (1, d_out, *(1,) * (len(layer.stored) - 2)) if layer.kind == "Conv" else (d_out,)
    if tuple(m.shape) != want:
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.lora_magnitude_vector has shape {tuple(m.shape)}; peft's DoRA on this "
            f"{layer.kind} layer stores it as {want}"
        )
    return {**leaves, "m": m.reshape(d_out)}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    tensors, facts = peft_lowrank(leaves["A"], leaves["B"], float(leaves["scale"]), layer, use_dora=True)
    m = leaves["m"].detach()
    if layer.kind == "Conv":
        m = m.reshape(1, -1, *(1,) * (len(layer.stored) - 2))
    return {**tensors, "lora_magnitude_vector": m}, facts


PEFT = PeftCodec(
    format=PEFT_LORA,
    group="LORA (use_dora)",  # one peft LoRA file is DoRA on all its layers or on none
    claims=lambda cfg, path: bool(cfg.get("use_dora")),
    tensors=_peft_tensors,
    read=_peft_read,
    write=_peft_write,
)
