"""(IA)³, input side — Liu et al. 2022, arXiv 2205.05638 (peft: tuners/ia3, is_feedforward=True).

    y = (x ⊙ g) Wᵀ + b

    g (d_in,) = 1;  trainable

peft uses this form for the layers listed in ``feedforward_modules`` (the FFN down-projection):
the input is scaled, the bias passes through unscaled (peft's merge leaves it alone too).
Identity at init: g = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys
from .._contract import PeftCodec, never_random
from . import _arithmetic, _padding
from .ia3 import PEFT_IA3, is_feedforward, ones_gain, peft_gain

# the variant contract; other names are shared helpers
__all__ = ["MERGE", "NAME", "PEFT", "TRAINABLE", "Config", "IA3FFConfig", "apply", "init", "pad", "random_init", "shapes"]
NAME = "ia3_ff"
TRAINABLE = frozenset({"g"})  # leaves an optimizer updates
MERGE = _arithmetic.GAIN  # adapter arithmetic (merge_adapters): g = Σ w_i g_i

random_init = never_random  # init draws no random numbers


@dataclass(frozen=True)
class IA3FFConfig:
    variant_name: ClassVar[str] = NAME


Config = IA3FFConfig


def init(key: _keys.Key, W: Tensor, cfg: IA3FFConfig, statistic=None) -> dict[str, Tensor]:
    return ones_gain(W, "in", "ia3_ff.init")


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): one gain per input feature."""
    return {"g": (d_in,)}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): an adapter that does not target the layer gets g = 1."""
    return _padding.gain(NAME, path, present, K)


def apply_input(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """x ⊙ g: all this variant does (the layer itself then computes (x ⊙ g) Wᵀ + b)."""
    return x * params["g"]  # (..., i) ⊙ (i,)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "ia3_ff.apply")
    return torch.nn.functional.linear(apply_input(params, x), W, b)


# peft: IA3 with the layer in feedforward_modules, ia3_l of shape (1, d_in).
PEFT = PeftCodec(
    format=PEFT_IA3,
    claims=is_feedforward,
    tensors=lambda cfg, layer: ("ia3_l",),
    read=lambda cfg, layer: peft_gain(cfg, layer, feedforward=True),
    write=lambda leaves, layer: ({"ia3_l": leaves["g"].detach().reshape(1, -1)}, {"feedforward": True}),
)
