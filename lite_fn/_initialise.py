"""Fresh adapter params for the targeted layers (what ``lf.init`` returns): each layer's weight read,
calibration statistics collected for data-driven variants, and the variant's ``init`` run per layer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import _base, _keys, _layers, _plan, _targets, variants
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
    paths = _targets.select(model, targets)
    layers = {p: _plan.resolve(model, p) for p in paths}
    weights = {p: _layers.values(_layers.weight_view(m, kind, swap)).detach() for p, (m, kind) in layers.items()}
    meta = [p for p, W in weights.items() if W.is_meta]
    if meta:
        raise ValueError(
            f"the weights of {meta[:3]}{' …' if len(meta) > 3 else ''} are on the meta device (a skeleton or an "
            f"offloaded model): pass the weights with base={{name: tensor}} so init can read their values"
        )
    cfgs = {p: cfg for p in paths}

    stats = {}
    if variant.stat is not None:
        stats = {p: variant.stat(cfg, weights[p] if weights[p].ndim == 2 else weights[p][0]) for p in paths}
        odd = [p for p in paths if stats[p] is not None and layers[p][1].substitute]
        if odd:
            raise ValueError(
                f"{type(cfg).__name__} initialises from the inputs of linear layers, but {odd[:3]} "
                f"{'are' if len(odd) > 1 else 'is a'} {layers[odd[0]][1].name} (adapted by weight substitution, whose "
                f"inputs are not rows of a matrix product); exclude them from `targets` or use a config without data"
            )
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
        cfgs = variant.plan(stats, cfgs, {p: tuple(W.shape[-2:]) for p, W in weights.items()})

    out: Params = {}
    for p in paths:
        if cfgs.get(p) is None:  # a plan may give a layer no adapter (e.g. EVA rank 0)
            continue
        k = _keys.fold_in(key, p)
        W = weights[p]
        if W.ndim == 3:  # E experts' matrices: one adapter each (key folded with the expert index), stacked
            each = [variant.init(_keys.fold_in(k, str(e)), W[e], cfgs[p]) for e in range(W.shape[0])]
            leaves = {n: torch.stack([t[n].detach() for t in each]).requires_grad_(each[0][n].requires_grad) for n in each[0]}
        else:
            leaves = variant.init(k, W, cfgs[p], stats.get(p))
        out[p] = {variant.NAME: {n: _owning_contiguous(v) for n, v in leaves.items()}}
    return declared(out)


def _owning_contiguous(v: Tensor) -> Tensor:
    # a view (e.g. a transposed SVD factor) would save and reload with another layout, and give
    # outputs that differ in the last bit; every returned leaf owns contiguous memory
    return v if v.is_contiguous() else v.detach().contiguous().requires_grad_(v.requires_grad)
