"""Validation at the door: every error names the bad value and says what would work."""

from __future__ import annotations

from typing import Any

import torch


def check_weight(W: torch.Tensor, who: str) -> tuple[int, int]:
    """W must be a finite, floating-point (d_out, d_in) matrix. Returns (d_out, d_in)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{who}: W must be a torch.Tensor of shape (d_out, d_in), got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"{who}: W has shape {tuple(W.shape)}; pass the 2-D (d_out, d_in) weight of a linear layer")
    if not W.is_floating_point():
        raise TypeError(f"{who}: W has dtype {W.dtype}; pass a floating-point weight (float32, bfloat16, float16, float64)")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"{who}: W contains {bad} NaN/inf entries; adapters cannot be initialised from a non-finite weight")
    return W.shape[0], W.shape[1]


def check_rank(r: int, d_out: int, d_in: int, who: str) -> None:
    if r > min(d_out, d_in):
        raise ValueError(
            f"{who}: r={r} exceeds min(d_out, d_in)={min(d_out, d_in)} for W of shape ({d_out}, {d_in}); use r <= {min(d_out, d_in)}"
        )


def check_input(x: torch.Tensor, W: torch.Tensor, who: str) -> None:
    if x.shape[-1] != W.shape[-1]:
        raise ValueError(
            f"{who}: x has last dim {x.shape[-1]} but W of shape {tuple(W.shape)} expects d_in={W.shape[-1]}; pass x of shape (..., {W.shape[-1]})"
        )


def calibration_stat(statistic, stat_cls, r: int, who: str, what: str, build: str) -> None:
    """A data-driven init got a statistic of the right kind (``what``) that saw at least r tokens."""
    if statistic is None:
        raise ValueError(
            f"{who}: {what} is data-driven and got no calibration statistic; pass calibration data to lf.init / build one with {build} and feed it with stat.update(x)"
        )
    if not isinstance(statistic, stat_cls):
        raise TypeError(
            f"{who}: stat is a {type(statistic).__module__}.{type(statistic).__name__}, not an {what} statistic; build one with {build}"
        )
    if statistic.tokens < r:
        raise ValueError(f"{who}: calibration saw {statistic.tokens} tokens, fewer than r={r}; give more calibration data")


def positive_int(name: str, value, who: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{who}: {name}={value!r} must be a positive int (e.g. {name}=8)")


def finite_number(name: str, value, who: str) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{who}: {name}={value!r} must be a finite number")


def one_of(name: str, value, allowed, who: str) -> None:
    if value not in allowed:
        raise ValueError(f"{who}: {name}={value!r} is not one of {sorted(allowed)}")


def check_leaves(where: str, variant, leaves, W: torch.Tensor, batch_dims: int = 0) -> int | None:
    """Leaves of one layer are exactly what ``variant`` expects for W: no missing or extra leaf, no
    broadcasting shape, W's dtype and device. ``batch_dims=1``: every leaf has one leading adapter
    axis of the same length K (stacked params, ``route=``); returns K (or None).

    ``where`` names the layer, e.g. "params['model.layers.0.q_proj']['lora']".
    """
    if not isinstance(leaves, dict):
        raise TypeError(f"{where} must be a dict {{leaf: Tensor}}, got {type(leaves).__name__}")
    for name, v in leaves.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where}[{name!r}] is a {type(v).__name__}; every leaf must be a torch.Tensor")
    K = None
    if batch_dims:
        sizes = {name: (v.shape[0] if v.ndim else None) for name, v in leaves.items()}
        Ks = {k for k in sizes.values()}
        if None in Ks or len(Ks) > 1:
            raise ValueError(
                f"{where}: stacked leaves need one leading adapter axis of the same length K on every leaf, "
                f"got leading sizes {sizes}; build them with lf.stack([...])"
            )
        K = Ks.pop()
    given = {name: tuple(v.shape[batch_dims:]) for name, v in leaves.items()}
    d_out, d_in = W.shape[-2], W.shape[-1]
    experts = tuple(W.shape[:-2])  # a 3-D raw parameter (E, d_out, d_in): one adapter per expert, leaves (E, ...)
    for name, shape in given.items():
        if shape[: len(experts)] != experts:
            raise ValueError(
                f"{where}[{name!r}] has shape {shape}, but the parameter is {tuple(W.shape)}: one adapter per "
                f"leading index, so every leaf starts with {experts}; build them with lf.init"
            )
    try:
        expected = variant.shapes({k: v[len(experts) :] for k, v in given.items()}, d_out, d_in)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    expected = {k: experts + tuple(v) for k, v in expected.items()}
    missing = sorted(expected.keys() - given.keys())
    extra = sorted(given.keys() - expected.keys())
    if missing or extra:
        parts = [f"missing leaf {k!r} (expected shape {expected[k]})" for k in missing]
        parts += [f"unexpected leaf {k!r}" for k in extra]
        raise ValueError(
            f"{where}: {'; '.join(parts)}; {variant.NAME} leaves for W of shape ({d_out}, {d_in}) are "
            f"{ {k: v for k, v in expected.items()} } — build them with lf.init"
        )
    for k, shape in expected.items():
        if given[k] != tuple(shape):
            _refuse_stacked(where, variant, leaves, W, batch_dims)
            lead = f"({K}, ...) stacked as " if batch_dims else ""
            raise ValueError(
                f"{where}[{k!r}] has shape {given[k]} but {variant.NAME} on W of shape ({d_out}, {d_in}) "
                f"needs {lead}{tuple(shape)} (no broadcasting); re-init it with lf.init for this layer"
            )
    for k, v in leaves.items():
        if not v.is_floating_point():
            raise TypeError(
                f"{where}[{k!r}] has dtype {v.dtype}; adapter leaves are floating point, in the layer weight's dtype "
                f"({W.dtype}): cast it (e.g. leaf.to({W.dtype})) or re-init with lf.init"
            )
        if v.dtype != W.dtype:
            raise TypeError(
                f"{where}[{k!r}] has dtype {v.dtype} but the layer's weight is {W.dtype}; cast the params "
                f"(e.g. optree.tree_map(lambda t: t.to({W.dtype}), params)) or the model to one dtype"
            )
        if v.device != W.device and W.device.type != "meta":
            raise ValueError(
                f"{where}[{k!r}] is on {v.device} but the layer's weight is on {W.device}; move the params to {W.device}"
            )
    return K


def _refuse_stacked(where: str, variant, leaves, W: torch.Tensor, batch_dims: int) -> None:
    """Leaves that do not fit one adapter but do fit a stack of K: say so, and how to evaluate them."""
    if batch_dims:
        return
    try:
        K = check_leaves(where, variant, leaves, W, batch_dims=1)
    except (ValueError, TypeError):
        return
    raise ValueError(
        f"{where}: the leaves are stacked (a leading axis of {K} adapters, e.g. from lf.stack) but this call evaluates "
        f"one adapter; evaluate all {K} with torch.func.vmap(lambda p: lf.call(model, p, x))(stacked), per example "
        f"with lf.call(model, stacked, x, route=<one adapter index per example>), or take one with lf.unstack(stacked)[k]"
    )


_CHECKED: dict[tuple, tuple[Any, int | None]] = {}  # leaf metadata that passed check_leaves -> (variant, K)
_CHECKED_MAX = 4096


def check_leaves_once(where: str, variant, leaves, W: torch.Tensor, batch_dims: int = 0) -> int | None:
    """``check_leaves``, remembered by the metadata it reads (variant, W's and every leaf's type,
    shape, dtype and device): a call with the same layout as one that passed skips the walk. Only
    passes are remembered, so every bad layout still raises its own error."""
    if not isinstance(leaves, dict) or torch.compiler.is_compiling():
        return check_leaves(where, variant, leaves, W, batch_dims)
    try:
        key = (
            id(variant),  # variants need not be hashable; the entry keeps the variant alive and is checked by identity
            batch_dims,
            type(W),
            W.shape,
            W.dtype,
            W.device,
            tuple((k, type(v), v.shape, v.dtype, v.device) for k, v in leaves.items()),
        )
    except AttributeError:  # a leaf that is not a tensor: check_leaves names it
        return check_leaves(where, variant, leaves, W, batch_dims)
    hit = _CHECKED.get(key)
    if hit is not None and hit[0] is variant:
        return hit[1]
    K = check_leaves(where, variant, leaves, W, batch_dims)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = (variant, K)
    return K


def like(W: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``dict(dtype=..., device=...)`` of W (or ``dtype``), for ``torch.zeros(shape, **like(W))``."""
    return {"dtype": W.dtype if dtype is None else dtype, "device": W.device}


def zero_only(cfg: Any, names: tuple[str, ...], who: str, why: str) -> None:
    """Config fields lite_fn accepts only at 0 (peft's training-only dropouts that it does not implement):
    each must be a finite number and 0, else a ValueError naming it, saying ``why``, and suggesting 0.0."""
    for name in names:
        p = getattr(cfg, name)
        finite_number(name, p, who)
        if p != 0:
            raise ValueError(f"{who}: {name}={p!r} is not supported: {why}; use {name}=0.0")
