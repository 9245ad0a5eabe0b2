"""The variant registry: one module per variant, discovered from this package.

A variant module defines
    NAME: str                               # the key under params[module_path]
    Config                                  # frozen dataclass with ``variant_name: ClassVar[str] = NAME``
    init(key, W, cfg, stat=None) -> dict    # pure; same key -> bit-identical params
    apply(params, W, x, b=None) -> Tensor   # pure; no config; linear in x
and optionally
    RANDOM_INIT: bool = True                # False when init draws no random numbers
    random_init(cfg) -> bool                # the same, when it depends on the config (PiSSA's niter)
    STEERING_LEAF: str                      # a scalar leaf that lf.with_alpha sets (AntiPaSTO)
and, when its init is data-driven,
    stat(cfg, W) -> Stat                    # a streaming input statistic (see lite_fn.calibration)
    plan(stats, cfgs) -> cfgs               # optional cross-layer step (EVA's rank budget)

The runtime looks variants up here by ``cfg.variant_name`` and never branches on a name.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

REGISTRY: dict[str, ModuleType] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _mod = importlib.import_module(f"{__name__}.{_info.name}")
    REGISTRY[_mod.NAME] = _mod


def get(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise KeyError(f"unknown variant {name!r}; known variants: {sorted(REGISTRY)}")
    return REGISTRY[name]


def module_for(cfg) -> ModuleType:
    name = getattr(type(cfg), "variant_name", None)
    if name is None:
        raise TypeError(f"{cfg!r} is not a lite_fn config; use one of lite_fn.LoRAConfig, DoRAConfig, … (variants: {sorted(REGISTRY)})")
    return get(name)


def merge(mod: ModuleType, params: dict, W, b=None):
    """Dense (W', b') with apply(params, W, x, b) == x W'ᵀ + b' for all x.

    Every variant is affine in x, so W'ᵀ = apply(·, I) − apply(·, 0) and b' = apply(·, 0):
    one exact rule for all variants instead of ten hand-written materialisations.
    """
    import torch

    d_in = W.shape[-1]
    eye = torch.eye(d_in, dtype=W.dtype, device=W.device)
    b_new = mod.apply(params, W, torch.zeros(1, d_in, dtype=W.dtype, device=W.device), b)[0]
    W_new = (mod.apply(params, W, eye, b) - b_new).transpose(-1, -2)
    return W_new, (b_new if b is not None else None)  # with b=None, apply(·, 0) is exactly 0
