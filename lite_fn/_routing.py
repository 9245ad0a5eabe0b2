"""Routes, one adapter index per example of a stacked params set: their checks (against the stack and
the batch), their split into equal runs, and the handler that gives each example its own adapter."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from . import _inject, _layers, linalg
from ._contract import VariantSpec
from .trees import tree_map


def check_route(route, K: int | None) -> Tensor:
    """``route`` as a 1-D integer tensor of indices into K stacked adapters (a list or tuple is converted)."""
    if isinstance(route, (list, tuple)):
        route = torch.tensor(route)
    if not isinstance(route, Tensor):
        raise TypeError(f"route must be a 1-D integer tensor of adapter indices, got {type(route).__name__}")
    if route.dtype == torch.bool or route.is_floating_point() or route.is_complex() or route.ndim != 1:
        raise ValueError(
            f"route must be a 1-D integer tensor of adapter indices (one per example), got shape "
            f"{tuple(route.shape)} dtype {route.dtype}" + ("; a boolean mask is not a route" if route.dtype == torch.bool else "")
        )
    if K is None:
        raise ValueError("route= needs stacked params (lf.stack([...])) with a leading adapter axis")
    if route.numel() and linalg.eager_values(route):
        lo, hi = int(route.min()), int(route.max())
        if lo < 0 or hi >= K:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"route holds adapter index {bad}, but the stacked params hold {K} adapters; use indices in 0..{K - 1}"
            )
    return route


def check_batch(route, args: tuple, kwargs: dict) -> None:
    """A ValueError unless ``route`` has one entry per example of the model's batch (its first tensor input)."""
    batch = _batch_of(args, kwargs)
    if batch is not None and batch[1] != len(route) and linalg.eager_values(route):
        raise ValueError(
            f"route has {len(route)} entries but the batch ({batch[0]}) has {batch[1]} examples; lf.call takes one "
            f"adapter index per example (repeat them yourself, e.g. route.repeat_interleave(n), for n rows each)"
        )


def _batch_of(args: tuple, kwargs: dict) -> tuple[str, int] | None:
    """(name, leading size) of the model's first tensor input: the batch a route must match."""
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.ndim:
            return f"args[{i}]", a.shape[0]
    for k, v in kwargs.items():
        if isinstance(v, Tensor) and v.ndim:
            return k, v.shape[0]
    return None


def dropout_noise(seed: int | None, x: Tensor) -> Tensor | None:
    """Uniform noise for dropout, a pure function of (key, layer path, position) — see linalg.hash_uniform."""
    return None if seed is None else linalg.hash_uniform(seed, x.shape, device=x.device)


class Segments(NamedTuple):
    """A route whose examples come in runs of equal length, one adapter per run (``torch.arange(K)
    .repeat_interleave(n)`` and the like): rows are viewed as (runs, n, ...) and each run meets its
    adapter's leaves directly — no per-example copy of any leaf. ``adapters`` is None when the runs
    are exactly adapters 0..K−1 in order (then not even a gather of the stack)."""

    adapters: Tensor | None
    per_run: int


def segments(route: Tensor, K: int) -> Segments | None:
    """The route's ``Segments``, or None where its runs are not all of one length (or not known eagerly)."""
    if route.numel() == 0 or not linalg.eager_values(route):
        return None  # data-dependent shapes: the per-example path, which compiles and vmaps
    adapters, counts = torch.unique_consecutive(route, return_counts=True)
    n = int(counts[0])
    if bool((counts != n).any()):
        return None
    in_order = adapters.numel() == K and bool((adapters == torch.arange(K, device=adapters.device)).all())
    return Segments(None if in_order else adapters, n)


def routed_handler(
    path: str, variant: VariantSpec, leaves: dict[str, Tensor], route: Tensor, seed: int | None, segments: Segments | None
) -> _inject.Handler:
    """The handler of layer ``path`` under ``route``: each example's rows meet the leaves of its own adapter."""

    def handler(x, W, b, base):
        B, N = route.shape[0], x.shape[0] if x.ndim >= 2 else -1
        if N == B:
            xs = x
        elif N > 0 and N % B == 0:  # batch and sequence flattened before the layer: rows are example-major
            xs = x.reshape(B, N // B, *x.shape[1:])
        else:
            raise ValueError(
                f"route has {B} entries but the input to {path} has shape {tuple(x.shape)}; its leading dimension "
                f"must be the batch (or batch × sequence, example-major); pass one adapter index per example"
            )
        if isinstance(W, _layers.QuantizedWeight):  # the quantized kernel cannot run under vmap: one group per adapter
            y = _per_adapter_groups(variant, leaves, route, xs, W, b, seed)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        noise = dropout_noise(seed, xs)
        if segments is None:  # one copy of the leaves per example
            per, rows = tree_map(lambda v: v[route], leaves), xs
        else:  # one adapter per run of examples: the stacked leaves themselves (or one copy per run)
            runs = segments.adapters
            per = leaves if runs is None else tree_map(lambda v: v[runs], leaves)
            rows = xs.reshape(-1, segments.per_run, *xs.shape[1:])
            noise = None if noise is None else noise.reshape(rows.shape)
        if noise is None and segments is not None and variant.apply_runs is not None:
            y = variant.apply_runs(per, W, rows, b)
        elif noise is None:
            y = vmap(variant.apply, in_dims=(0, None, 0, None))(per, W, rows, b)
        else:
            y = vmap(variant.apply, in_dims=(0, None, 0, None, 0))(per, W, rows, b, noise)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return handler


def _per_adapter_groups(
    variant: VariantSpec,
    leaves: dict[str, Tensor],
    route: Tensor,
    xs: Tensor,
    W: _layers.QuantizedWeight,
    b: Tensor | None,
    seed: int | None,
) -> Tensor:
    """Routed rows of a quantized layer: one ``apply`` per adapter present, on its own rows, with the
    layer's own output for those rows as the base product (its kernel cannot run under vmap)."""
    y = W._y  # the layer's output for its whole input, or None
    ys = None if y is None else y.reshape(*xs.shape[:-1], y.shape[-1])
    noise = dropout_noise(seed, xs)
    out = None
    for k in torch.unique(route).tolist():
        index = (route == k).nonzero().squeeze(1)
        x_k = xs[index]
        W_k = _layers.QuantizedWeight(W.module, W.kind, x_k, None if ys is None else ys[index], W.bias_value)
        extra = () if noise is None else (noise[index],)
        y_k = variant.apply(tree_map(lambda v: v[k], leaves), W_k, x_k, b, *extra)
        out = y_k.new_zeros((xs.shape[0], *y_k.shape[1:])) if out is None else out
        out = out.index_copy(0, index, y_k)
    assert out is not None  # a route has at least one entry
    return out
