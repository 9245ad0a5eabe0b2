"""The injection mode that one ``lf.call`` or one ``lf.applied`` block runs in: its layers' checked
entries, their variants' prepare hooks, the choice of light or op-by-op injection, and one handler per
layer (a single adapter on the layer's rows, or a route's adapters)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import _base, _inject, _keys, _layers, _plan, _routing, variants


def mode_for(model, params, route, freeze_base, base, key=None, one_forward=True):
    """The ``_inject.mode`` of ``params`` on ``model`` (all arguments checked), for one forward
    (``lf.call``) or, with ``one_forward=False``, for the many forwards of an ``lf.applied`` block."""
    batch_dims = 0 if route is None else 1
    # without gradient and base=, nothing is substituted unless a forward turns gradients on: a remembered plan
    # needs no walk over the model's weights now (the mode makes the detached copies if it ever needs them)
    replayed = (
        _plan.replayed_entries(model, params, batch_dims)
        if base is None and route is None and not torch.is_grad_enabled()
        else None
    )
    aliases: dict[int, list[str]] = {}
    if replayed is not None:  # a remembered plan was made on a model without tied weights
        (entries, K), swap = replayed, None
    else:
        swap, aliases = _base.swap_map(model, base, freeze_base)
        entries, K = _plan.planned_entries(model, params, swap, aliases, batch_dims)
    substituted = [e for e in entries if e.kind.substitute]
    if route is not None:
        if substituted:
            e = substituted[0]
            raise ValueError(
                f"route= cannot adapt {e.path!r} (a {e.kind.name}, adapted by substituting its merged weight, one per "
                f"call): evaluate the K stacked adapters with torch.func.vmap(lambda p, x: lf.call(model, p, x))"
                f"(stacked, xs), or leave such layers out of the stacked params"
            )
        route = _routing.check_route(route, K)
    if key is not None:
        _keys.as_seed(key)  # a clear error for a bad key
        noisy = [e.path for e in substituted if "dropout" in e.leaves]
        if noisy:
            raise ValueError(
                f"key= turns on adapter dropout, but {noisy[:3]} {'are layers' if len(noisy) > 1 else 'is a layer'} "
                f"adapted by weight substitution ({substituted[0].kind.name}), where dropout on the input cannot be "
                f"drawn; build their params with dropout=0.0, or drop key="
            )
        if not any("dropout" in e.leaves for e in entries):
            raise ValueError(
                "key= turns on adapter dropout, but no layer of params has a dropout rate; build them with "
                "e.g. lf.LoRAConfig(r=8, dropout=0.1), or drop key="
            )
    if route is None and one_forward:  # derived leaves live for one forward: a block may see leaves change in place
        entries = with_prepared_leaves(entries)
    segments = None if route is None or K is None else _routing.segments(route, K)
    is_light = light(swap, route, base, one_forward) and not substituted  # substitution runs op by op
    layers = [
        _inject.Layer(
            e.path,
            e.module,
            e.kind,
            layer_handler(e, route, key, segments, is_light),
            _float_weight_dtype(e.module, e.kind),
            input_handler(e, key) if is_light else None,
            merged_handler(e) if e.kind.substitute or (not is_light and _elsewhere(e, aliases)) else None,
            e.leaves,
        )
        for e in entries
    ]
    owner = "lf.call" if one_forward else "lf.applied"
    if not one_forward:  # a block trains only if the model is in training mode (generation runs in eval)
        trains = lambda: model.training and _any_requires_grad(entries)
    else:
        trains = lambda: _any_requires_grad(entries)
    own_weights = None if swap is not None else lambda: _base.swap_map(model, None, freeze_base)[0]
    return _inject.mode(
        layers,
        swap if swap is not None else {},
        freeze_base,
        detach_only=base is None,
        owner=owner,
        training=trains,
        model=model if is_light else None,
        own_weights=own_weights,
    )


def light(swap: dict | None, route, base, one_forward: bool) -> bool:
    """Whether the adapters can act around the targeted layers' own module calls (one module hook per
    call) instead of through a mode that sees every op: nothing to substitute (no ``base=``; base weights
    detached only while autograd records, and then the mode is pushed for the model's calls), plain eager
    code (torch.compile and torch.func transforms trace the op-by-op mode), one adapter per layer."""
    if base is not None or route is not None or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():  # pyright: ignore[reportAttributeAccessIssue]
        return False
    return not (one_forward and swap and torch.is_grad_enabled())  # a training call: op by op from the start


def with_prepared_leaves(entries: list[_plan.Entry]) -> list[_plan.Entry]:
    """Entries whose leaves went through their variant's ``prepare`` hook (once per variant, all its
    layers together); the caller's params are not touched."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        if e.variant.prepare is not None:
            groups.setdefault(id(e.variant), []).append(i)
    entries = list(entries)
    for idx in groups.values():
        prepare = entries[idx[0]].variant.prepare
        assert prepare is not None
        done = prepare({entries[i].path: entries[i].leaves for i in idx})
        paths = {entries[i].path for i in idx}
        if not isinstance(done, dict) or set(done) != paths:
            got = sorted(done) if isinstance(done, dict) else type(done).__name__
            raise ValueError(
                f"variant {entries[idx[0]].variant.NAME!r}: prepare() must return {{path: leaves}} for exactly the "
                f"layers it was given ({sorted(paths)[:4]}…), got {got}"
            )
        for i in idx:
            entries[i] = entries[i]._replace(leaves=done[entries[i].path])
    return entries


