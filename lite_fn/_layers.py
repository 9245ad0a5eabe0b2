"""Which modules can carry an adapter: one ``LayerKind`` entry per layer type.

A kind says how to recognise the module and how its frozen product is reached:

- *op kinds* (nn.Linear, GPT-2's Conv1D) name the torch function their forward computes with the
  weight (the injection in ``_inject`` intercepts exactly that function when the module's *current*
  weight reaches it), how to read the input and bias from its arguments, and how a dense
  (d_out, d_in) weight relates to the stored one;
- *module kinds* (bitsandbytes' 4-bit and 8-bit layers, whose packed weight never reaches a plain
  op) are adapted around the module's own call: the variant's ``apply`` receives a
  ``QuantizedWeight`` instead of a tensor, whose ``F.linear`` is the layer's own quantized kernel and
  whose every other use sees the dequantized values (detached), as peft's DoRA norm does.

Adding a layer type is one entry here; nothing else in the library knows about layer types.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


class LayerKind(NamedTuple):
    name: str
    matches: Callable[[nn.Module], bool]
    op: Callable[..., Any] | None  # the torch function the forward calls with its weight; None: a module kind
    # (op kinds are also adapted around their module's call, as module kinds are, when no op needs substituting)
    weight_arg: int  # position of the stored weight in ``op``'s arguments
    unpack: Callable[[tuple, dict], tuple[Tensor, Tensor | None] | None]  # (x, bias) or None: not a plain call
    dense: Callable[[Tensor], Tensor]  # stored weight -> (d_out, d_in) values (dequantized for module kinds)
    store: Callable[[Tensor, Tensor], Tensor]  # ((d_out, d_in), the stored weight) -> W in the stored layout
    product: Callable[[nn.Module, Tensor, Tensor | None], Tensor] | None = None  # x Wᵀ + b by the layer's own kernel
    compute_dtype: Callable[[nn.Module], torch.dtype] | None = None  # the dtype the layer computes in
    passes_gradient: Callable[[nn.Module], bool] | None = None  # module kinds: False when the kernel drops input grads
    # substitution kinds (convolutions, embeddings, raw parameters, layers whose forward is not one op): every use
    # of the weight during the forward sees the variant's merged weight W' (exact: every variant is affine in x)
    substitute: bool = False
    param: str = "weight"  # the module attribute holding the adapted weight
    bias_param: str | None = "bias"  # and its bias (substitution kinds substitute it too)


def _is_plain_linear(m: nn.Module) -> bool:
    # A subclass that overrides forward (bitsandbytes' Linear4bit/Linear8bitLt, whose weight is
    # packed) computes something else than F.linear(x, weight): it is not this kind.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (y = x W + b, weight stored (d_in, d_out)); matched by duck type
    # so that transformers stays a test-only dependency.
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    x = args[0] if args else kwargs.get("input")
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, b


def _addmm_args(args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
    # Conv1D.forward: torch.addmm(bias, x.view(-1, d_in), weight); any beta/alpha is not Conv1D's product
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        return None
    return args[1], args[0]


# ----------------------------------------------------------------------------- bitsandbytes (optional)
def _is_bnb(class_name: str) -> Callable[[nn.Module], bool]:
    # matched by class, so bitsandbytes stays optional (imported only when such a layer is adapted)
    return lambda m: type(m).__name__ == class_name and type(m).__module__.startswith("bitsandbytes")


def _dequantize_4bit(w: Any) -> Tensor:
    import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]

    return bnb.functional.dequantize_4bit(  # pyright: ignore[reportAttributeAccessIssue]
        w.data, w.quant_state
    ).detach()


def _product_4bit(m: Any, x: Tensor, b: Tensor | None) -> Tensor:
    import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]

    # Linear4bit.forward without its in-place caching: x in the compute dtype, the packed kernel, back to x's dtype
    xc = x if m.compute_dtype is None else x.to(m.compute_dtype)
    return bnb.matmul_4bit(  # pyright: ignore[reportPrivateImportUsage]
        xc, m.weight, bias=None if b is None else b.to(xc.dtype), quant_state=m.weight.quant_state
    ).to(x.dtype)


def _dtype_4bit(m: Any) -> torch.dtype:
    return m.compute_dtype or (m.bias.dtype if m.bias is not None else torch.get_default_dtype())


def _passes_gradient_4bit(m: Any) -> bool:
    # bitsandbytes repacks a CPU 4-bit weight for inference on its first eval call without gradients; the
    # repacked kernel (gemv_4bit) has no autograd formula, so the layer's input would silently get no gradient
    return not getattr(m.weight.quant_state, "packing_format_for_cpu", False)


def _dequantize_8bit(w: Any) -> Tensor:
    scb = w.SCB if getattr(w, "SCB", None) is not None else torch.ones(w.shape[0], device=w.device)
    return (w.data.float() * scb.float()[:, None] / 127.0).detach()


def _product_8bit(m: Any, x: Tensor, b: Tensor | None) -> Tensor:
    import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]

    return bnb.matmul(x, m.weight, bias=b, state=m.state)  # pyright: ignore[reportPrivateImportUsage]


def _dtype_8bit(m: Any) -> torch.dtype:
    return m.bias.dtype if m.bias is not None else torch.get_default_dtype()


def _no_op_args(args: tuple, kwargs: dict):
    return None


def _product_linear(m: Any, x: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, m.weight, b)


def _product_conv1d(m: Any, x: Tensor, b: Tensor | None) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    y = rows @ m.weight if b is None else torch.addmm(b, rows, m.weight)
    return y.view(*x.shape[:-1], y.shape[-1])


def _weight_dtype(m: Any) -> torch.dtype:
    return m.weight.dtype


KINDS: tuple[LayerKind, ...] = (
    LayerKind(
        "nn.Linear",
        _is_plain_linear,
        torch.nn.functional.linear,
        1,
        _linear_args,
        lambda w: w,
        lambda W, like: W,
        _product_linear,
        _weight_dtype,
    ),
    LayerKind(
        "Conv1D", is_conv1d, torch.addmm, 2, _addmm_args, lambda w: w.T, lambda W, like: W.T, _product_conv1d, _weight_dtype
    ),
    LayerKind(
        "bitsandbytes Linear4bit",
        _is_bnb("Linear4bit"),
        None,
        0,
        _no_op_args,
        _dequantize_4bit,
        lambda W, like: W,
        _product_4bit,
        _dtype_4bit,
        _passes_gradient_4bit,
    ),
    LayerKind(
        "bitsandbytes Linear8bitLt",
        _is_bnb("Linear8bitLt"),
        None,
        0,
        _no_op_args,
        _dequantize_8bit,
        lambda W, like: W,
        _product_8bit,
        _dtype_8bit,
    ),
)


def _is_conv(m: nn.Module) -> bool:
    # nn.Conv1d/2d/3d (any stride, padding, padding mode, dilation, groups): the weight (out, in/groups, *k) is a
    # (out, in/groups · ∏k) matrix acting on each receptive field, as peft's conv layers treat it
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _is_other_linear(m: nn.Module) -> bool:
    # an nn.Linear subclass with a forward of its own (Falcon's FalconLinear: x @ W.T + b): its weight may never
    # reach F.linear, so every use of it sees W' instead; bitsandbytes' layers are matched before, as module kinds
    return isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward


def _substitution(name: str, matches, dense, store, param="weight", bias_param: str | None = "bias") -> LayerKind:
    return LayerKind(name, matches, None, 0, _no_op_args, dense, store, substitute=True, param=param, bias_param=bias_param)


KINDS += (
    _substitution("Conv", _is_conv, lambda w: w.reshape(w.shape[0], -1), lambda W, like: W.reshape(like.shape)),
    # F.embedding(ids, W_emb) = one_hot(ids) @ W_emb: a linear map from num_embeddings to embedding_dim, so its
    # (d_out, d_in) = W_embᵀ (peft's lora_embedding_A is (r, num_embeddings), lora_embedding_B (dim, r))
    _substitution("Embedding", lambda m: isinstance(m, nn.Embedding), lambda w: w.T, lambda W, like: W.T, bias_param=None),
    # nn.MultiheadAttention's packed input projection (3E, E) (its out_proj is a Linear, adapted by substitution too)
    _substitution(
        "MultiheadAttention",
        lambda m: isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None,
        lambda w: w,
        lambda W, like: W,
        param="in_proj_weight",
        bias_param="in_proj_bias",
    ),
    _substitution("nn.Linear subclass", _is_other_linear, lambda w: w, lambda W, like: W),
)
_LINEAR_INSIDE = _substitution("Linear (used by its parent)", _is_plain_linear, lambda w: w, lambda W, like: W)


@functools.cache
def raw_kind(name: str) -> LayerKind:
    """A raw parameter ``name`` of a module that is no layer kind (MoE experts' fused ``gate_up_proj`` (E, 2I, H)):
    a 2-D parameter is one (d_out, d_in) matrix, a 3-D one E of them (one adapter per expert, leaves (E, ...));
    peft's target_parameters read it the same way."""
    return _substitution("parameter", lambda m: False, lambda w: w, lambda W, like: W, param=name, bias_param=None)


def weight_of(module: nn.Module, kind: LayerKind) -> Tensor:
    """The module's adapted weight (its ``kind.param``)."""
    return getattr(module, kind.param)


def bias_of(module: nn.Module, kind: LayerKind) -> Tensor | None:
    return None if kind.bias_param is None else getattr(module, kind.bias_param, None)


class QuantizedWeight:
    """W of a layer adapted around its own call (a quantized layer always; any layer kind when no op
    needs substituting), as a variant's ``apply`` sees it.

    ``F.linear(x, W, b)`` runs the layer's own quantized kernel — for the input the layer was
    called with it is the layer's output itself (computed once, by the layer; handed out once, so the
    caller owns it and may accumulate into it in place — a second product recomputes); any other use of W
    (a weight norm, a transpose, ``W @ A.T``) sees its dequantized values, detached, computed when
    needed and not kept. ``shape``, ``dtype`` and ``device`` are those of the dense weight.
    """

    ndim = 2

    def __init__(
        self, module: Any, kind: LayerKind, x: Tensor | None = None, y: Tensor | None = None, bias: Tensor | None = None
    ):
        # bias: the value of the module's bias that its call used (detached while the base is frozen); the
        # output ``y`` is compared with and stripped of that value, never of the parameter itself (whose
        # gradient would otherwise reach the base model through y − bias)
        self.module, self.kind, self._x, self._y = module, kind, x, y
        self.bias_value = bias if bias is not None else getattr(module, "bias", None)
        if hasattr(module, "out_features"):
            self.shape = torch.Size((module.out_features, module.in_features))
        else:  # Conv1D: its stored weight is (d_in, d_out)
            self.shape = torch.Size(kind.dense(module.weight).shape)
        assert kind.compute_dtype is not None and kind.product is not None, f"{kind.name} is not a module kind"
        self.dtype = kind.compute_dtype(module)
        self.device = module.weight.device

    def dense(self) -> Tensor:
        return self.kind.dense(self.module.weight).to(self.dtype).detach()

    def linear(self, x: Tensor, b: Tensor | None) -> Tensor:
        own_bias = self.bias_value
        if self._x is not None and x is self._x:
            if b is None and own_bias is not None:
                return self._y - own_bias  # type: ignore[operator]  # peft's DoRA subtracts the bias from the base result the same way
            if b is None or own_bias is None or b is own_bias or torch.equal(b, own_bias):
                y, self._x, self._y = self._y, None, None  # handed out once: the caller may add into it in place
                return y  # type: ignore[return-value]
        return self.kind.product(self.module, x, b)  # type: ignore[misc]

    def detach(self) -> Tensor:
        return self.dense()

    @property
    def T(self) -> Tensor:
        return self.dense().T

    def __matmul__(self, other):
        return self.dense() @ other

    def __rmatmul__(self, other):
        return other @ self.dense()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x = args[0] if args else kwargs["input"]
            W = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(W, cls) and not isinstance(x, cls):
                return W.linear(x, b)
        args = tuple(a.dense() if isinstance(a, cls) else a for a in args)
        kwargs = {k: v.dense() if isinstance(v, cls) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.kind.name}, shape={tuple(self.shape)}, dtype={self.dtype})"


