"""The variant registry: one module per variant, discovered from this package, plus any variant a
user registers with ``lf.register_variant``.

The contract a variant meets is described once, in ``lite_fn._contract`` (``Variant``: the required
members; ``VariantSpec``: the optional hooks; ``PeftCodec`` / ``PeftFormat``: its peft mapping). The
registry holds a ``VariantSpec`` per name (absent hooks are ``None``); the runtime looks variants up
here by ``cfg.variant_name`` and never branches on a name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .._contract import VariantSpec

REGISTRY: dict[str, VariantSpec] = {}


def register(variant: Any, *, replace: bool = False) -> VariantSpec:
    """Register a variant (a module or object meeting ``lite_fn._contract.Variant``) under its NAME.

    Args:
        variant: the variant; its ``Config.variant_name`` must equal its ``NAME``.
        replace: allow replacing a registered variant of the same NAME.
    Returns:
        The registered ``VariantSpec``.
    Raises:
        TypeError / ValueError naming a missing member or a bad NAME; ValueError when NAME is taken.

    Example:
        >>> import types, dataclasses, typing, torch, lite_fn as lf
        >>> @dataclasses.dataclass(frozen=True)
        ... class BiasShiftConfig:
        ...     variant_name: typing.ClassVar[str] = "bias_shift"
        >>> shift = types.SimpleNamespace(
        ...     NAME="bias_shift", TRAINABLE=frozenset({"d"}), Config=BiasShiftConfig,
        ...     init=lambda key, W, cfg, stat=None: {"d": torch.zeros(W.shape[0], requires_grad=True)},
        ...     apply=lambda params, W, x, b=None: torch.nn.functional.linear(x, W, b) + params["d"],
        ...     shapes=lambda leaves, d_out, d_in: {"d": (d_out,)})
        >>> spec = lf.register_variant(shift)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> p = lf.init(0, model, BiasShiftConfig())
        >>> torch.equal(lf.call(model, p, torch.ones(1, 4)), model(torch.ones(1, 4)))
        True
        >>> _ = lf.REGISTRY.pop("bias_shift")
    """
    spec = VariantSpec.of(variant)
    if spec.NAME in REGISTRY and not replace and REGISTRY[spec.NAME].source is not spec.source:
        raise ValueError(f"a variant named {spec.NAME!r} is already registered; pick another NAME or pass replace=True")
    REGISTRY[spec.NAME] = spec
    return spec


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        register(importlib.import_module(f"{__name__}.{_info.name}"))


def get(name: str) -> VariantSpec:
    if name not in REGISTRY:
        raise KeyError(
            f"unknown variant {name!r}; known variants: {sorted(REGISTRY)} (register your own with lf.register_variant)"
        )
    return REGISTRY[name]


def module_for(cfg) -> VariantSpec:
    name = getattr(type(cfg), "variant_name", None)
    if name is None:
        raise TypeError(
            f"{cfg!r} is not a lite_fn config; use one of lite_fn.LoRAConfig, DoRAConfig, … (variants: {sorted(REGISTRY)})"
        )
    return get(name)


def dense_weights(variant: VariantSpec, params: dict, W, b=None):
    """One layer's dense (W', b') with apply(params, W, x, b) == x W'ᵀ + b' for all x (``lf.merge`` does
    this for every targeted layer of a model).

    Every variant is affine in x, so W'ᵀ = apply(·, I) − apply(·, 0) and b' = apply(·, 0):
    one exact rule for all variants instead of ten hand-written materialisations.
    """
    import torch

    d_in = W.shape[-1]
    eye = torch.eye(d_in, dtype=W.dtype, device=W.device)
    b_new = variant.apply(params, W, torch.zeros(1, d_in, dtype=W.dtype, device=W.device), b)[0]
    W_new = (variant.apply(params, W, eye, b) - b_new).transpose(-1, -2)
    if b is None:  # a layer without a bias: the variant must add no constant, or W' alone would drop it
        if not torch._C._are_functorch_transforms_active() and bool(b_new.ne(0).any()):  # pyright: ignore[reportAttributeAccessIssue]
            raise ValueError(
                f"variant {variant.NAME!r} adds a constant (a bias) on a layer that has none, which a merged weight "
                f"cannot hold; merge it into a layer with a bias, or give the variant a `merged` hook that says how"
            )
        return W_new, None
    return W_new, b_new


def merged_weights(variant: VariantSpec, params: dict, W, b=None):
    """``dense_weights`` through the variant's own ``merged`` hook when it has one (W' in the adapter's own
    factored form, e.g. W + s·B A: O(r·d_out·d_in) instead of the identity rule's O(d_in²·d_out)); a 3-D W
    (E experts' matrices, leaves with a leading E) gives E merged matrices."""
    import torch

    if W.ndim == 3:
        return torch.func.vmap(lambda p, w: merged_weights(variant, p, w, None)[0], randomness="error")(params, W), b
    if variant.merged is not None:
        return variant.merged(params, W, b)
    return dense_weights(variant, params, W, b)
