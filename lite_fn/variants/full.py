"""A full copy of a layer's weight (and bias): peft's ``modules_to_save`` and trained biases (``bias="all"``).

    y = x W'ᵀ + b',      W' = weight,   b' = bias if given, else the layer's own b

    weight (d_out, d_in) = W (a copy of the layer's dense weight view);   trainable
    bias   (d_out,)      = the layer's bias, only when given;             trainable

No low-rank structure: the leaves *are* the layer's weight and bias, trained in place of the frozen ones (the
model itself stays untouched and shared; K such adapters cost K dense copies). Either leaf may be absent: without
``weight`` the layer's own W is used (a trained bias alone: peft's ``bias="all"``), without ``bias`` its own b.
The weight is the layer's dense (d_out, d_in) view (a convolution's (out, in/groups·∏k), an embedding's
(dim, vocab) = Wᵀ, a 3-D parameter's (E, d_out, d_in) — one copy per expert), so the leaf works on every layer
kind by weight substitution and on linear layers by their own op.

Identity at init: weight = W exactly. ``init`` sees only W, never the bias, so ``lf.init`` gives a weight leaf
alone; to train a bias too, add its copy by hand (``params[path]["full"]["bias"] =
module.bias.detach().clone().requires_grad_()``); ``lf.load_peft`` gives one wherever the file holds a bias.

peft: the variant has no peft type of its own (its format's ``peft_type`` is empty): ``lf.save_peft`` writes its
layers next to any type's adapter, as ``modules_to_save`` copies of their modules (``<module>.<param>`` tensors:
what peft's ModulesToSaveWrapper saves) and, for a bias alone, as ``bias="all"`` entries (``<module>.bias``);
``lf.load_peft`` reads both back as this variant. The room (``lite_fn.peft_io``) hands the codec the tensors by
role, ``weight`` in the dense view and ``bias``, and stores them back in the module's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, never_random

__all__ = ["NAME", "PEFT", "TRAINABLE", "Config", "FullConfig", "apply", "init", "merged", "random_init", "shapes"]
NAME = "full"
TRAINABLE = frozenset({"weight", "bias"})  # leaves an optimizer updates

random_init = never_random  # init copies W: no random numbers


@dataclass(frozen=True)
class FullConfig:
    """A trainable full copy of each targeted layer's weight (peft's ``modules_to_save``)."""

    variant_name: ClassVar[str] = NAME


Config = FullConfig


def init(key: _keys.Key, W: Tensor, cfg: FullConfig, statistic=None) -> dict[str, Tensor]:
    _checks.check_weight(W, "full.init")
    return {"weight": W.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)}


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """weight (d_out, d_in) and / or bias (d_out,), as given; with neither, the weight is expected."""
    out: dict[str, tuple[int, ...]] = {}
    if "weight" in leaves or "bias" not in leaves:
        out["weight"] = (d_out, d_in)
    if "bias" in leaves:
        out["bias"] = (d_out,)
    return out


def _no_bias_to_replace(W: Tensor) -> ValueError:
    return ValueError(
        f"full: a layer with weight {tuple(W.shape)} and no bias has a 'bias' leaf: a full copy holds what the layer "
        f"has (its weight, and its bias when it has one); drop the leaf, or give the layer a bias of its own"
    )


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(weight, bias): the leaves themselves, the layer's own W and b where a leaf is absent."""
    if "bias" in params and b is None:
        raise _no_bias_to_replace(W)
    return params.get("weight", W), params.get("bias", b)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "full.apply")
    W_new, b_new = merged(params, W, b)
    return torch.nn.functional.linear(x, W_new, b_new)


# ----------------------------------------------------------------------------- peft: modules_to_save / bias="all"
# No peft type: the room writes these layers beside the adapter of any type (``peft_type=""``), as the full module
# copies peft's modules_to_save holds, or a trained bias (bias="all"). Tensors by role: "weight" as the dense
# (d_out, d_in) view, "bias"; the room converts from and to the module's stored layout and names.
def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    return {role: t for role, t in layer.tensors.items() if role in ("weight", "bias")}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    return {k: v.detach() for k, v in leaves.items()}, {}


PEFT_ASIDE = PeftFormat(
    peft_type="",  # no type of its own: written next to any type's adapter
    suffixes=("weight", "bias"),
    fields=frozenset({"modules_to_save", "bias"}),
    config=lambda layers, facts, writer: {},
    # packed quantized layers (bitsandbytes) are not among them: peft's copy of one holds its packed weight and state
    kinds=frozenset(
        {
            "nn.Linear",
            "Conv1D",
            "Conv",
            "Embedding",
            "MultiheadAttention",
            "nn.Linear subclass",
            "Linear (used by its parent)",
            "parameter",
        }
    ),
)

PEFT = PeftCodec(
    format=PEFT_ASIDE,
    claims=lambda cfg, path: True,
    tensors=lambda cfg, layer: tuple(layer.tensors),
    read=_peft_read,
    write=_peft_write,
)
