"""Training K adapters in one step: a vmapped loss over stacked params, per-adapter gradient
clipping and learning rates, and saving the K results.

    stacked = lf.stack([lf.init(k, model, cfg, targets=...) for k in range(K)])   # leading axis K
    losses_of = lf.train.stacked_loss(model)               # (stacked, *batch, **kw) -> (K,) losses
    opt = torch.optim.AdamW(lf.trainable(stacked), lr=1e-3)
    for ids in batches:                                     # ids (K, B, T): adapter k's own batch
        losses = losses_of(stacked, ids, labels=ids)
        opt.zero_grad()
        losses.sum().backward()                             # sum, not mean: see below
        lf.train.clip_grad_norm_per_adapter(stacked, 1.0)  # optional
        opt.step()
    lf.train.save_each("adapter_{k}.safetensors", stacked, config=cfg)

Why this is K separate trainings, computed at once: the base weights are shared and get no
gradient, and adapter k's loss depends only on slice k of every stacked leaf, so the gradient of
``sum_k loss_k`` with respect to slice k is exactly adapter k's own gradient (a mean over k would
divide every gradient by K). Element-wise optimizers (SGD, Adam, AdamW, RMSprop, Adagrad, … with
``foreach`` or not) update slice k from slice k's gradient and state alone, so one optimizer over
the stacked leaves takes the K separate steps, equal up to the order of float operations. Two
things would couple the adapters and are provided per adapter here instead: gradient-norm
clipping (``torch.nn.utils.clip_grad_norm_`` takes one norm over all K) and learning rates (an
optimizer's lr is one number per parameter tensor). Optimizers that are not element-wise
(LAMB/LARS trust ratios, Shampoo, Muon) couple the K adapters and do not train them separately.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import vmap

from . import io, runtime
from .trees import Params, trainable, unstack


def stacked_loss(
    model: nn.Module,
    loss_fn: Callable[..., Tensor] | None = None,
    *,
    base=None,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> Callable[..., Tensor]:
    """``f(stacked, *batch, **kw) -> (K,)``: adapter k's loss on its own batch, all K adapters in one
    vmapped call of ``model``.

    Every tensor in ``batch`` / ``kw`` carries a leading axis K: adapter k's batch is index k (for
    a tensor shared by all adapters pass ``x.expand(K, *x.shape)``, a view). Other values (``None``,
    flags) reach every adapter as they are.

    Args:
        model: the base model, shared by the K adapters.
        loss_fn: ``loss_fn(forward, *batch, **kw) -> scalar``, one adapter's loss, where
            ``forward(*a, **k)`` is ``lf.call(model, <adapter k>, *a, **k)`` and ``batch`` / ``kw``
            are adapter k's. Default: ``forward(*batch, **kw).loss`` — a Hugging Face model called
            with ``labels=`` (a mean over the adapter's tokens, as the model computes it).
        base: the weights of a stateless model, as ``lf.call`` takes them.
        chunk_size: ``torch.func.vmap``'s: run the K adapters in chunks of this many (less memory).
        randomness: ``torch.func.vmap``'s; ``"different"`` for a model with dropout in train mode.

    Returns:
        A function of ``(stacked, *batch, **kw)`` returning the (K,) losses. Call
        ``losses.sum().backward()``: the gradient of the sum with respect to adapter k is adapter
        k's own (a mean would divide every gradient by K).

    Raises:
        TypeError: (when called) with the default ``loss_fn``, if the model's output has no ``.loss``.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> stacked = lf.stack([lf.init(k, model, lf.LoRAConfig(r=2), targets=r"^0$") for k in range(3)])
        >>> x, y = torch.randn(3, 5, 8), torch.randn(3, 5, 2)          # adapter k trains on x[k], y[k]
        >>> mse = lf.train.stacked_loss(model, lambda forward, x, y: (forward(x) - y).square().mean())
        >>> losses = mse(stacked, x, y)
        >>> losses.shape
        torch.Size([3])
        >>> losses.sum().backward()
    """

    def default(forward, *args, **kwargs):
        out = forward(*args, **kwargs)
        loss = getattr(out, "loss", None)
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"{type(model).__name__}'s output has no .loss; pass labels=... (a Hugging Face model) "
                f"or a loss_fn(forward, *batch, **kw) to lf.train.stacked_loss"
            )
        return loss

    per_adapter = default if loss_fn is None else loss_fn

    def one(params, args, kwargs):
        def forward(*a, **k):
            return runtime.call(model, params, *a, **{"base": base, **k})

        return per_adapter(forward, *args, **kwargs)

    def losses(stacked: Params, *args, **kwargs) -> Tensor:
        arg_dims = pytree.tree_map(lambda v: 0 if isinstance(v, Tensor) else None, (args, kwargs))
        return vmap(one, in_dims=(0, *arg_dims), chunk_size=chunk_size, randomness=randomness)(stacked, args, kwargs)

    return losses


def _stacked_leaves(stacked, who: str) -> tuple[list[Tensor], int]:
    """The trainable leaves of a stacked params tree (or the given tensors) and their K."""
    if isinstance(stacked, dict):
        leaves = trainable(stacked)
    elif isinstance(stacked, Tensor):
        leaves = [stacked]
    elif isinstance(stacked, Iterable):
        leaves = list(stacked)
    else:
        raise TypeError(
            f"{who}: pass a stacked params tree (lf.stack) or an iterable of stacked tensors, got {type(stacked).__name__}"
        )
    if not leaves:
        raise ValueError(f"{who}: no leaves to work on; pass a stacked params tree (lf.stack) or its lf.trainable leaves")
    odd = [type(t).__name__ for t in leaves if not isinstance(t, Tensor)]
    if odd:
        raise TypeError(f"{who}: every leaf must be a Tensor, got {odd[:3]}")
    bad = [tuple(t.shape) for t in leaves if t.ndim == 0]
    sizes = {t.shape[0] for t in leaves if t.ndim}
    if bad or len(sizes) != 1:
        raise ValueError(
            f"{who}: every leaf needs the same leading adapter axis K (lf.stack gives it); got leading sizes "
            f"{sorted(sizes)}" + (f" and leaves without one {bad[:3]}" if bad else "")
        )
    return leaves, sizes.pop()


def _per_adapter(value, K: int, name: str, who: str) -> Tensor:
    """A number, or a (K,) tensor / sequence, as a float64 tensor of shape (K,)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        t = t.expand(K)
    if tuple(t.shape) != (K,):
        raise ValueError(f"{who}: {name} must be a number or one value per adapter (shape ({K},)), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{who}: {name} must be finite and >= 0, got {t.tolist()}")
    return t


def _per_row(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


@torch.no_grad()
def clip_grad_norm_per_adapter(
    stacked, max_norm: float | Sequence[float] | Tensor, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each of the K stacked adapters on its own.

    Adapter k's norm is taken over slice k of every leaf's gradient, and only slice k is scaled:
    the same as calling ``clip_grad_norm_`` on adapter k's separate parameters (clipping all K
    with one global norm would let one adapter's large gradient shrink the others').

    Args:
        stacked: a stacked params tree (its ``lf.trainable`` leaves are used) or an iterable of
            tensors that all have the leading adapter axis K (e.g. ``adapted.parameters()``).
            Tensors whose ``.grad`` is None are skipped, as torch does.
        max_norm: the largest allowed norm, one number or one per adapter (shape (K,)).
        norm_type: the p of the p-norm (``float("inf")`` for the max norm), as in torch.
        error_if_nonfinite: raise if an adapter's norm is NaN or inf (naming the adapters).

    Returns:
        The (K,) total gradient norms before clipping.

    Raises:
        ValueError: leaves without one common leading axis K, or ``max_norm`` not a number or (K,) values >= 0.
        RuntimeError: with ``error_if_nonfinite``, naming the adapters whose norm is NaN or inf.

    Example:
        >>> import torch, lite_fn as lf
        >>> g = torch.zeros(3, 4, requires_grad=True)            # one leaf of 3 stacked adapters
        >>> g.grad = torch.tensor([[3.0, 4, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 6, 8]])
        >>> lf.train.clip_grad_norm_per_adapter([g], 1.0)      # norms before clipping
        tensor([ 5.0000,  0.5000, 10.0000])
        >>> torch.linalg.vector_norm(g.grad, dim=1)              # adapters 0 and 2 clipped, 1 untouched
        tensor([1.0000, 0.5000, 1.0000])
    """
    who = "clip_grad_norm_per_adapter"
    leaves, K = _stacked_leaves(stacked, who)
    limit = _per_adapter(max_norm, K, "max_norm", who)
    grads = [t.grad for t in leaves if t.grad is not None]
    if not grads:
        return torch.zeros(K)
    norm_type = float(norm_type)
    device = grads[0].device
    # per leaf: (K,) norms of each adapter's slice; then the norm of those, as torch combines per-tensor norms
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), norm_type, dim=1).to(device) for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type, dim=0)
    if error_if_nonfinite and not bool(torch.isfinite(total).all()):
        bad = [k for k in range(K) if not math.isfinite(float(total[k]))]
        raise RuntimeError(
            f"{who}: the gradient norms of adapters {bad} are not finite ({[float(total[k]) for k in bad]}), "
            f"so they cannot be clipped; pass error_if_nonfinite=False to clip anyway"
        )
    coef = (limit.to(device=device, dtype=total.dtype) / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_row(coef, g.ndim))
    return total


@torch.no_grad()
def lr_scaled_step(
    optimizer: torch.optim.Optimizer,
    stacked,
    lr_scale: float | Sequence[float] | Tensor,
    closure: Callable[[], Any] | None = None,
):
    """``optimizer.step()`` with adapter k's learning rate multiplied by ``lr_scale[k]``.

    The step moves each leaf from p to p'; adapter k keeps p + lr_scale[k]·(p' − p). For
    optimizers whose state does not depend on the learning rate — SGD (with momentum), Adam,
    AdamW, RMSprop, Adagrad without lr decay — the whole update (weight decay included: AdamW's is
    lr·wd·p) is proportional to lr, so this is exactly training adapter k with lr·lr_scale[k].
    Scaling the *gradients* instead would not do it: Adam's update does not change when a
    gradient is scaled. Costs one copy of the stacked leaves for the length of the step.

    Args:
        optimizer: an optimizer over the stacked leaves (and possibly others, stepped as usual).
        stacked: the stacked params tree (its trainable leaves) or the stacked tensors to scale.
        lr_scale: (K,) non-negative factors, or one number for all.
        closure: passed to ``optimizer.step``.

    Returns:
        What ``optimizer.step`` returns.

    Raises:
        ValueError: leaves without one common leading axis K, or ``lr_scale`` not a number or (K,) values >= 0.

    Example:
        >>> import torch, lite_fn as lf
        >>> w = torch.zeros(3, 2, requires_grad=True)             # one leaf of 3 stacked adapters
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> w.grad = torch.ones(3, 2)
        >>> lf.train.lr_scaled_step(opt, [w], torch.tensor([1.0, 0.5, 0.0]))
        >>> w[:, 0]
        tensor([-0.1000, -0.0500,  0.0000], grad_fn=<SelectBackward0>)
    """
    leaves, K = _stacked_leaves(stacked, "lr_scaled_step")
    scale = _per_adapter(lr_scale, K, "lr_scale", "lr_scaled_step")
    before = [t.detach().clone() for t in leaves]
    out = optimizer.step(closure) if closure is not None else optimizer.step()
    for t, t0 in zip(leaves, before):
        t.copy_(torch.lerp(t0, t.detach(), _per_row(scale.to(device=t.device, dtype=t.dtype), t.ndim)))
    return out


def save_each(
    paths: str | os.PathLike | Sequence[str | os.PathLike], stacked: Params, *, config=None, configs: Sequence | None = None
) -> list[str]:
    """Save each of the K stacked adapters as its own lite_fn checkpoint (``lf.unstack`` + ``lf.save``).

    Args:
        paths: K paths, or one path with ``{k}`` in it (``"out/adapter_{k}.safetensors"``).
        stacked: the stacked params tree.
        config: one config recorded in every file, or ``configs``: one per adapter.

    Returns:
        The K paths written, in adapter order; ``lf.load(paths[k])`` is adapter k.

    Raises:
        ValueError: a single path without ``{k}``, not K distinct paths, or both ``config`` and ``configs``.

    Example:
        >>> import os, tempfile, torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> stacked = lf.stack([lf.init(k, model, lf.LoRAConfig(r=2)) for k in range(3)])
        >>> paths = lf.train.save_each(os.path.join(tempfile.mkdtemp(), "adapter_{k}.safetensors"), stacked)
        >>> [os.path.basename(p) for p in paths]
        ['adapter_0.safetensors', 'adapter_1.safetensors', 'adapter_2.safetensors']
        >>> torch.equal(lf.load(paths[2])["0"]["lora"]["A"], stacked["0"]["lora"]["A"][2])
        True
    """
    if config is not None and configs is not None:
        raise ValueError("save_each: pass config= (one for all adapters) or configs= (one per adapter), not both")
    adapters = unstack(stacked)
    K = len(adapters)
    if isinstance(paths, (str, os.PathLike)):
        pattern = os.fspath(paths)
        if "{k}" not in pattern:
            raise ValueError(
                f"save_each: the path {pattern!r} has no '{{k}}' to number the {K} adapters; "
                f"e.g. 'adapter_{{k}}.safetensors', or pass a list of {K} paths"
            )
        paths = [pattern.replace("{k}", str(k)) for k in range(K)]
    paths = [os.fspath(p) for p in paths]
    if len(paths) != K or len(set(paths)) != K:
        raise ValueError(
            f"save_each: need {K} distinct paths for {K} stacked adapters, got {len(paths)} ({len(set(paths))} distinct)"
        )
    if configs is not None and len(configs) != K:
        raise ValueError(f"save_each: configs has {len(configs)} entries for {K} stacked adapters")
    for k, (path, params) in enumerate(zip(paths, adapters)):
        io.save(path, params, config=configs[k] if configs is not None else config)
    return paths