def kind_of(module: nn.Module, path: str, parent: nn.Module | None = None) -> LayerKind:
    """The layer kind of ``module`` (at ``path``; ``parent``: the module holding it, when known), or a TypeError
    naming the module and what lite_fn adapts."""
    if isinstance(parent, nn.MultiheadAttention) and _is_plain_linear(module):
        return _LINEAR_INSIDE  # MHA's out_proj: its parent's forward reads the weight directly (no module call)
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise TypeError(
            f"module {path!r} is an nn.Embedding with max_norm={module.max_norm}: its forward renormalises the weight "
            f"rows in place, which an adapted (merged) weight cannot follow; exclude it from `targets` or build it "
            f"without max_norm"
        )
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is None:
        raise TypeError(
            f"module {path!r} is an nn.MultiheadAttention with separate q/k/v projections (kdim/vdim differ from "
            f"embed_dim); lite_fn adapts its packed in_proj_weight only: target its parameters instead, e.g. "
            f"targets=r'{path}\\.(q|k|v)_proj_weight$'"
        )
    for kind in KINDS:
        if kind.matches(module):
            return kind
    own = [n for n, t in module.named_parameters(recurse=False) if t.ndim in (2, 3)]
    hint = (
        f"; to adapt its own parameters {own}, target their paths, e.g. targets=r'{path}\\.({'|'.join(own)})$'"
        if own
        else " — narrow `targets` so it matches such layers (e.g. r'(q_proj|v_proj)$')"
    )
    raise TypeError(
        f"module {path!r} is a {type(module).__module__}.{type(module).__name__}; lite_fn adapts {KIND_NAMES} "
        f"and 2-D / 3-D parameters by path{hint}"
    )


