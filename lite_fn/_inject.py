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
Limits: a layer is recognised only through its kind's operation on its own weight; a targeted
layer that the forward never computes that way is reported after the call (``missed``), never
skipped silently.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._layers import LayerKind

# (x, W as (d_out, d_in), bias or None, the layer's own base product) -> the layer's output
Handler = Callable[[Tensor, Tensor, "Tensor | None", Callable[[], Tensor]], Tensor]


class Layer(NamedTuple):
    path: str
    module: nn.Module
    kind: LayerKind
    handler: Handler


class _Mode(TorchFunctionMode):
    def __init__(self, layers: list[Layer], swap: dict[int, Tensor], freeze: bool):
        super().__init__()
        self.layers = layers
        self.swap = swap  # id(model tensor) -> the tensor to use instead
        self.freeze = freeze
        self.by_op: dict = {}
        for layer in layers:
            self.by_op.setdefault(layer.kind.op, []).append(layer)
        self.by_weight = {id(layer.module.weight): layer for layer in layers}
        self.hit: set[str] = set()

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
            if unpacked is not None:
                self.hit.add(layer.path)
                x, b = unpacked
                own = (layer.module.weight, b)
                sub_args = tuple(self._value(a) if any(a is o for o in own if o is not None) else a for a in args)
                sub_kwargs = {k: self._value(v) if any(v is o for o in own if o is not None) else v for k, v in kwargs.items()}
                W = layer.kind.dense(self._value(layer.module.weight))
                return layer.handler(x, W, None if b is None else self._value(b), lambda: func(*sub_args, **sub_kwargs))
        if swap:
            args = tuple(swap.get(id(a), a) if isinstance(a, Tensor) else a for a in args)
            if kwargs:
                kwargs = {k: swap.get(id(v), v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def missed(self) -> list[str]:
        return [layer.path for layer in self.layers if layer.path not in self.hit]


def mode(layers: list[Layer], swap: dict[int, Tensor], freeze: bool) -> _Mode:
    """The mode to enter (``with mode(...) as m: model(...)``); ``m.missed()`` after the forward."""
    return _Mode(layers, swap, freeze)


def missed_error(paths: list[str], what: str) -> RuntimeError:
    kinds = "F.linear (nn.Linear) or torch.addmm (Conv1D)"
    return RuntimeError(
        f"{what}: targeted layers {paths} were never computed through {kinds} with their own weight during the forward, "
        f"so their adapters did not act. Drop them from params/targets if the forward does not use them; if the model "
        f"computes them another way (a custom forward, a fused or quantized kernel), lite_fn cannot adapt them exactly")
