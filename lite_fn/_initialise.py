"""Fresh adapter params for the targeted layers (what ``lf.init`` returns): each layer's weight read,
calibration statistics collected for data-driven variants, and the variant's ``init`` run per layer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

from . import _base, _keys, _layers, _targets, variants
from .calibration import collect as collect_statistics
from .trees import Params, declared


def initial_params(
    key: _keys.Key,
    model: nn.Module,
    cfg,
    targets: str | Sequence[str] | None,
    calibration: Iterable | None,
    *,
    progress: bool | None,
    max_batches: int | None,
    base: Mapping[str, Tensor] | None,
) -> Params:
    """The params tree of ``lf.init`` (its arguments, its checks and its errors)."""
    variant = variants.module_for(cfg)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches <= 0):
        raise ValueError(f"max_batches={max_batches!r} must be a positive int (or None for all of the calibration data)")
    swap, _ = _base.swap_map(model, base, freeze=True)
    modules = dict(model.named_modules())
    paths = _targets.select(model, targets)
    weights = {p: _layers.values(_layers.weight_view(modules[p], _layers.kind_of(modules[p], p), swap)).detach() for p in paths}
    meta = [p for p, W in weights.items() if W.is_meta]
    if meta:
        raise ValueError(
            f"the weights of {meta[:3]}{' …' if len(meta) > 3 else ''} are on the meta device (a skeleton or an "
            f"offloaded model): pass the weights with base={{name: tensor}} so init can read their values"
        )
    cfgs = {p: cfg for p in paths}

    stats = {}
    if variant.stat is not None:
        stats = {p: variant.stat(cfg, weights[p]) for p in paths}
        stats = {p: s for p, s in stats.items() if s is not None}
    if stats:
        if calibration is None:
            raise ValueError(
                f"{type(cfg).__name__} initialises from data: pass calibration=<iterable of model inputs> to lf.init"
            )
        collect_statistics(model, stats, calibration, progress=progress, max_batches=max_batches, base=base)
    elif calibration is not None:  # never ignore data the caller thought was used
        raise ValueError(
            f"{cfg!r} does not use calibration data; drop calibration=… (or use a data-driven config, "
            f"e.g. EVAConfig or AntiPaSTOConfig(select='data'))"
        )
    if variant.plan is not None:  # cross-layer: EVA's rank budget (from its statistics), VeRA's projection shape
        cfgs = variant.plan(stats, cfgs, {p: tuple(W.shape) for p, W in weights.items()})

    out: Params = {}
    for p in paths:
        if cfgs.get(p) is None:  # a plan may give a layer no adapter (e.g. EVA rank 0)
            continue
        leaves = variant.init(_keys.fold_in(key, p), weights[p], cfgs[p], stats.get(p))
        out[p] = {variant.NAME: {k: _owning_contiguous(v) for k, v in leaves.items()}}
    return declared(out)


def _owning_contiguous(v: Tensor) -> Tensor:
    # a view (e.g. a transposed SVD factor) would save and reload with another layout, and give
    # outputs that differ in the last bit; every returned leaf owns contiguous memory
    return v if v.is_contiguous() else v.detach().contiguous().requires_grad_(v.requires_grad)
