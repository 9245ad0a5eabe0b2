"""How adapters reach a model without touching it: per-thread modes, on one of two paths.

A mode (``lf.call``, ``lf.applied``, calibration) is registered for the calling thread only.

- *Light* (``_Mode.light``: no ``base=``, no route, eager code, and no autograd through trainable base
  weights): the mode is not on torch's stack. One process-wide module forward hook (torch's
  ``register_module_forward_hook``, installed the first time and kept) looks up the calling thread's
  modes and, if one targets the module just called, returns the handler's output with a
  ``_layers.QuantizedWeight`` whose product for the module's own input is the output the layer just
  computed (nothing computed twice). A forward pre-hook pushes a light mode onto torch's stack for
  exactly those of its model's calls that record gradients through trainable base weights, and a
  nested full mode pushes the light ones below it first, so the order of nesting is kept.
- *Op by op* (otherwise, and for module kinds' substitutions): the mode is a ``TorchFunctionMode`` on
  torch's stack and every torch function call on this thread passes through
  ``_Mode.__torch_function__``: when a targeted layer's *current* weight reaches that layer kind's
  operation (``F.linear`` for nn.Linear, ``torch.addmm`` for GPT-2's Conv1D, see ``_layers``), the call
  is answered by the layer's handler (the variant's ``apply``, or a calibration statistic); every
  other call gets its arguments substituted: a model tensor listed in ``swap`` (the detached base
  weights, or the ``base=`` weights of a stateless model) is replaced by its value.

Nothing is assigned to any module, so concurrent calls on one shared model from many threads are
each exact, nested calls compose (the innermost answers a layer both target and hands on every call
it does not answer), hooks installed by other libraries (accelerate's instance ``forward``, FSDP2's
parameter swaps) run as they are, and an exception leaves nothing behind. The weight is looked up on
the module at the moment of the call, so a wrapper that swaps it for an unsharded or on-device copy
during the forward still matches. Module kinds (bitsandbytes' quantized layers: their packed weight
never reaches a plain op) are always adapted around the module's own call, by the same hook.

Threads: a thread started (``threading.Thread.start``) while modes are active on this thread runs
inside the same modes for its whole run (lite_fn wraps ``Thread.start`` once, the first time a mode
is entered, to note them); after the call or block that owns a mode has ended, such a thread's use
of a targeted layer raises instead of silently computing the base model. ``bound`` hands the
active modes to any callable, for pools made earlier. Threads started before stay plain.

Activation checkpointing: ``checkpoint_context`` (torch.utils.checkpoint's ``context_fn``)
re-enters the forward's modes for the recompute. A targeted layer computed inside a
checkpoint without it, or with gradients off inside a training call (reentrant checkpointing's
forward), raises: its adapters would otherwise get no gradient.

Limits: a layer is recognised only through its kind's operation on its own weight (op by op) or its
own module call (light path, module kinds); a targeted layer that the forward never computes that
way is reported after the call (``missed``), never skipped silently.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import _layers, linalg
from ._layers import LayerKind, QuantizedWeight

# (x, W as (d_out, d_in), bias or None, the layer's own base product) -> the layer's output
Handler = Callable[[Tensor, Tensor, "Tensor | None", Callable[[], Tensor]], Tensor]


class Layer(NamedTuple):
    path: str
    module: nn.Module
    kind: LayerKind
    handler: Handler
    dtype: torch.dtype | None = None  # the weight's dtype the leaves were checked against (None: not checked)
    # light path, a variant that only transforms the layer's input (its ``apply_input``): x -> x', given to
    # the layer itself by the forward pre-hook, so the layer's one product is the adapted output
    input_handler: Callable[[Tensor], Tensor] | None = None
    # substitution kinds (``kind.substitute``): (W, b) as stored -> (W', b') as stored, the merged weight and bias that
    # every use of the module's weight and bias sees during the forward
    merged: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]] | None = None
    leaves: dict[str, Tensor] | None = None  # the adapter's leaves (their in-place versions key a block's W')


_CHECKPOINT_HINT = (
    "non-reentrant checkpointing with lf.checkpoint_context, e.g. model.gradient_checkpointing_enable("
    'gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": lf.checkpoint_context}) or '
    "torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=lf.checkpoint_context)"
)


class _Mode(TorchFunctionMode):
    """One call's or block's adapters (``with mode(...) as m: model(...)``); ``m.missed()`` after the forward and
    ``close(m)`` when the owning call or block ends. ``detach_only``: ``swap`` holds only detached
    copies of the model's own tensors (no ``base=`` values), so ops run without gradient skip the
    substitution. ``training``: whether the call trains (checked when a layer runs without gradient).
    ``model``: a light mode (see ``_Mode.__enter__``) for this model; None: op by op. ``own_weights``:
    builds ``swap`` (then given as {}) when a light mode first needs it."""

    def __init__(
        self,
        layers: list[Layer],
        swap: dict[int, Tensor],
        freeze: bool,
        detach_only: bool = False,
        owner: str = "lf.call",
        training: Callable[[], bool] | None = None,
        model: nn.Module | None = None,
        own_weights: Callable[[], dict[int, Tensor]] | None = None,
    ):
        super().__init__()
        self._own_weights = own_weights  # light modes: builds ``swap`` when first needed (it is {} until then)
        self.layers = layers
        # light: adapted around the targeted modules' own calls (global module hooks), not op by op; see
        # __enter__. Needs the model (whose module calls get the op-by-op mode when they need substitution).
        self.light = model is not None
        self.model = model
        self._module_ids: set[int] | None = None
        self.owner = owner  # "lf.call" / "lf.applied" / "calibration": named in errors
        # () -> whether this call trains (grad on at its start, leaves that require grad); computed on demand
        self.training = training
        self.grad_at_start = torch.is_grad_enabled()
        self.trains: bool | None = None  # self.training(), once asked
        self.closed = False  # set when the owning call or block ends (threads started inside may outlive it)
        self.swap = swap  # id(model tensor) -> the tensor to use instead
        self.freeze = freeze
        # swap only detaches (no base= values): an op run without gradient gets the same result either way
        self.detach_only = detach_only
        self.by_op: dict = {}
        # whether a layer takes its adapter on its input (light path): only then does the pre-hook look it up
        self.adapts_inputs = any(layer.input_handler is not None for layer in layers)
        self.by_module: dict[int, Layer] = {}
        # substitution kinds: id(the module's weight or bias) -> (layer, 0 for the weight / 1 for the bias)
        self.by_param: dict[int, tuple[Layer, int]] = {}
        for layer in layers:
            if layer.kind.substitute:
                self.by_param[id(_layers.weight_of(layer.module, layer.kind))] = (layer, 0)
                b = _layers.bias_of(layer.module, layer.kind)
                if b is not None:
                    self.by_param[id(b)] = (layer, 1)
                continue
            if layer.kind.op is None or self.light:
                self.by_module[id(layer.module)] = layer
            if layer.kind.op is not None:
                self.by_op.setdefault(layer.kind.op, []).append(layer)
                if layer.merged is not None and not self.light:  # any other use of its weight sees W' (op by op)
                    self.by_param[id(layer.module.weight)] = (layer, 0)
        self.by_weight = {id(layer.module.weight): layer for layer in layers if layer.kind.op is not None}
        self.merged_values: dict = {}  # (path, grad mode, checkpoint region, versions) -> (W', b') for this call
        self.hit: set[str] = set()
        if self.by_module:
            _install_module_hook()

    def __enter__(self):
        if not torch.compiler.is_compiling():  # traced code starts no threads (and cannot take the lock)
            _note_thread_starts()
        if self.light:  # registered on this thread only; module hooks adapt, and push it where ops need substitution
            _local.modes.append(self)
            return self
        _push_lights(self)  # light modes below go on torch's stack first, so this one stays innermost
        out = super().__enter__()
        _local.modes.append(self)
        return out

    def __exit__(self, *exc):
        stack = _local.modes
        if stack and stack[-1] is self:
            stack.pop()
        if self.light:
            return None
        out = super().__exit__(*exc)
        _pop_lights(self)
        return out

    def covers(self, module: nn.Module) -> bool:
        """Whether ``module`` belongs to this mode's model (its module calls need the mode's substitutions)."""
        if self._module_ids is None:
            self._module_ids = {id(m) for m in self.model.modules()} if self.model is not None else set()
        return id(module) in self._module_ids

    def needs_ops(self) -> bool:
        """A light mode whose forwards must substitute tensors now (detached base weights under autograd)."""
        if self.closed or not torch.is_grad_enabled():
            return False
        self.own_weights_ready()
        return bool(self.swap)

    def own_weights_ready(self) -> None:
        if self._own_weights is not None:
            self.swap, self._own_weights = self._own_weights(), None

    def _entering(self, layer: Layer) -> None:
        """Checks at a targeted layer's product: this mode is still live, the weight kept its dtype, and
        the product is recorded where its adapters get gradients (not a checkpoint without
        ``checkpoint_context``, not a gradient-free region of a training call)."""
        if self.closed:
            raise RuntimeError(
                f"{layer.path}: this thread ({threading.current_thread().name}) was started inside {self.owner}, "
                f"which has ended; a forward here would silently be the base model. Keep the "
                f"block open until the thread is done (iterate the streamer inside the block, join the thread), or "
                f"hand work to a pool with `with lf.applied(...) as block: pool.submit(block.bind(fn), ...)`"
            )
        if layer.dtype is not None:
            w = _layers.weight_of(layer.module, layer.kind)
            if isinstance(w, Tensor) and w.dtype != layer.dtype and layer.kind.op is not None:
                raise TypeError(
                    f"{layer.path}: the layer's weight is now {w.dtype}, but {self.owner} checked its adapter leaves "
                    f"against {layer.dtype} (the model changed dtype during the call or block, so the adapters and "
                    f"the detached base weights no longer match it); leave the block, cast the params too "
                    f"(optree.tree_map(lambda t: t.to({w.dtype}), params)) and enter a new one"
                )
        if torch.compiler.is_compiling():
            return  # traced: torch.compile handles checkpoint regions itself (and cannot read saved-tensor hooks)
        if torch.is_grad_enabled():
            hooks = _top_saved_tensors_hooks()
            if hooks is not None and _is_checkpoint_pack(hooks[0]) and torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"{layer.path} is computed inside torch.utils.checkpoint under a torch.func transform (vmap, grad): "
                    f"torch cannot checkpoint there (the recompute runs during backward, outside the transform). "
                    f"Evaluate K stacked adapters with route= instead (lf.call(model, stacked, x, route=route), one "
                    f"adapter index per example), which checkpoints exactly, or turn checkpointing off"
                )
            if hooks is not None and hooks[0] not in _local.checkpoints and _is_checkpoint_pack(hooks[0]):
                raise RuntimeError(
                    f"{layer.path} is computed inside torch.utils.checkpoint without lf.checkpoint_context: the "
                    f"recompute during backward would run without the adapters (wrong gradients). Use {_CHECKPOINT_HINT}"
                )
        elif self.grad_at_start and self._trains() and (self.owner == "lf.call" or _under_reentrant_checkpoint()):
            raise RuntimeError(
                f"{layer.path} is computed with gradients off inside a training {self.owner} (reentrant "
                f"activation checkpointing runs the forward under no_grad and re-runs it during backward without "
                f"the adapters), so its adapters would silently get no gradient; use {_CHECKPOINT_HINT}. If the "
                f"model really computes this layer without gradients, call it under torch.no_grad() as a whole"
            )

    def _trains(self) -> bool:
        if self.trains is None:
            self.trains = self.training is not None and bool(self.training())
        return self.trains

    def module_output(self, layer: Layer, args: tuple, output: Tensor) -> Tensor:
        """A module kind's adapted output, from the input it was called with and its own output."""
        self._entering(layer)
        self.hit.add(layer.path)
        x = args[0]
        gradient_ok = layer.kind.passes_gradient is None or layer.kind.passes_gradient(layer.module)
        if torch.is_grad_enabled() and x.requires_grad and not (output.requires_grad and gradient_ok):
            raise RuntimeError(
                f"{layer.path}: the quantized layer ({type(layer.module).__name__}) returns an output with no gradient to its "
                f"input, so adapters before it would silently get wrong (zero) gradients. bitsandbytes does this on CPU "
                f"once a 4-bit layer has run in eval mode without gradients (it repacks the weight for inference); for "
                f"inference run under torch.no_grad(); to train, call model.train() before the first forward, or reload it"
            )
        b = getattr(layer.module, "bias", None)
        b = None if b is None else self._value(b)
        # a Tensor to the variant: its F.linear of x is the output the layer just computed; shape, dtype, values
        W = QuantizedWeight(layer.module, layer.kind, x, output, b)
        return layer.handler(x, W, b, lambda: output)  # type: ignore[arg-type]

    def _match(self, func, args, kwargs) -> Layer | None:
        layers = self.by_op[func]
        pos = layers[0].kind.weight_arg
        w = args[pos] if len(args) > pos else kwargs.get("weight", kwargs.get("mat2"))
        if not isinstance(w, Tensor):
            return None
        layer = self.by_weight.get(id(w))
        if layer is not None and layer.module.weight is w:
            return layer
        ptr = w.data_ptr() if not w.is_meta and linalg.eager_values(w) else None
        for layer in layers:  # the weight was swapped during the forward (FSDP2, offload): look it up now
            own = layer.module.weight
            if own is w:
                return layer
            # another active mode (a nested call or block) handed it on detached: the same values, same layout
            if (
                ptr is not None
                and isinstance(own, Tensor)
                and own.data_ptr() == ptr
                and (own.shape, own.stride(), own.dtype) == (w.shape, w.stride(), w.dtype)
                and not w.requires_grad
            ):
                return layer
        return None

    def _value(self, t):
        v = self.swap.get(id(t))
        if v is None:
            return t.detach() if self.freeze and isinstance(t, Tensor) and t.requires_grad else t
        return v

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        swap = self.swap
        if func in self.by_op:
            layer = self._match(func, args, kwargs)
            unpacked = None if layer is None else layer.kind.unpack(args, kwargs)
            if layer is not None and unpacked is not None:
                self._entering(layer)
                self.hit.add(layer.path)
                x, b = unpacked
                weight: Tensor = layer.module.weight  # type: ignore[assignment]
                W = layer.kind.dense(self._value(weight))
                return layer.handler(
                    x, W, None if b is None else self._value(b), lambda: self._own_product(func, args, kwargs, weight, b)
                )
        if self.by_param and getattr(func, "__name__", None) != "__set__":
            args, kwargs = self._substituted(args, kwargs)
        if (
            swap
            and not self.closed
            and not (self.detach_only and not torch.is_grad_enabled())
            and getattr(func, "__name__", None) != "__set__"  # `param.data = …` (module.to/.double()) sets the model's own
        ):
            args = tuple(swap.get(id(a), a) if isinstance(a, Tensor) else a for a in args)
            if kwargs:
                kwargs = {k: swap.get(id(v), v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _substituted(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args`` and ``kwargs`` with each substitution kind's weight (and bias) replaced by its merged value."""
        by_param = self.by_param
        if not any(id(a) in by_param for a in args if isinstance(a, Tensor)) and not any(
            id(v) in by_param for v in kwargs.values() if isinstance(v, Tensor)
        ):
            return args, kwargs
        args = tuple(self._merged_value(a) if isinstance(a, Tensor) else a for a in args)
        kwargs = {k: self._merged_value(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return args, kwargs

    def _merged_value(self, t: Tensor) -> Tensor:
        hit = self.by_param.get(id(t))
        if hit is None:
            return t
        layer, which = hit
        module, kind = layer.module, layer.kind
        w, b = _layers.weight_of(module, kind), _layers.bias_of(module, kind)
        if t is not (w, b)[which]:  # not the module's own tensor any more (swapped): leave it
            return t
        self._entering(layer)
        self.hit.add(layer.path)
        grad = torch.is_grad_enabled()
        # W' is computed once per forward and kept for the call: per (grad mode, checkpoint region: a recompute
        # computes its own); in a block, where many forwards run, only while nothing it was computed from changed
        # in place (gradient-free forwards: generation), never across forwards that record gradients
        hooks = _top_saved_tensors_hooks()
        key = (layer.path, grad, None if hooks is None else id(hooks[0]))
        versions = None
        if self.owner != "lf.call" and not torch._C._are_functorch_transforms_active():  # pyright: ignore[reportAttributeAccessIssue]
            if grad:
                key = None
            else:
                versions = (
                    w._version,
                    None if b is None else b._version,
                    tuple(v._version for v in (layer.leaves or {}).values()),
                )
        cached = None if key is None else self.merged_values.get(key)
        if cached is not None and cached[0] == versions:
            return cached[1][which]
        assert layer.merged is not None
        value = layer.merged(self._value(w), None if b is None else self._value(b))
        if key is not None:
            self.merged_values[key] = (versions, value)
        return value[which]  # type: ignore[return-value]

    def _own_product(self, func, args: tuple, kwargs: dict, weight: Tensor, b: Tensor | None) -> Tensor:
        """The layer's own operation with its weight and bias substituted (a variant's ``base`` thunk)."""
        own = (weight, b)
        args = tuple(self._value(a) if any(a is o for o in own if o is not None) else a for a in args)
        kwargs = {k: self._value(v) if any(v is o for o in own if o is not None) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def missed(self) -> list[str]:
        return [layer.path for layer in self.layers if layer.path not in self.hit]


class _ThreadModes(threading.local):
    def __init__(self):  # runs once per thread, on its first access: every thread starts with its own empty stack
        self.modes: list[_Mode] = []
        self.pushed: set[int] = set()  # ids of light modes now on torch's mode stack (on this thread)
        self.groups: list[tuple[object, list[_Mode]]] = []  # (who pushed them: a module or a mode, the light modes)
        self.checkpoints: list = []  # pack hooks of the torch.utils.checkpoint regions opened with checkpoint_context
        self.adapted_inputs: list[nn.Module] = []  # modules now running on an input their pre-hook adapted


_local = _ThreadModes()
_hook_lock = threading.Lock()
_hook_handle = None


def _module_hook(module: nn.Module, args: tuple, output):
    stack = _local.modes
    if not stack:
        return None
    adapted = _local.adapted_inputs
    if adapted and adapted[-1] is module:
        adapted.pop()
        return None  # its pre-hook gave it the adapted input: the output is already the adapted one
    for m in reversed(stack):  # the innermost active call that targets this module adapts it
        layer = m.by_module.get(id(module))
        if layer is not None and layer.module is module:
            if layer.kind.op is not None and id(m) in _local.pushed:
                return None  # on torch's stack for this call: its op was answered there
            return m.module_output(layer, args, output)
    return None


def _push_lights(owner: object) -> None:
    """Put this thread's light modes that are not on torch's stack onto it, outermost first (a group
    that ``owner`` pops again): for a module call that needs substitutions, or below a nested full mode."""
    lights = [m for m in _local.modes if m.light and id(m) not in _local.pushed]
    for m in lights:
        m.own_weights_ready()
        TorchFunctionMode.__enter__(m)
        _local.pushed.add(id(m))
    _local.groups.append((owner, lights))


def _pop_lights(owner: object) -> None:
    groups = _local.groups
    if groups and groups[-1][0] is owner:
        _, lights = groups.pop()
        for m in reversed(lights):
            TorchFunctionMode.__exit__(m, None, None, None)
            _local.pushed.discard(id(m))


def _pre_hook(module: nn.Module, args: tuple):
    stack = _local.modes
    if stack and torch.is_grad_enabled():
        for m in stack:
            if m.light and id(m) not in _local.pushed and m.needs_ops() and m.covers(module):
                _push_lights(module)  # this call (and everything it calls) runs op by op
                return None
    if stack and any(m.adapts_inputs for m in stack):  # every module call passes here: look up only if needed
        for m in reversed(stack):  # the innermost active call that targets this module adapts it (as _module_hook)
            layer = m.by_module.get(id(module))
            if layer is not None and layer.module is module:
                if layer.input_handler is None or id(m) in _local.pushed or not args or not isinstance(args[0], Tensor):
                    return None
                m._entering(layer)
                x = layer.input_handler(args[0])
                m.hit.add(layer.path)
                _local.adapted_inputs.append(module)  # popped by _module_hook, or by _pop_hook if the forward raises
                return (x, *args[1:])
    return None


def _pop_hook(module: nn.Module, args: tuple, output):
    adapted = _local.adapted_inputs
    if adapted and adapted[-1] is module:  # the forward raised before _module_hook saw it
        adapted.pop()
    groups = _local.groups
    if groups and groups[-1][0] is module:
        _pop_lights(module)


def _install_module_hook() -> None:
    global _hook_handle
    with _hook_lock:  # installed once and kept: removing a global hook while other threads iterate them is unsafe
        if _hook_handle is None:
            register = nn.modules.module
            _hook_handle = (
                register.register_module_forward_hook(_module_hook),  # pyright: ignore[reportArgumentType]  (a forward hook may return a new output; torch annotates None)
                register.register_module_forward_pre_hook(_pre_hook),  # pyright: ignore[reportArgumentType]  (a pre-hook may return new args)
                register.register_module_forward_hook(_pop_hook, always_call=True),  # after _module_hook, also on errors
            )


mode = _Mode  # the mode to enter: ``with mode(layers, swap, freeze, ...) as m: model(...)`` (see _Mode)


def close(m: _Mode) -> None:
    """The call or block that owns ``m`` has ended: threads started inside it that still hold it now
    raise at a targeted layer, and pass every other op through untouched."""
    m.closed = True


# ----------------------------------------------------------------------------- threads
_start_lock = threading.Lock()
_plain_start: Callable | None = None


def _note_thread_starts() -> None:
    """Wrap ``threading.Thread.start`` (once per process) so that a thread started while modes are
    active on the starting thread runs its ``run`` inside the same modes."""
    global _plain_start
    if _plain_start is not None:
        return
    with _start_lock:
        if _plain_start is not None:
            return
        plain = threading.Thread.start

        @functools.wraps(plain)
        def start(self: threading.Thread):
            modes = tuple(_local.modes)
            if modes:
                self.run = functools.partial(_run_in, modes, self.run)  # pyright: ignore[reportAttributeAccessIssue]
            return plain(self)

        threading.Thread.start = start  # pyright: ignore[reportAttributeAccessIssue]
        _plain_start = plain


def _run_in(modes: tuple[_Mode, ...], fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on this thread inside ``modes`` (outermost first)."""
    with contextlib.ExitStack() as stack:
        for m in modes:
            stack.enter_context(m)
        return fn(*args, **kwargs)


def bound(fn: Callable, mode: _Mode) -> Callable:
    """``fn`` bound to ``mode`` (with the modes it is nested in, when it is active on this thread):
    called on any thread (a pool made earlier, a callback), it runs inside them; after the call or
    block that owns ``mode`` has ended, a targeted layer raises."""
    if not callable(fn):
        raise TypeError(f"block.bind(fn): fn must be callable, got {type(fn).__name__}")
    stack = _local.modes
    at = next((i for i, m in enumerate(stack) if m is mode), None)
    modes = (mode,) if at is None else tuple(stack[: at + 1])
    return functools.wraps(fn)(functools.partial(_run_in, modes, fn))


# ----------------------------------------------------------------------------- checkpointing
def _top_saved_tensors_hooks():
    """(pack, unpack) of the innermost ``saved_tensors_hooks`` on this thread, or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)  # pyright: ignore[reportAttributeAccessIssue]


def _is_checkpoint_pack(pack) -> bool:
    # torch.utils.checkpoint's non-reentrant forward saves through _checkpoint_hook's pack_hook
    return getattr(pack, "__qualname__", "").startswith("_checkpoint_hook.")


@functools.cache
def _reentrant_forward_code():
    import torch.utils.checkpoint as cp

    return cp.CheckpointFunction.forward.__code__


def _under_reentrant_checkpoint(depth: int = 64) -> bool:
    code = _reentrant_forward_code()
    f = sys._getframe(1)
    while f is not None and depth:
        if f.f_code is code:
            return True
        f, depth = f.f_back, depth - 1
    return False


class _MarkCheckpoint:
    """The forward side: notes the checkpoint region just opened as one whose recompute re-enters
    the modes (so a targeted layer inside it is not refused)."""

    def __enter__(self):
        hooks = _top_saved_tensors_hooks()
        _local.checkpoints.append(None if hooks is None else hooks[0])

    def __exit__(self, *exc):
        _local.checkpoints.pop()


class _Recompute:
    """The recompute side: re-enters (open copies of) the modes that were active at the forward."""

    def __init__(self, modes: tuple[_Mode, ...]):
        self.modes = modes
        self.stack: contextlib.ExitStack | None = None

    def __enter__(self):
        stack = contextlib.ExitStack()
        for m in self.modes:
            again = copy.copy(m)  # shares layers, swap and hit set; open even if the call has returned
            again.closed = False
            stack.enter_context(again)
        self.stack = stack

    def __exit__(self, *exc):
        stack, self.stack = self.stack, None
        assert stack is not None
        return stack.__exit__(*exc)


def checkpoint_context() -> tuple[_MarkCheckpoint, _Recompute]:
    r"""``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
    recompute during backward sees exactly the adapters (lite_fn modes) active at the forward, so
    checkpointed layers' adapters get the gradients of the unchecked step.

    Pass it as it is (not called): ``checkpoint(fn, x, use_reentrant=False,
    context_fn=lf.checkpoint_context)``, or through transformers:
    ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
    "context_fn": lf.checkpoint_context})``. Outside any lite_fn call it changes nothing.

    Example:
        >>> import torch, lite_fn as lf
        >>> from torch.utils.checkpoint import checkpoint
        >>> block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = block
        ...     def forward(self, x):
        ...         return checkpoint(self.block, x, use_reentrant=False, context_fn=lf.checkpoint_context)
        >>> net = Net()
        >>> params = lf.init(0, net, lf.LoRAConfig(r=2), targets=r"block\.0$")
        >>> _ = params["block.0"]["lora"]["B"].data.normal_()  # a trained-looking adapter
        >>> lf.call(net, params, torch.randn(4, 8)).sum().backward()
        >>> params["block.0"]["lora"]["A"].grad is not None
        True
    """
    return _MarkCheckpoint(), _Recompute(tuple(_local.modes))


def missed_error(paths: list[str], what: str) -> RuntimeError:
    kinds = "F.linear (nn.Linear), torch.addmm (Conv1D), their own call, or a use of their weight"
    names = {p.rpartition(".")[2] for p in paths}  # the layers' own names (dt_proj), for one pattern over all of them
    first = "(" + "|".join(sorted(names)) + ")" if len(names) > 1 else names.pop()
    return RuntimeError(
        f"{what}: targeted layers {paths} were never computed through {kinds} during the forward, so their adapters "
        f"did not act. Drop them from params/targets if the forward does not use them. If the model uses their "
        f"weight another way (e.g. `layer.weight @ x` without calling the layer) in a forward without gradients, "
        f"target the weight's own path instead (targets=r'{first}\\.weight$'): every use of it then sees the "
        f"adapted weight"
    )
