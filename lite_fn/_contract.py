"""The variant contract as types: what a variant and a calibration statistic provide.

A variant is anything with these members — one module per variant under ``lite_fn/variants/``, or a
user's own module or object registered with ``lf.register_variant``. The registry turns it into a
``VariantSpec`` whose optional hooks are ``None`` when absent, so the runtime asks "is there a
statistic?" as ``spec.stat is not None``, never with ``hasattr``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

Leaves = dict[str, Tensor]
Shapes = dict[str, tuple[int, ...]]


@runtime_checkable
class Stat(Protocol):
    """A streaming statistic of one layer's inputs (EVA's PCA, AntiPaSTO's data-aware scores)."""

    tokens: int  # rows seen so far
    converged: bool  # True once more data would not change the result (calibration may stop)
    share_key: Any  # layers fed the identical input tensor share one statistic when their keys are equal; None: never

    def update(self, x: Tensor) -> None: ...

    @property
    def nbytes(self) -> int: ...


@runtime_checkable
class Variant(Protocol):
    """The required members of a variant (see ``lite_fn/variants/lora.py`` for one on a screen)."""

    NAME: str  # the key under params[module_path]
    TRAINABLE: frozenset[str]  # the leaves an optimizer updates; every other leaf is frozen
    Config: type  # a frozen dataclass with ``variant_name: ClassVar[str] = NAME``

    def init(self, key: Any, W: Tensor, cfg: Any, statistic: Stat | None = None) -> Leaves: ...

    def apply(self, params: Leaves, W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor: ...

    def shapes(self, leaves: Shapes, d_out: int, d_in: int) -> Shapes: ...


REQUIRED = ("NAME", "TRAINABLE", "Config", "init", "apply", "shapes")


def never_random(cfg: Any) -> bool:
    """``random_init`` of a variant whose init draws no random numbers: every key gives the same params."""
    return False


@dataclass(frozen=True)
class VariantSpec:
    """A registered variant: the required members, and the optional hooks (``None`` when absent).

    Optional hooks a variant may define:
        STEERING_LEAF: str               a scalar leaf that ``lf.with_alpha`` sets (AntiPaSTO's alpha)
        random_init(cfg) -> bool         whether init draws random numbers (default: True)
        stat(cfg, W) -> Stat | None      a calibration statistic, for data-driven inits
        plan(stats, cfgs, dims) -> cfgs  a cross-layer step after calibration (EVA's rank budget)
        pad(path, present, K, own)       lf.stack(pad=True): leaves for all K adapters, equal in shape
        apply_runs(params, W, x, b)      K adapters (leaves with a leading axis K) on x (K, m..., d_in) at
                                         once, equal to vmap(apply) over that axis: a routed call's fast
                                         path when its examples come in equal runs, one adapter per run
        prepare(layers) -> layers        per call, before the forward: {path: leaves} of all this variant's
                                         layers -> the leaves ``apply`` gets (may add derived leaves, e.g.
                                         per-call weight math done for all layers at once); ``apply``
                                         must give the same result with or without them (lf.applied
                                         skips it: its block runs many forwards while leaves may change)
    """

    NAME: str
    TRAINABLE: frozenset[str]
    Config: type
    init: Callable[..., Leaves]
    apply: Callable[..., Tensor]
    shapes: Callable[[Shapes, int, int], Shapes]
    STEERING_LEAF: str | None = None
    random_init: Callable[[Any], bool] = lambda cfg: True
    stat: Callable[[Any, Tensor], Stat | None] | None = None
    plan: Callable[[Mapping[str, Stat], dict, dict], dict] | None = None
    pad: Callable[[str, dict, int, Callable], dict] | None = None
    apply_runs: Callable[..., Tensor] | None = None
    prepare: Callable[[dict[str, Leaves]], dict[str, Leaves]] | None = None
    source: Any = None  # the module or object it was built from

    @classmethod
    def of(cls, variant: Any) -> VariantSpec:
        if isinstance(variant, VariantSpec):
            return variant
        missing = [m for m in REQUIRED if not hasattr(variant, m)]
        if missing:
            raise TypeError(
                f"{variant!r} is not a lite_fn variant: it lacks {missing} (a variant defines NAME, TRAINABLE, "
                f"Config, init(key, W, cfg, statistic=None), apply(params, W, x, b=None) and shapes(leaves, d_out, d_in))"
            )
        if not isinstance(variant.NAME, str) or not variant.NAME.isidentifier():
            raise ValueError(f"variant NAME={variant.NAME!r} must be an identifier-like string (e.g. 'my_lora')")
        if getattr(variant.Config, "variant_name", None) != variant.NAME:
            raise ValueError(
                f"{variant.NAME}: Config.variant_name is {getattr(variant.Config, 'variant_name', None)!r}; "
                f"declare `variant_name: ClassVar[str] = {variant.NAME!r}` on the config class"
            )
        trainable = variant.TRAINABLE
        if not isinstance(trainable, (set, frozenset)) or not all(isinstance(t, str) for t in trainable):
            raise TypeError(f"{variant.NAME}: TRAINABLE must be a frozenset of leaf names, got {trainable!r}")
        optional = {
            k: getattr(variant, k)
            for k in ("STEERING_LEAF", "random_init", "stat", "plan", "pad", "apply_runs", "prepare")
            if hasattr(variant, k)
        }
        return cls(
            NAME=variant.NAME,
            TRAINABLE=frozenset(trainable),
            Config=variant.Config,
            init=variant.init,
            apply=variant.apply,
            shapes=variant.shapes,
            source=variant,
            **optional,
        )