KIND_NAMES = (
    "nn.Linear (and subclasses), transformers' Conv1D, bitsandbytes' Linear4bit/Linear8bitLt, nn.Conv1d/2d/3d, "
    "nn.Embedding, nn.MultiheadAttention"
)


def is_adaptable(module: nn.Module) -> bool:
    return any(kind.matches(module) for kind in KINDS)


def is_linear(module: nn.Module) -> bool:
    """A linear layer (what default targets select): nn.Linear and its subclasses, Conv1D, quantized linears."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or (is_adaptable(module) and not _not_linear(module))


def is_conv(module: nn.Module) -> bool:
    return _is_conv(module)


def _not_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.MultiheadAttention)) or _is_conv(module)


def weight_view(module: nn.Module, kind: LayerKind, swap: dict[int, Tensor] | None = None) -> Tensor:
    """The module's current weight as (d_out, d_in), with ``swap`` (``base=`` / detached tensors) applied;
    for a module kind a ``QuantizedWeight`` (shape, dtype, device; values on demand): what leaf checks read."""
    if kind.op is None and not kind.substitute:
        return QuantizedWeight(module, kind)  # type: ignore[return-value]
    w: Tensor = weight_of(module, kind)
    return kind.dense(w if swap is None else swap.get(id(w), w))


def values(W: Tensor) -> Tensor:
    """Dense values of a weight view (dequantized in the compute dtype for quantized layers): what init,
    merge and peft_io read."""
    return W.dense() if isinstance(W, QuantizedWeight) else W
