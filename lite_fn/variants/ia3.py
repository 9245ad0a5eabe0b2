"""(IA)³, output side — Liu et al. 2022, arXiv 2205.05638 (peft: tuners/ia3, is_feedforward=False).

    y = (x Wᵀ + b) ⊙ g

    g (d_out,) = 1;  trainable

The bias is scaled too: peft multiplies the base layer's whole output by g (and its merge
rescales the bias), so this is the same map as W' = diag(g) W, b' = g ⊙ b (``merged``: what a layer adapted by
weight substitution, e.g. a convolution, computes with).
On a convolution (peft: IA3 on nn.Conv2d / nn.Conv3d, ia3_l of shape (1, out, 1, 1[, 1])) g scales each output
channel, bias included: the same map on the flattened (out, in/groups·∏k) weight, for any stride, padding,
dilation and groups. peft's IA3 adapts no nn.Conv1d; such a layer is refused by load_peft / save_peft.
Identity at init: g = 1.
The input-side form used for feed-forward down-projections is ``ia3_ff``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter, never_random
from . import _arithmetic, _padding

# the variant contract; other names are shared helpers
__all__ = [
    "MERGE",
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "IA3Config",
    "apply",
    "init",
    "merged",
    "pad",
    "random_init",
    "shapes",
]
NAME = "ia3"
TRAINABLE = frozenset({"g"})  # leaves an optimizer updates
MERGE = _arithmetic.GAIN  # adapter arithmetic (merge_adapters): g = Σ w_i g_i

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


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(diag(g) W, g ⊙ b): the dense layer ``apply`` computes (peft's IA3 merge: rows and bias scaled)."""
    g = params["g"]  # (o,)
    return W * g[:, None], None if b is None else b * g


# ----------------------------------------------------------------------------- peft: the IA3 type
# One tensor per targeted module, ia3_l: (d_out, 1) for this output-side form, (1, d_in) for the layers in
# feedforward_modules (lite_fn's ia3_ff); on an nn.Conv2d / nn.Conv3d (1, out_channels, 1, 1[, 1]) and
# (1, in_channels, 1, 1[, 1]).
def is_feedforward(cfg: PeftConfig, path: str) -> bool:
    """peft IA3's _check_target_module_feedforward (note: a plain endswith, no dot)."""
    ff = cfg.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(t) for t in ff)


def conv_dims(layer: PeftLayer, who: str) -> int:
    """The kernel's number of dimensions of a convolution target (2 or 3), 0 for any other layer; a ValueError for
    an nn.Conv1d, which peft's IA3 does not adapt (its _create_new_module refuses it)."""
    if layer.kind != "Conv":
        return 0
    nd = len(layer.stored) - 2
    if nd not in (2, 3):
        raise ValueError(
            f"{who}: {layer.path!r} is an nn.Conv{nd}d, but peft's IA3 adapts nn.Linear, transformers' Conv1D, "
            f"nn.Conv2d and nn.Conv3d only (peft refuses to adapt it); leave it out of the adapter"
        )
    return nd


def conv_vector(g: Tensor, nd: int) -> Tensor:
    """A gain vector (c,) as peft's conv ia3_l (1, c, 1, …): one trailing 1 per kernel dimension."""
    return g.reshape(1, -1, *([1] * nd))


def peft_gain(cfg: PeftConfig, layer: PeftLayer, feedforward: bool) -> dict[str, Tensor]:
    """g of one (non-convolution, or output-side convolution) layer of a peft IA3 file, checked against the side
    feedforward_modules gives it."""
    g, W = layer.tensors["ia3_l"], layer.W
    nd = conv_dims(layer, cfg.where)
    if nd:
        want = (1, W.shape[0], *([1] * nd))
    else:
        want = (1, W.shape[1]) if feedforward else (W.shape[0], 1)
    if tuple(g.shape) != want:
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.ia3_l has shape {tuple(g.shape)}, but {layer.path!r} is "
            f"{'' if feedforward else 'not '}in feedforward_modules={cfg.get('feedforward_modules')!r}, "
            f"so peft expects {want}"
        )
    return {"g": g.reshape(-1)}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    g, nd = leaves["g"].detach(), conv_dims(layer, "save_peft")
    return {"ia3_l": conv_vector(g, nd) if nd else g.reshape(-1, 1)}, {"feedforward": False}


class _Fields:  # a PeftConfig over the fields being written, for is_feedforward
    def __init__(self, fields: dict):
        self.fields = fields

    def get(self, field: str, default=None):
        return self.fields.get(field, default)


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    ff = sorted(layer.path for layer, f in zip(layers, facts) if f["feedforward"])
    cfg = {
        "exclude_modules": None,
        "fan_in_fan_out": any(layer.kind == "Conv1D" for layer in layers),
        "feedforward_modules": ff,
    }
    selected = sorted(layer.path for layer in layers if is_feedforward(_Fields(cfg), layer.path))  # type: ignore[arg-type]
    if selected != ff:  # peft's plain endswith selects more than these: name them exactly
        cfg["feedforward_modules"] = "(" + "|".join(re.escape(p) for p in ff) + ")" if ff else []
    return cfg


PEFT_IA3 = PeftFormat(
    peft_type="IA3",
    suffixes=("ia3_l",),
    fields=frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out"}),
    ignores=frozenset({"init_ia3_weights"}),  # the file overrides the initial values
    kinds=frozenset({"nn.Linear", "Conv1D", "Conv", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt"}),
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_IA3,
    claims=lambda cfg, path: not is_feedforward(cfg, path),
    tensors=lambda cfg, layer: ("ia3_l",),
    read=lambda cfg, layer: peft_gain(cfg, layer, feedforward=False),
    write=_peft_write,
)
