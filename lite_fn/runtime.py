"""The model runtime's public entry points: targeting, init, calls and blocks through functional_call, merging.

Params at model level are plain nested dicts, ``params[module_path][variant_name][leaf]``.
Nothing here branches on a variant's name: a variant is looked up in the registry and used
through its ``init`` / ``apply`` (and, for data-driven ones, ``stat`` / ``plan``). The machinery
lives in private modules, one job each: ``_targets`` (which modules a pattern selects),
``_initialise`` (fresh params), ``_plan`` (layer entries and the per-call plan), ``_routing``
(routes) and ``_call_mode`` (the mode a call or block runs in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import _base, _call_mode, _initialise, _inject, _keys, _layers, _plan, _routing, _targets, variants
from .trees import Params

_light = _call_mode.light  # tests/test_light.py asks runtime._light which injection a call gets


# ----------------------------------------------------------------------------- targeting
def target_paths(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """Module paths that ``targets`` selects (regex search on ``named_modules()`` names).

    Args:
        model: any nn.Module.
        targets: a regex or a list of regexes searched in module paths; ``None``: every nn.Linear /
            Conv1D / quantized linear except output heads (``get_output_embeddings()`` and names like
            lm_head, score, classifier).
    Returns:
        The matching module paths, in ``named_modules()`` order.
    Raises:
        ValueError: a bad regex, or nothing matches (the message lists linear layers that exist).
        TypeError: a match is not a layer lite_fn can adapt (names the module and its type).

    Example:
        >>> import torch, lite_fn as lf
        >>> lf.target_paths(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
        ['0', '2']
    """
    return _targets.select(model, targets)


# ----------------------------------------------------------------------------- init
def init(
    key: _keys.Key,
    model: nn.Module,
    cfg,
    targets: str | Sequence[str] | None = None,
    calibration: Iterable | None = None,
    *,
    progress: bool | None = None,
    max_batches: int | None = None,
    base: Mapping[str, Tensor] | None = None,
) -> Params:
    """Adapter params for every targeted layer: ``{path: {variant: {leaf: Tensor}}}``.

    Each layer's key is ``fold_in(key, path)``, so a layer's params do not depend on which
    other layers are targeted. Trainable leaves (the variant's ``TRAINABLE``) have
    ``requires_grad=True``; every leaf is contiguous and has the weight's dtype and device.

    Args:
        key: an int seed (or a 0-d integer tensor); the same key gives bit-identical params.
        model: the model; it is never modified.
        cfg: a variant config, e.g. ``lf.LoRAConfig(r=8, alpha=16)``.
        targets: which layers (see ``target_paths``).
        calibration: for data-driven configs (EVA, AntiPaSTO with ``select="data"``): an iterable
            of model inputs (tensors, tuples or kwargs dicts), streamed once with fixed memory.
        progress: a calibration progress bar (tqdm) on stderr: None shows it on a terminal only, True
            always, False never.
        max_batches: read at most this many calibration batches (a positive int).
        base: the weights of a stateless model, ``{name: Tensor}`` (see ``call``).
    Returns:
        The params tree.
    Raises:
        ValueError / TypeError naming the bad config value, target, key, calibration input or
        ``base`` entry; calibration given to a config that does not use it is an error too.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.LoRAConfig(r=2, alpha=4), targets=r"^0$")
        >>> {k: tuple(v.shape) for k, v in params["0"]["lora"].items()}
        {'A': (2, 8), 'B': (8, 2), 'scale': ()}
    """
    return _initialise.initial_params(
        key, model, cfg, targets, calibration, progress=progress, max_batches=max_batches, base=base
    )


# ----------------------------------------------------------------------------- call
_VMAP_HINT = (
    "\n\nlite_fn: this model's forward cannot run under torch.func.vmap (above). To evaluate K stacked adapters "
    "without vmap, pass one adapter index per example: lf.call(model, stacked, x, route=route)"
)


def call(
    model: nn.Module,
    params: Params,
    *args,
    route: Tensor | None = None,
    freeze_base: bool = True,
    base: Mapping[str, Tensor] | None = None,
    key: _keys.Key | None = None,
    **kwargs,
):
    """``model(*args, **kwargs)`` with the adapters in ``params`` applied; the model is untouched.

    Nothing is assigned to the model: a per-thread TorchFunctionMode answers each targeted
    layer's product (see README, "How adapters reach the model"), so calls from many threads on
    one model, nested calls and other libraries' hooks are all exact.

    Args:
        model: the model.
        params: from ``init`` / ``load`` / ``stack`` (stacked params need ``route`` or a ``vmap``).
        *args, **kwargs: the model's own inputs.
        route: (B,) integer adapter indices, one per example of a stacked params set: a mixed
            batch (rows of inputs that flatten batch × sequence follow their example).
        freeze_base: the base weights enter detached, so no gradient goes to them.
        base: ``{name: Tensor}`` replacing the model's parameters and buffers (required for those
            on the meta device: a stateless skeleton), as ``torch.func.functional_call`` takes them.
        key: turns on adapter dropout (configs with ``dropout=p``); masks are a pure function of
            (key, layer path, position). No key, no dropout.
    Returns:
        What ``model(*args, **kwargs)`` returns.
    Raises:
        ValueError / TypeError / KeyError naming the path, leaf, expected and given shape, dtype, route
        index or ``base`` name; RuntimeError after the forward if a targeted layer was never
        computed through its recognised operation.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^0$")
        >>> x = torch.randn(3, 8)
        >>> torch.equal(lf.call(model, params, x), model(x))  # identity at init
        True
    """
    m = _call_mode.mode_for(model, params, route, freeze_base, base, key)
    if route is not None:
        _routing.check_batch(route, args, kwargs)
    try:
        with m:
            out = model(*args, **kwargs)
    except RuntimeError as e:
        if ("vmap" in str(e) or "functorch" in str(e)) and _VMAP_HINT not in str(e):
            raise RuntimeError(f"{e}{_VMAP_HINT}") from e
        raise
    finally:
        _inject.close(m)
    missed = m.missed()
    if missed:
        raise _inject.missed_error(missed, "lf.call")
    return out


class Block:
    """What ``with lf.applied(...) as block:`` gives: ``block.bind(fn)`` is ``fn`` running inside the
    block's adapters on whatever thread calls it (a pool made before the block, a callback); once
    the block has ended, a targeted layer computed there raises."""

    def __init__(self, mode):
        self._mode = mode

    def bind(self, fn: Callable) -> Callable:
        """``fn`` bound to this block (and any call or block it is nested in)."""
        return _inject.bound(fn, self._mode)

    def __repr__(self) -> str:
        state = "ended" if self._mode.closed else "open"
        return f"<lf.applied block ({state}), {len(self._mode.layers)} layers>"


@contextlib.contextmanager
def applied(
    model: nn.Module,
    params: Params,
    *,
    route: Tensor | None = None,
    key: _keys.Key | None = None,
    freeze_base: bool = True,
    base: Mapping[str, Tensor] | None = None,
) -> Iterator[Block]:
    """Every forward of ``model`` inside the block, on this thread, is adapted as ``call`` adapts one.

    So ``model.generate``, pipelines and evaluation harnesses run with adapters. Same guarantees
    as ``call``: nothing is assigned to the model, other threads see the plain model, blocks nest.

    Args:
        model, params, freeze_base, base, key: as in ``call``.
        route: as in ``call``; it follows the batch through generation: an input of N = B·n rows
            (beams, or batch × sequence flattened) uses each entry for n consecutive rows.
    Raises:
        As ``call``; at the end of the block, a RuntimeError if some targeted layers were computed
        and others never were.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^2$")
        >>> x = torch.randn(3, 8)
        >>> with lf.applied(model, params):
        ...     y = model(x)  # any code that calls the model
        >>> torch.equal(y, lf.call(model, params, x))
        True
    """
    # no prepare hooks here: the block runs many forwards, and leaves may change in place between them
    m = _call_mode.mode_for(model, params, route, freeze_base, base, key, one_forward=False)
    try:
        with m:
            yield Block(m)
    finally:
        _inject.close(m)
    missed = m.missed()
    if m.hit and missed:
        raise _inject.missed_error(missed, "lf.applied")


# ----------------------------------------------------------------------------- merge
@torch.no_grad()
def merge(model: nn.Module, params: Params, *, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Dense weights (and biases) that reproduce ``call``: ``functional_call(model, merge(model, p), x)``.

    One exact rule for every variant (each is affine in x). For quantized layers the result is
    dense (dequantized weight + adapter); quantizing it again changes outputs.

    Args:
        model, params: as in ``call`` (unstacked params).
        base: the weights of a stateless model (see ``call``).
    Returns:
        ``{f"{path}.weight": W', f"{path}.bias": b'}`` for each adapted layer, stored the way the
        module stores them (Conv1D transposed); biases only where the variant changes them.
    Raises:
        ValueError: a targeted weight tied to another parameter (``functional_call`` would replace
        both), or leaves that do not fit their layer.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = lf.init(0, model, lf.IA3Config(), targets=r"^0$")
        >>> sorted(lf.merge(model, params))
        ['0.bias', '0.weight']
    """
    swap, aliases = _base.swap_map(model, base, freeze=True)
    out = {}
    for path, module, kind, variant, leaves in _plan.checked_entries(model, params, swap, aliases)[0]:
        w = _layers.weight_of(module, kind)
        name = path if kind is _layers.raw_kind(kind.param) else f"{path}.{kind.param}"
        names = aliases.get(id(w), [])
        if len(names) > 1:
            raise ValueError(
                f"{name} is tied to {[n for n in names if n != name]}: a merged "
                f"{name} passed to functional_call would replace those too. Untie it first "
                f"(model.{name} = nn.Parameter(model.{name}.clone())) or use lf.call"
            )
        W = _layers.values(_layers.weight_view(module, kind, swap))
        bias = _layers.bias_of(module, kind)
        b = None if bias is None else swap.get(id(bias), bias).detach()
        W_new, b_new = variants.merged_weights(variant, leaves, W.detach(), b)
        out[name] = kind.store(W_new, swap.get(id(w), w))
        if b_new is not None:
            out[f"{path}.{kind.bias_param}"] = b_new
    return out
