"""Shared pieces of the variants' ``pad`` hooks, which ``lf.stack(..., pad=True)`` calls.

A variant's ``pad(path, present, K, own)`` gets the leaves of the adapters that target a layer
(``present``: {adapter index: leaves}) and returns leaves for all K adapters, equal in shape, each
computing exactly what it computed alone (or raises ``PadError`` explaining why it cannot).
``own(k, leaf)`` is adapter k's value of a leaf elsewhere in its tree (its steering alpha), or None.
"""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor


class PadError(ValueError):
    pass


def refuse(name: str, path: str, why: str) -> NoReturn:
    raise PadError(f"lf.stack(pad=True): cannot pad {name} at {path!r} exactly: {why}")


def grown(t: Tensor, size: int, axis: int) -> Tensor:
    """``t`` with zeros appended along ``axis`` up to ``size``."""
    t = t.detach()
    if t.shape[axis] == size:
        return t
    shape = list(t.shape)
    shape[axis] = size - t.shape[axis]
    return torch.cat([t, t.new_zeros(shape)], dim=axis)


def same_leaf_names(name: str, path: str, present: dict) -> None:
    names = {k: sorted(v) for k, v in present.items()}
    if len({tuple(v) for v in names.values()}) > 1:
        refuse(name, path, f"the adapters hold different leaves there: {names}")


def lowrank(name: str, path: str, present: dict, K: int, axes: dict[str, int], zero=None) -> dict:
    """Zero rank rows/columns (``axes``: the rank axis of each leaf that has one) up to the largest r;
    an adapter that does not target the layer gets all-zero factors (``zero``: the leaves zeroed,
    default those in ``axes``; its update is exactly 0 whatever the other leaves, which are copied from
    another adapter)."""
    same_leaf_names(name, path, present)
    zero = axes.keys() if zero is None else zero
    R = max((v[leaf].shape[ax] for v in present.values() for leaf, ax in axes.items() if leaf in v), default=0)
    out = {
        k: {leaf: (grown(v, R, axes[leaf]) if leaf in axes else v) for leaf, v in leaves.items()} for k, leaves in present.items()
    }
    donor = out[min(present)]
    for k in range(K):
        if k not in out:
            out[k] = {leaf: (torch.zeros_like(v) if leaf in zero else v.detach().clone()) for leaf, v in donor.items()}
    return out


def gain(name: str, path: str, present: dict, K: int) -> dict:
    """A multiplicative gain g: an adapter that does not target the layer gets g = 1."""
    same_leaf_names(name, path, present)
    donor = present[min(present)]
    return {k: present[k] if k in present else {"g": torch.ones_like(donor["g"]).detach()} for k in range(K)}
