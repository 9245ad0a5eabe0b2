"""The variant contract as types — its one description: what a variant, a calibration statistic and a
variant's peft mapping provide.

A variant is anything with the members of ``Variant`` (required) and of ``VariantSpec`` (optional) —
one module per variant under ``lite_fn/variants/``, or a user's own module or object registered with
``lf.register_variant``. The registry turns it into a ``VariantSpec`` whose optional hooks are
``None`` when absent, so the runtime asks "is there a statistic?" as ``spec.stat is not None``,
never with ``hasattr``; nothing outside ``lite_fn/variants/`` branches on a variant's name.

A variant that peft can also express carries its mapping as ``PEFT = PeftCodec(...)``: which peft type
it reads and writes (a ``PeftFormat``, owned by the variant file that defines that type: LORA by
``lora.py``), how one layer's stored tensors become its leaves and back. The peft room
(``lite_fn/peft_io``) loops over the registry and knows no variant by name.

A variant whose adapters combine arithmetically (peft's ``add_weighted_adapter``) declares how as
``MERGE = MergeRule(...)``: the combination types it supports and how n adapters' leaves at one layer
become one adapter's (the shared rules live in ``lite_fn/variants/_arithmetic.py``). ``lite_fn.merging``
looks the rule up by the layer's variant and knows no variant, nor its leaves, by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
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


# ----------------------------------------------------------------------------- peft mapping (optional)
class PeftConfig(Protocol):
    """What a codec reads of a peft ``adapter_config.json`` (the peft room implements it)."""

    fields: Mapping[str, Any]  # the JSON object as stored
    where: str  # "peft config '<file>'", for messages
    file: str  # the weights file, for messages
    dims: Mapping[str, tuple[int, int]]  # (d_out, d_in) of every module the config targets (VeRA sizes its projections)

    def get(self, field: str, default: Any = None) -> Any: ...

    def per_path(self, pattern: str, field: str, default: Any, path: str) -> Any:
        """``fields[pattern]``'s value for ``path`` under peft's get_pattern_key (e.g. rank_pattern), else
        ``fields[field]`` (e.g. r), else ``default``."""
        ...

    def rank(self, path: str, found: int, what: str) -> int:
        """``found`` (a stored tensor's rank) if it equals the config's rank for ``path`` (rank_pattern,
        else r), else a ValueError naming both."""
        ...


class PeftWriter(Protocol):
    """What a format's ``config`` may use when writing (the peft room implements it)."""

    def pattern(self, wanted: Mapping[str, Any], default: Any) -> dict[str, Any]:
        """A peft ``*_pattern`` dict giving ``wanted[path]`` for every path, ``default`` elsewhere."""
        ...

    def number(self, x: float) -> float | int:
        """``x`` as the config number a float32 leaf came from (7 significant digits; int when integral)."""
        ...


class PeftLayer(NamedTuple):
    """One targeted module, as a codec reads or writes it."""

    path: str  # the module path in the model
    kind: str  # the layer kind's name (lite_fn._layers: "nn.Linear", "Conv1D", "Conv", "Embedding", "parameter", …)
    W: Tensor  # its weight as (d_out, d_in)
    tensors: dict[str, Tensor]  # reading: the stored tensors by suffix ("lora_A.weight", …); writing: {}
    module: Any = None  # the targeted module (a convolution's kernel size, groups, …), or a raw parameter's owner
    stored: tuple[int, ...] = ()  # the adapted weight's shape as the module stores it ((out, in/groups, *k) for a conv)


@dataclass(frozen=True)
class PeftFormat:
    """One peft type's on-disk form: its config fields and tensor names, shared by the variants that read
    or write it (defined once, in the file of the variant the type is named after).

    ``fields``: the config fields this type's codecs read; ``ignores``: fields that do not change what
    the adapter computes in eval mode (training-only, or initial values the file overrides); ``refuses``:
    fields that lite_fn cannot reproduce when set, with the reason. Any other set field is refused too
    (a newer peft). ``check(cfg)`` validates the whole config at load; ``config(layers, facts, writer)``
    gives the type's config fields for the layers a save writes (``facts``: what each codec's ``write``
    reported per layer). ``shared``: tensors stored once per file at model level, as
    ``base_model.<name>`` (no module path; VeRA's vera_A, vera_B): reading, each is in every layer's
    ``tensors`` under its name (so a codec's ``tensors(cfg, layer)`` lists it when the file must hold it);
    writing, ``shared_tensors(layers, facts)`` gives them."""

    peft_type: str  # "LORA"; "" for a variant written beside any type's adapter (full copies: modules_to_save, bias="all")
    suffixes: tuple[str, ...]  # every tensor-name suffix a file of this type may hold
    fields: frozenset[str]
    config: Callable[[list[PeftLayer], list[dict], PeftWriter], dict]
    ignores: frozenset[str] = frozenset()
    refuses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # stored suffix -> the name codecs see
    refuses_kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)  # layer kind -> why peft cannot adapt it
    # the lite_fn layer kinds (``_layers`` names) this type's codecs read and write; any other is refused both ways
    kinds: frozenset[str] = frozenset({"nn.Linear", "Conv1D", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt"})
    check: Callable[[PeftConfig], object] = lambda cfg: None  # raises on a config it refuses; the result is unused
    shared: tuple[str, ...] = ()  # model-level tensor names ("base_model.<name>" in the file)
    shared_tensors: Callable[[list[PeftLayer], list[dict]], dict[str, Tensor]] = lambda layers, facts: {}


@dataclass(frozen=True)
class PeftCodec:
    """A variant's peft mapping (its optional ``PEFT`` member).

    ``claims(cfg, path)``: whether this variant is what a layer of such a file loads as (exactly one
    registered codec of the type must claim each layer); ``None`` for a variant that peft writes but
    never reads back as itself (EVA, AntiPaSTO: written as LoRA). ``tensors(cfg, layer)``: the suffixes that
    layer holds, exactly. ``read(cfg, layer)``: the stored tensors -> leaves (any dtype: the room
    casts them to the layer weight's). ``write(leaves, layer)``: leaves -> (tensors by suffix, facts
    for the format's ``config``). Variants with the same ``format`` and ``group`` can share one file."""

    format: PeftFormat
    write: Callable[[Leaves, PeftLayer], tuple[dict[str, Tensor], dict]]
    group: str = ""  # default: format.peft_type
    claims: Callable[[PeftConfig, str], bool] | None = None
    tensors: Callable[[PeftConfig, PeftLayer], tuple[str, ...]] = lambda cfg, layer: ()
    read: Callable[[PeftConfig, PeftLayer], Leaves] | None = None

    @property
    def label(self) -> str:
        return self.group or self.format.peft_type


# ----------------------------------------------------------------------------- adapter arithmetic (optional)
MergePresent = list[tuple[int, Leaves]]  # (adapter index, its detached leaves) for the adapters that target one layer


@dataclass(frozen=True)
class MergeOptions:
    """One ``merge_adapters`` call's options, checked (by ``lite_fn.merging``), as a ``MergeRule``'s ``merge`` gets them."""

    method: str  # peft's combination_type ("linear", "cat", "svd", "ties_svd", …); "linear" for one adapter
    combiner: str  # the method's combiner of task tensors ("linear", "ties", "dare_linear", …); "" for cat
    svd: bool  # the combined update is factored by a truncated SVD
    density: float | None  # the fraction of entries ties, dare_* and magnitude_prune* keep
    sign: str  # TIES' sign election: "total" | "frequency"
    rank: int  # svd's rank k before the cap at min(d_out, d_in)
    clamp: float | None  # svd_clamp: the quantile at which the svd factors are clamped
    full_matrices: bool  # torch.linalg.svd's full_matrices
    driver: str | None  # torch.linalg.svd's driver
    key: int | None  # DARE's seed (an int), None without dare_*
    n: int  # how many adapters are merged
    floor: torch.dtype  # the leaves' math runs in at least this dtype (float32 for plain-number weights)


@dataclass(frozen=True)
class MergeRule:
    """A variant's adapter arithmetic (its optional ``MERGE`` member), for ``lite_fn.merging.merge_adapters``.

    ``methods``: the combination types it supports, of ``lite_fn.merging.METHODS`` (peft's combination_type
    values; ``("linear",)`` for one that only adds). ``check(path, name, present)``: raises ValueError naming
    ``adapters[i][path][name]`` and the fix unless every present adapter's leaves are ones this rule combines,
    unstacked, and agree in shape across the adapters; the result is unused. ``merge(path, present, w, opts)``:
    the merged layer's leaves (in the first present adapter's dtype) from the present adapters' leaves and all
    ``opts.n`` weights ``w`` (a 1-D tensor, possibly vmapped or gradient-tracking: the result must be a
    function of it under torch.func.vmap and autograd); an adapter absent from ``present`` counts as the
    variant's identity. ``what``: the leaves it combines, for messages ("low-rank leaves ['A', 'B', 'scale']").
    ``rank(leaves)``: one adapter's rank at a layer (the default svd_rank), for rules that have one."""

    methods: tuple[str, ...]
    check: Callable[[str, str, MergePresent], object]
    merge: Callable[[str, MergePresent, Tensor, MergeOptions], Leaves]
    what: str
    rank: Callable[[Leaves], int] | None = None


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
        plan(stats, cfgs, dims) -> cfgs  a cross-layer step before init, after calibration if any (stats is
                                         empty without a statistic): EVA's rank budget, VeRA's shared
                                         projection shape
        pad(path, present, K, own)       lf.stack(pad=True): leaves for all K adapters, equal in shape
        apply_runs(params, W, x, b)      K adapters (leaves with a leading axis K) on x (K, m..., d_in) at
                                         once, equal to vmap(apply) over that axis: a routed call's fast
                                         path when its examples come in equal runs, one adapter per run
        prepare(layers) -> layers        per call, before the forward: {path: leaves} of all this variant's
                                         layers -> the leaves ``apply`` gets (may add derived leaves, e.g.
                                         per-call weight math done for all layers at once); ``apply``
                                         must give the same result with or without them (lf.applied
                                         skips it: its block runs many forwards while leaves may change)
        apply_input(params, x) -> x'     for a variant with apply(params, W, x, b) == F.linear(apply_input(params, x),
                                         W, b) (it only transforms the input: OFT, IA3-FF): when adapters act around
                                         the layer's own call, the layer then runs once, on x'
        merged(params, W, b) -> (W', b') the dense merged weight and bias, x W'ᵀ + b' == apply(params, W, x, b),
                                         computed in the adapter's own form (faster than the identity rule
                                         ``variants.dense_weights`` uses without it): layers adapted by
                                         weight substitution (convolutions, embeddings, raw parameters) and
                                         lf.merge use it
        PEFT: PeftCodec                  the variant's peft mapping (lf.load_peft / lf.save_peft)
        MERGE: MergeRule                 the variant's adapter arithmetic (lite_fn.merging.merge_adapters)
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
    apply_input: Callable[[Leaves, Tensor], Tensor] | None = None
    merged: Callable[..., tuple[Tensor, Tensor | None]] | None = None
    PEFT: PeftCodec | None = None
    MERGE: MergeRule | None = None
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
        for member, kind, what in (("PEFT", PeftCodec, "its peft mapping"), ("MERGE", MergeRule, "its adapter arithmetic")):
            value = getattr(variant, member, None)
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"{variant.NAME}: {member} must be a lite_fn._contract.{kind.__name__} ({what}), got {type(value).__name__}"
                )
        optional = {
            k: getattr(variant, k)
            for k in (
                "STEERING_LEAF",
                "random_init",
                "stat",
                "plan",
                "pad",
                "apply_runs",
                "prepare",
                "apply_input",
                "merged",
                "PEFT",
                "MERGE",
            )
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
