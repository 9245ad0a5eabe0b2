"""Which modules can carry an adapter, and how to read their (d_out, d_in) weight and bias.

Adding a layer type is one entry here; nothing else in the runtime knows about layer types.
"""
from __future__ import annotations

from torch import Tensor, nn


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (y = x W + b, weight stored (d_in, d_out)); matched by duck type
    # so that transformers stays a test-only dependency.
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


# (predicate, weight as (d_out, d_in), name of the stored weight, how a dense (d_out, d_in) is stored)
_KINDS = (
    (lambda m: isinstance(m, nn.Linear), lambda m: m.weight, lambda W: W),
    (_is_conv1d, lambda m: m.weight.T, lambda W: W.T),
)


def _kind(m: nn.Module, path: str):
    for kind in _KINDS:
        if kind[0](m):
            return kind
    raise TypeError(
        f"module {path!r} is a {type(m).__name__}; lite_fn adapts nn.Linear and transformers' Conv1D only — "
        f"narrow `targets` so it matches linear layers (e.g. r'(q_proj|v_proj)$')"
    )


def is_adaptable(m: nn.Module) -> bool:
    return any(kind[0](m) for kind in _KINDS)


def weight_bias(m: nn.Module, path: str) -> tuple[Tensor, Tensor | None]:
    """(W (d_out, d_in), b or None) as the module currently holds them (functional_call swaps included)."""
    return _kind(m, path)[1](m), getattr(m, "bias", None)


def stored_weight(m: nn.Module, path: str, W: Tensor) -> Tensor:
    """A dense (d_out, d_in) weight laid out as this module stores it."""
    return _kind(m, path)[2](W)
