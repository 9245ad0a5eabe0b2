"""Streaming calibration: feed each targeted layer's input to its variant's statistic.

One pass over ``data`` (tensors, tuples or kwargs dicts), forward only, under no_grad. Memory
is the statistics' size (fixed by the layer widths), never the number of tokens. Layers that see
the identical input tensor (q/k/v) and whose statistics only depend on that input share one
statistic object, so the work is done once. Iteration stops early once every statistic
reports ``converged``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _base, _inject, _layers


def _run(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def collect(
    model: nn.Module, stats: dict, data: Iterable, *, progress: bool | None = None, max_batches: int | None = None, base=None
) -> dict:
    """Update ``stats[path]`` with the inputs the module at ``path`` receives; returns ``stats``
    (shared statistics replace their duplicates, so equal entries are the same object).

    The inputs are read by the same injection as ``lf.call`` (nothing is assigned to the model);
    ``base`` hands in the weights of a stateless model. ``progress``: a tqdm bar on stderr; None
    shows it only on a terminal, True always, False never."""
    swap, _ = _base.swap_map(model, base, freeze=True)
    total = max_batches if max_batches is not None else (len(data) if isinstance(data, Sized) else None)
    bar = tqdm(total=total, desc="lite_fn calibration", unit="batch", disable=None if progress is None else not progress)
    batch_no = 0
    # share_key -> (the last input tensor a statistic with that key took, its path). Holding the
    # tensor keeps its identity meaningful (no address reuse); q/k/v receive the same object.
    last: dict = {}

    def recorder(path):
        def handler(x, W, b, base_product):
            stat, key = stats[path], stats[path].share_key
            if key is not None and key in last and last[key][0] is x:
                stats[path] = stats[last[key][1]]  # same input as the previous layer: share its statistic
            elif not stat.converged:
                try:
                    stat.update(x.detach())
                except ValueError as e:
                    raise ValueError(f"calibration input to {path!r} (batch {batch_no}): {e}") from e
                if key is not None:
                    last[key] = (x, path)
            return base_product()

        return handler

    layers = []
    for path in stats:
        module = model.get_submodule(path)
        layers.append(_inject.Layer(path, module, _layers.kind_of(module, path), recorder(path)))
    with torch.no_grad():
        for batch in data:
            last.clear()
            with _inject.mode(layers, swap, True, detach_only=base is None) as m:
                _run(model, batch)
            missed = m.missed()
            if missed:
                raise _inject.missed_error(missed, "calibration")
            batch_no += 1
            tokens = min(s.tokens for s in stats.values())
            bar.set_postfix(tokens=tokens, refresh=False)
            bar.update(1)
            if all(s.converged for s in stats.values()) or (max_batches is not None and batch_no >= max_batches):
                break
    bar.close()
    if batch_no == 0:
        raise ValueError("calibration data was empty; pass an iterable with at least one batch of model inputs")
    return stats
