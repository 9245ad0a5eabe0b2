"""Validation at the door: every error names the bad value and says what would work."""
from __future__ import annotations

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
        raise ValueError(f"{who}: r={r} exceeds min(d_out, d_in)={min(d_out, d_in)} for W of shape ({d_out}, {d_in}); use r <= {min(d_out, d_in)}")


def check_input(x: torch.Tensor, W: torch.Tensor, who: str) -> None:
    if x.shape[-1] != W.shape[-1]:
        raise ValueError(f"{who}: x has last dim {x.shape[-1]} but W of shape {tuple(W.shape)} expects d_in={W.shape[-1]}; pass x of shape (..., {W.shape[-1]})")


def calibration_stat(st, stat_cls, r: int, who: str, what: str, build: str) -> None:
    """A data-driven init got a statistic of the right kind (``what``) that saw at least r tokens."""
    if st is None:
        raise ValueError(f"{who}: {what} is data-driven and got no calibration statistic; pass calibration data to lf.init / build one with {build} and feed it with stat.update(x)")
    if not isinstance(st, stat_cls):
        raise TypeError(f"{who}: stat is a {type(st).__module__}.{type(st).__name__}, not an {what} statistic; build one with {build}")
    if st.tokens < r:
        raise ValueError(f"{who}: calibration saw {st.tokens} tokens, fewer than r={r}; give more calibration data")


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
