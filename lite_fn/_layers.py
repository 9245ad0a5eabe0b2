"""Which modules can carry an adapter: one ``LayerKind`` entry per layer type.

A kind says how to recognise the module, which torch function its forward computes its frozen
product with (the injection in ``_inject`` intercepts exactly that function when the module's
*current* weight reaches it), how to read the input and bias from that function's arguments, and
how a dense (d_out, d_in) weight relates to the stored one. Adding a layer type is one entry here;
nothing else in the library knows about layer types.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


class LayerKind(NamedTuple):
    name: str
    matches: Callable[[nn.Module], bool]
    op: Callable[..., Any]  # the torch function the module's forward calls with its weight
    weight_arg: int  # position of the stored weight in ``op``'s arguments
    unpack: Callable[[tuple, dict], tuple[Tensor, Tensor | None] | None]  # (x, bias) or None: not a plain call
    dense: Callable[[Tensor], Tensor]  # stored weight -> (d_out, d_in)
    store: Callable[[Tensor], Tensor]  # (d_out, d_in) -> stored layout


def _is_plain_linear(m: nn.Module) -> bool:
    # A subclass that overrides forward (bitsandbytes' Linear4bit/Linear8bitLt, whose weight is
    # packed) computes something else than F.linear(x, weight): it is not this kind.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (y = x W + b, weight stored (d_in, d_out)); matched by duck type
    # so that transformers stays a test-only dependency.
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


def _linear_args(args: tuple, kwargs: dict):
    x = args[0] if args else kwargs.get("input")
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, b


def _addmm_args(args: tuple, kwargs: dict):
    # Conv1D.forward: torch.addmm(bias, x.view(-1, d_in), weight); any beta/alpha is not Conv1D's product
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        return None
    return args[1], args[0]


KINDS: tuple[LayerKind, ...] = (
    LayerKind("nn.Linear", _is_plain_linear, torch.nn.functional.linear, 1, _linear_args, lambda w: w, lambda W: W),
    LayerKind("Conv1D", _is_conv1d, torch.addmm, 2, _addmm_args, lambda w: w.T, lambda W: W.T),
)


def kind_of(module: nn.Module, path: str) -> LayerKind:
    for kind in KINDS:
        if kind.matches(module):
            return kind
    if isinstance(module, nn.Linear):
        raise TypeError(
            f"module {path!r} is a {type(module).__module__}.{type(module).__name__}, an nn.Linear subclass with its own "
            f"forward (e.g. a quantized layer whose weight is packed); lite_fn cannot adapt it exactly — exclude it from "
            f"`targets` or load the model without quantization")
    raise TypeError(
        f"module {path!r} is a {type(module).__name__}; lite_fn adapts nn.Linear and transformers' Conv1D only — "
        f"narrow `targets` so it matches linear layers (e.g. r'(q_proj|v_proj)$')"
    )


def is_adaptable(module: nn.Module) -> bool:
    return any(kind.matches(module) for kind in KINDS)


def stored_weight(module: nn.Module) -> Tensor:
    """The weight tensor the module holds right now (FSDP2 and offload hooks swap it during forward)."""
    return module.weight


def weight_bias(module: nn.Module, path: str) -> tuple[Tensor, Tensor | None]:
    """(W (d_out, d_in), b or None) as the module currently holds them."""
    return kind_of(module, path).dense(module.weight), getattr(module, "bias", None)
