"""How adapters reach a model without touching it: a ``TorchFunctionMode`` for one thread.

While the mode is active (``lf.call``, ``lf.applied``, calibration), every torch function call on
this thread passes through ``_Mode.__torch_function__``:

- when a targeted layer's *current* weight reaches that layer kind's operation (``F.linear`` for
  nn.Linear, ``torch.addmm`` for GPT-2's Conv1D, see ``_layers``), the call is answered by the
  layer's handler (the variant's ``apply``, or a calibration statistic) instead;
- every other call gets its arguments substituted: a model tensor listed in ``swap`` (the
  detached base weights, or the ``base=`` weights of a stateless model) is replaced by its value.

Nothing is assigned to any module, so concurrent calls on one shared model from many threads are
each exact (torch keeps the mode stack per thread), nested calls compose (the inner mode is on top
and hands every call it does not answer to the outer one), hooks installed by other libraries
(accelerate's instance ``forward``, FSDP2's parameter swaps) run as they are, and an exception
leaves nothing behind. The weight is looked up on the module at the moment of the call, so a
wrapper that swaps it for an unsharded or on-device copy during the forward still matches.
Module kinds (bitsandbytes' quantized layers: their packed weight never reaches a plain op) are
adapted around the module's own call instead: one process-wide forward hook (torch's
``register_module_forward_hook``), installed the first time such a layer is adapted, looks up the
calling thread's active modes and, if one targets the module, returns the handler's output with a
``_layers.QuantizedWeight`` whose product for the module's own input is the output the layer just
computed. On every other module and thread the hook returns at once.

Limits: a layer is recognised only through its kind's operation on its own weight (or its own
call, for module kinds); a targeted layer that the forward never computes that way is reported
after the call (``missed``), never skipped silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._layers import LayerKind, QuantizedWeight

# (x, W as (d_out, d_in), bias or None, the layer's own base product) -> the layer's output
Handler = Callable[[Tensor, Tensor, "Tensor | None", Callable[[], Tensor]], Tensor]


class Layer(NamedTuple):
    path: str
    module: nn.Module
    kind: LayerKind
    handler: Handler


class _Mode(TorchFunctionMode):
    def __init__(self, layers: list[Layer], swap: dict[int, Tensor], freeze: bool, detach_only: bool = False):
        super().__init__()
        self.layers = layers
        self.swap = swap  # id(model tensor) -> the tensor to use instead
        self.freeze = freeze
        # swap only detaches (no base= values): an op run without gradient gets the same result either way
        self.detach_only = detach_only
        self.by_op: dict = {}
        self.by_module: dict[int, Layer] = {}
        for layer in layers:
            if layer.kind.op is None:
                self.by_module[id(layer.module)] = layer
            else:
                self.by_op.setdefault(layer.kind.op, []).append(layer)
        self.by_weight = {id(layer.module.weight): layer for layer in layers if layer.kind.op is not None}
        self.hit: set[str] = set()
        if self.by_module:
            _install_module_hook()

    def __enter__(self):
        out = super().__enter__()
        _active_modes().append(self)
        return out

    def __exit__(self, *exc):
        stack = _active_modes()
        if stack and stack[-1] is self:
            stack.pop()
        return super().__exit__(*exc)

    def module_output(self, layer: Layer, args: tuple, output: Tensor) -> Tensor:
        """A module kind's adapted output, from the input it was called with and its own output."""
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
        W = QuantizedWeight(layer.module, layer.kind, x, output)  # a Tensor to the variant: F.linear, shape, dtype
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
        for layer in layers:  # the weight was swapped during the forward (FSDP2, offload): look it up now
            if layer.module.weight is w:
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
                self.hit.add(layer.path)
                x, b = unpacked
                weight: Tensor = layer.module.weight  # type: ignore[assignment]
                W = layer.kind.dense(self._value(weight))
                return layer.handler(
                    x, W, None if b is None else self._value(b), lambda: self._own_product(func, args, kwargs, weight, b)
                )
        if swap and not (self.detach_only and not torch.is_grad_enabled()):
            args = tuple(swap.get(id(a), a) if isinstance(a, Tensor) else a for a in args)
            if kwargs:
                kwargs = {k: swap.get(id(v), v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)

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


_local = _ThreadModes()
_hook_lock = threading.Lock()
_hook_handle = None


def _active_modes() -> list[_Mode]:
    return _local.modes


def _module_hook(module: nn.Module, args: tuple, output):
    stack = _local.modes
    if not stack:
        return None
    for m in reversed(stack):  # the innermost active call that targets this module adapts it
        layer = m.by_module.get(id(module))
        if layer is not None and layer.module is module:
            return m.module_output(layer, args, output)
    return None


def _install_module_hook() -> None:
    global _hook_handle
    with _hook_lock:  # installed once and kept: removing a global hook while other threads iterate them is unsafe
        if _hook_handle is None:
            _hook_handle = nn.modules.module.register_module_forward_hook(_module_hook)  # pyright: ignore[reportArgumentType]  (a forward hook may return a new output; torch annotates None)


def mode(layers: list[Layer], swap: dict[int, Tensor], freeze: bool, detach_only: bool = False) -> _Mode:
    """The mode to enter (``with mode(...) as m: model(...)``); ``m.missed()`` after the forward.
    ``detach_only``: ``swap`` holds only detached copies of the model's own tensors (no ``base=``
    values), so ops run without gradient skip the substitution."""
    return _Mode(layers, swap, freeze, detach_only)


def missed_error(paths: list[str], what: str) -> RuntimeError:
    kinds = "F.linear (nn.Linear), torch.addmm (Conv1D) or their own call (quantized layers)"
    return RuntimeError(
        f"{what}: targeted layers {paths} were never computed through {kinds} with their own weight during the forward, "
        f"so their adapters did not act. Drop them from params/targets if the forward does not use them; if the model "
        f"computes them another way (a custom forward, a fused or quantized kernel), lite_fn cannot adapt them exactly"
    )