def layer_handler(
    entry: _plan.Entry, route: Tensor | None, key, segments: _routing.Segments | None = None, light: bool = False
) -> _inject.Handler:
    """What the layer of ``entry`` computes its product with: its adapter (routed, with dropout noise, or plain)."""
    # dropout noise only for layers whose params carry a dropout rate; a pure function of (key, path, position)
    seed = None if key is None or "dropout" not in entry.leaves else _keys.fold_in(key, entry.path)
    if route is not None:
        return _routing.routed_handler(entry.path, entry.variant, entry.leaves, route, seed, segments)
    variant, leaves = entry.variant, entry.leaves
    if seed is None:
        return row_handler(lambda x, W, b: variant.apply(leaves, W, x, b), entry.kind, light)
    return row_handler(lambda x, W, b: variant.apply(leaves, W, x, b, _routing.dropout_noise(seed, x)), entry.kind, light)


def input_handler(entry: _plan.Entry, key) -> Callable[[Tensor], Tensor] | None:
    """x -> the input the layer itself then computes the adapted output from, for a variant that only
    transforms the input (its ``apply_input``) on an op kind's own call (no dropout noise); else None."""
    variant, leaves = entry.variant, entry.leaves
    if variant.apply_input is None or entry.kind.op is None or (key is not None and "dropout" in leaves):
        return None
    return lambda x: variant.apply_input(leaves, x)  # pyright: ignore[reportOptionalCall]


def row_handler(
    apply: Callable[[Tensor, Tensor, Tensor | None], Tensor], kind: _layers.LayerKind, light: bool = False
) -> _inject.Handler:
    """A handler that gives ``apply`` a contiguous N-d input as its (rows, d_in) matrix and views the
    result back: the same values (a linear layer acts row by row; dropout noise is a function of the
    flat position), but the fresh layer output inside ``apply`` is then a plain matrix, which an
    adapter can accumulate into in place without autograd tracking a view. Module kinds and light
    modes (the module computed its output for its own input shape) get x as it is."""
    if kind.op is None or light:
        return lambda x, W, b, base: apply(x, W, b)

    def handler(x: Tensor, W: Tensor, b: Tensor | None, base) -> Tensor:
        if x.ndim > 2 and x.is_contiguous():
            y = apply(x.view(-1, x.shape[-1]), W, b)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return apply(x, W, b)

    return handler


def _elsewhere(entry: _plan.Entry, aliases: dict[int, list[str]]) -> bool:
    """Whether a use of an op kind's weight other than its layer's op (``x @ layer.weight.T``, a custom kernel) sees
    the merged weight: yes, op by op, unless the weight is tied (the other name's own use must see the base)."""
    w = entry.module.weight
    return entry.kind.op is not None and len(aliases.get(id(w), ())) < 2


def merged_handler(entry: _plan.Entry) -> Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
    """(W, b) as the module stores them -> (W', b') as stored: the layer's merged weight and bias, which a
    substitution kind's forward uses in their place (one adapter per expert for a 3-D parameter)."""
    variant, leaves, kind = entry.variant, entry.leaves, entry.kind

    def merged(w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        W_new, b_new = variants.merged_weights(variant, leaves, kind.dense(w), b)
        return kind.store(W_new, w), b_new

    return merged


def _float_weight_dtype(module: nn.Module, kind: _layers.LayerKind) -> torch.dtype | None:
    w = getattr(module, kind.param, None)
    return w.dtype if isinstance(w, Tensor) and w.is_floating_point() else None


def _any_requires_grad(entries: list[_plan.Entry]) -> bool:
    return any(v.requires_grad for e in entries for v in e.leaves.values())
