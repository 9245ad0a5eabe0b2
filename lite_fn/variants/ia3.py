"""(IA)³, output side — Liu et al. 2022, arXiv 2205.05638 (peft: tuners/ia3, is_feedforward=False).

    y = (x Wᵀ + b) ⊙ g

    g (d_out,) = 1;  trainable

The bias is scaled too: peft multiplies the base layer's whole output by g (and its merge
rescales the bias), so this is the same map as W' = diag(g) W, b' = g ⊙ b.
Identity at init: g = 1.
The input-side form used for feed-forward down-projections is ``ia3_ff``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys
from .._contract import never_random
from . import _padding

# the variant contract; other names are shared helpers
__all__ = ["NAME", "TRAINABLE", "Config", "IA3Config", "apply", "init", "pad", "random_init", "shapes"]
NAME = "ia3"
TRAINABLE = frozenset({"g"})  # leaves an optimizer updates

random_init = never_random  # init draws no random numbers


@dataclass(frozen=True)
class IA3Config:
    variant_name: ClassVar[str] = NAME


Config = IA3Config


def ones_gain(W: Tensor, side: str, who: str) -> dict[str, Tensor]:
    """{"g": ones} on the output (side="out", d_out) or input (side="in", d_in) features of W."""
    d_out, d_in = _checks.check_weight(W, who)
    g = torch.ones(d_out if side == "out" else d_in, dtype=W.dtype, device=W.device)  # (d,)
    return {"g": g.requires_grad_(True)}


def init(key: _keys.Key, W: Tensor, cfg: IA3Config, statistic=None) -> dict[str, Tensor]:
    return ones_gain(W, "out", "ia3.init")


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): one gain per output feature."""
    return {"g": (d_out,)}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): an adapter that does not target the layer gets g = 1."""
    return _padding.gain(NAME, path, present, K)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "ia3.apply")
    y = torch.nn.functional.linear(x, W, b)  # (..., o), bias included
    return y * params["g"]  # (..., o) ⊙ (o,)
