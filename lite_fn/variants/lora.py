"""LoRA — Hu et al. 2021, arXiv 2106.09685 (rsLoRA: Kalajdzievski 2023, arXiv 2312.03732).

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,      s = alpha / r   (rsLoRA: s = alpha / √r)

    A (r, d_in)  ~ kaiming-uniform(a=√5) = U(±1/√d_in)  (peft default), or N(0, 1/r²)
                   with init="gaussian" (peft: normal_(std=1/r));  trainable
    B (d_out, r) = 0;                                                 trainable
    scale ()     = s;                                                 frozen leaf
    dropout ()   = p, only when p > 0;                                frozen leaf

Identity at init: B = 0.
Dropout (peft's lora_dropout) acts on the adapter branch's input only, inverted:
    y = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ,   x̃ = x ⊙ [u ≥ p] / (1 − p)
with u the uniform ``noise`` (same shape as x) that the runtime derives from an explicit key
(``lf.call(..., key=k)``); no noise, no dropout, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from . import _padding

__all__ = [
    "NAME",
    "TRAINABLE",
    "Config",
    "LoRAConfig",
    "apply",
    "apply_runs",
    "init",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "lora"
TRAINABLE = frozenset({"A", "B"})  # leaves an optimizer updates


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    init: str = "kaiming"  # "kaiming" (peft default) | "gaussian"
    dropout: float = 0.0  # peft's lora_dropout, on the adapter input; active only with lf.call(..., key=k)
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("alpha", self.alpha, who)
        _checks.one_of("init", self.init, {"kaiming", "gaussian"}, who)
        check_dropout(self.dropout, who)

    @property
    def scale(self) -> float:
        return scaling(self.alpha, self.r, self.use_rslora)


Config = LoRAConfig


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / √r with rsLoRA — the scale every LoRA-family config exposes."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def check_dropout(p, who: str) -> None:
    _checks.finite_number("dropout", p, who)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: dropout={p!r} must be in [0, 1) (the probability of dropping an input feature, e.g. 0.1)")


def dropout_leaf(cfg, opts: dict) -> dict[str, Tensor]:
    """{"dropout": p} when the config drops (p > 0), else nothing: params without it never drop."""
    p = getattr(cfg, "dropout", 0.0)
    return {"dropout": torch.tensor(float(p), **opts)} if p > 0 else {}


def dropped(params: dict[str, Tensor], x: Tensor, noise: Tensor | None) -> Tensor:
    """x̃ = x ⊙ [u ≥ p] / (1 − p) with u = ``noise``; x itself without noise or without a dropout leaf."""
    if noise is None or "dropout" not in params:
        return x
    p = params["dropout"]
    return torch.where(noise >= p, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


def init_factors(key: _keys.Key, W: Tensor, cfg, who: str) -> dict[str, Tensor]:
    """A (random), B (zero), scale: shared by LoRA, DoRA and DeLoRA-style variants."""
    d_out, d_in = _checks.check_weight(W, who)
    _checks.check_rank(cfg.r, d_out, d_in, who)
    gen = _keys.generator(key)
    if getattr(cfg, "init", "kaiming") == "gaussian":
        A = torch.randn((cfg.r, d_in), generator=gen) / cfg.r
    else:
        A = linalg.kaiming_uniform(gen, (cfg.r, d_in), fan_in=d_in)
    opts = _checks.like(W)
    return {
        "A": A.to(**opts).requires_grad_(True),
        "B": torch.zeros(d_out, cfg.r, **opts).requires_grad_(True),
        "scale": torch.tensor(cfg.scale, **opts),
        **dropout_leaf(cfg, opts),
    }


def init(key: _keys.Key, W: Tensor, cfg: LoRAConfig, statistic=None) -> dict[str, Tensor]:
    return init_factors(key, W, cfg, "lora.init")


def projected(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """s · x Aᵀ, (..., d_in) -> (..., r): the scale applied on the r-wide h, not the d_out-wide output."""
    return torch.nn.functional.linear(x, params["A"]) * params["scale"]


def delta(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """s · (x Aᵀ) Bᵀ — the low-rank branch alone, (..., d_in) -> (..., d_out)."""
    return torch.nn.functional.linear(projected(params, x), params["B"])


def linear_delta(x: Tensor, W: Tensor, b: Tensor | None, params: dict[str, Tensor], xd: Tensor) -> Tensor:
    """x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ with x̃ = ``xd``: the layer's product and the low-rank branch, the
    second GEMM accumulated into the first (``linalg.linear_add``)."""
    return linalg.linear_add(x, W, b, projected(params, xd), params["B"])


def apply_runs(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    """K adapters on K equal runs of rows at once (a routed call's fast path): every leaf has a
    leading axis K, x is (K, m..., d_in) -> (K, m..., d_out); equal to ``vmap(apply)`` over that axis.
    One GEMM for the base over all rows, one batched GEMM for x Aᵀ, and the K products with B
    accumulated into the base output by one in-place ``baddbmm_``. No dropout (the runtime vmaps
    ``apply`` when a key is given)."""
    K = x.shape[0]
    h = torch.bmm(x.reshape(K, -1, x.shape[-1]), params["A"].mT) * params["scale"].view(K, 1, 1)  # (K, rows, r)
    return linalg.add_product(torch.nn.functional.linear(x, W, b), h.view(*x.shape[:-1], -1), params["B"])


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); the rank r is read from A."""
    r = leaves["A"][0] if len(leaves.get("A", ())) == 2 else 0
    return {"A": (r, d_in), "B": (d_out, r), "scale": (), **({"dropout": ()} if "dropout" in leaves else {})}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank rows of A / columns of B; no adapter here: zero factors."""
    return _padding.lowrank(NAME, path, present, K, {"A": 0, "B": 1})


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "lora.apply")
    return linear_delta(x, W, b, params, dropped(params, x, noise))
