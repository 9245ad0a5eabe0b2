"""LoHa — Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", arXiv 2108.06098 (peft: tuners/loha, after LyCORIS).

    ΔW = s · (B₁A₁) ⊙ (B₂A₂),      s = alpha / r
    y  = x Wᵀ + b + x ΔWᵀ

    leaf        shape       peft tensor   init (peft, init_weights=True)                    trainable
    B1          (d_out, r)  hada_w1_a     kaiming-uniform(a=√5), fan-in r: U(±1/√r)         yes
    A1          (r, d_in)   hada_w1_b     U(±1/√d_in)                                       yes
    B2          (d_out, r)  hada_w2_a     U(±1/√r)                                          yes
    A2          (r, d_in)   hada_w2_b     0   (init_weights=False: U(±1/√d_in), as peft)    yes
    scale       ()          —             s                                                 frozen leaf

Identity at init: A2 = 0, so B₂A₂ = 0 and ΔW = 0 exactly; the added x ΔWᵀ is exactly zero and apply
returns the plain ``F.linear(x, W, b)`` bit for bit. (init_weights=False is not the identity.)

ΔW is not low-rank: a Hadamard product of two rank-r matrices has rank up to r². With the
face-splitting products
    P[o, (i j)] = s·B₁[o, i]·B₂[o, j]   (d_out, r²),      Q[(i j), k] = A₁[i, k]·A₂[j, k]   (r², d_in)
ΔW = P Q exactly. Costs — peft forms the dense ΔW at every forward (2r·d_out·d_in multiply-adds and a
d_out × d_in matrix), then x ΔWᵀ costs d_out·d_in per row; its custom autograd function saves only
the four factors and recomputes B₁A₁, B₂A₂ in backward. ``apply`` picks one of two forms per layer
from the shapes alone (``factored``), so a layer computes the same way whatever the batch:
  * factored, when r²·(d_out + d_in) < d_out·d_in (r = 8 on a 4096 × 4096 layer: 32× fewer
    multiply-adds per row): y = x Wᵀ + b + (x Qᵀ) Pᵀ — r²·(d_out + d_in) per row, and no d_out × d_in
    tensor forward or backward (autograd keeps P, Q and the (..., r²) projection);
  * dense otherwise (small layers, large r): ΔW formed once per call, as peft does, by a custom
    autograd function that like peft's saves only the factors (and recomputes the two products in
    backward), so autograd keeps one d_out × d_in matrix, ΔW itself (for x's gradient), as peft does.
Both add their product into the layer's own output (``linalg.linear_add``); W's values are never read,
so a quantized base works too.

Convolutions (nn.Conv1d/2d/3d, adapted by weight substitution: every use of the kernel sees W + ΔW) are
the same math on the flattened weight W = weight.reshape(out, in/groups·∏k), peft's plain conv form: B₁, B₂
(out, r), A₁, A₂ (r, in/groups·∏k). peft's use_effective_conv2d (FedPara's Proposition 3, on a Conv1d/Conv2d
with a kernel larger than 1) replaces each B_kA_k by a Tucker product over the kernel positions κ:
    T1, T2     (r, r, *kernel)   peft's hada_t1 / hada_t2 (a Conv1d's are (r, r, k, 1), as peft stores them)
    B_k        (out, r)          hada_w*_a transposed (peft stores (r, out))
    A_k        (r, in/groups)    hada_w*_b
    ΔW[o, c, κ] = s · (Σ_ij B₁[o,i] T₁[i,j,κ] A₁[j,c]) · (Σ_ij B₂[o,i] T₂[i,j,κ] A₂[j,c]),  flattened (c κ)
lf.load_peft reads such files exactly (the cores become leaves T1, T2; ΔW is formed densely, autograd
keeping the two products) and lf.save_peft writes them back; lf.init cannot build them, since it sees the
flattened weight only (``LoHaConfig(use_effective_conv2d=True)`` is refused and says so). Gradients are
autograd's of this ΔW. Deviation: peft 0.21's hand-written HadaWeightCP.backward contracts hada_w1_a's and
hada_w2_a's gradients with the other pair's partial product, so peft trains those two factors on wrong
gradients in this form (its outputs, and every other gradient, agree with lite_fn's).
Not here: peft's rank_dropout and module_dropout (training only, drawn from torch's global RNG; peft
rescales by the mask's mean): ``LoHaConfig`` refuses nonzero values, and a peft file that sets them
loads (they change nothing in eval mode). peft's LoHa does not adapt transformers' Conv1D (GPT-2) nor
nn.Conv3d, so save_peft refuses them; nor does lite_fn read or write a peft LoHa on a convolution whose
padding_mode is not 'zeros' (peft convolves its ΔW with zero padding there, while the layer pads its own
weight otherwise, so peft's outputs are not those of any merged weight: ``lycoris_conv``).
Padding (lf.stack(pad=True)) is exact: zero rank columns of B₁, B₂ and rows of A₁, A₂ (and zero rows and
columns of T₁, T₂) leave each factor product, hence ΔW, unchanged (every extra term is 0·0); a missing
adapter gets all-zero factors (ΔW = 0).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter
from . import _padding

__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "LoHaConfig",
    "apply",
    "init",
    "merged",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "loha"
TRAINABLE = frozenset({"B1", "A1", "B2", "A2", "T1", "T2"})  # leaves an optimizer updates (T1, T2: Tucker form only)
_FACTORS = {"B1": 1, "A1": 0, "B2": 1, "A2": 0}  # each factor's rank axis
_CORES = ("T1", "T2")  # the Tucker cores (r, r, *kernel): rank axes 0 and 1


@dataclass(frozen=True)
class LoHaConfig:
    r: int = 8
    alpha: float = 8.0  # peft's default: s = alpha / r = 1 at r = 8
    init_weights: bool = True  # peft: True gives A2 = 0 (identity); False draws A2 like A1 (not the identity)
    rank_dropout: float = 0.0  # peft's training-only dropouts: not implemented, only 0 is accepted
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False  # peft's Tucker form on convolutions: only False here (lf.load_peft reads it)
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("alpha", self.alpha, who)
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"{who}: init_weights={self.init_weights!r} must be a bool (True: peft's identity init, A2 = 0; "
                f"False: all four factors random)"
            )
        _checks.zero_only(
            self,
            ("rank_dropout", "module_dropout"),
            who,
            "peft applies it in training only, from torch's global RNG (a peft adapter trained with it loads as it is: eval outputs do not depend on it)",
        )
        if self.use_effective_conv2d is not False:
            raise ValueError(
                f"{who}: use_effective_conv2d={self.use_effective_conv2d!r} is not offered by lf.init: it sees a "
                f"convolution as its flattened (out, in/groups·∏kernel) weight and cannot build peft's Tucker cores "
                f"over the kernel (hada_t1, hada_t2). Use use_effective_conv2d=False (peft's default plain form, which "
                f"adapts the same layers), or load an adapter peft trained with it through lf.load_peft (read exactly)"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.r


Config = LoHaConfig


def init(key: _keys.Key, W: Tensor, cfg: LoHaConfig, statistic=None) -> dict[str, Tensor]:
    d_out, d_in = _checks.check_weight(W, "loha.init")
    _checks.check_rank(cfg.r, d_out, d_in, "loha.init")  # a larger r adds nothing: each B_kA_k is already full rank
    gen, r = _keys.generator(key), cfg.r
    # peft's kaiming_uniform_(a=√5) on hada_w1_a / hada_w2_a (d_out, r): fan-in r; on hada_w*_b (r, d_in): fan-in d_in
    B1 = linalg.kaiming_uniform(gen, (d_out, r), fan_in=r)
    A1 = linalg.kaiming_uniform(gen, (r, d_in), fan_in=d_in)
    B2 = linalg.kaiming_uniform(gen, (d_out, r), fan_in=r)
    A2 = linalg.kaiming_uniform(gen, (r, d_in), fan_in=d_in) if not cfg.init_weights else torch.zeros(r, d_in)
    opts = _checks.like(W)
    leaves = {k: v.to(**opts).requires_grad_(True) for k, v in {"B1": B1, "A1": A1, "B2": B2, "A2": A2}.items()}
    return {**leaves, "scale": torch.tensor(cfg.scale, **opts)}


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); the rank r is read from A1 (both pairs share it), the
    Tucker form (when T1 is present) from T1 (r, r, *kernel): then A1, A2 are (r, d_in / ∏kernel)."""
    r = leaves["A1"][0] if len(leaves.get("A1", ())) == 2 else 0
    if "T1" not in leaves:
        return {"B1": (d_out, r), "A1": (r, d_in), "B2": (d_out, r), "A2": (r, d_in), "scale": ()}
    T = tuple(leaves["T1"])
    k = math.prod(T[2:])
    if len(T) < 3 or T[0] != T[1] or k <= 0 or d_in % k:
        raise ValueError(
            f"LoHa's Tucker core T1 of shape {T} does not fit W of shape ({d_out}, {d_in}): expected (r, r, *kernel) "
            f"with ∏kernel dividing d_in = in/groups · ∏kernel; read such leaves from peft with lf.load_peft"
        )
    r, n_in = T[0], d_in // k
    return {"B1": (d_out, r), "A1": (r, n_in), "B2": (d_out, r), "A2": (r, n_in), "T1": T, "T2": T, "scale": ()}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank columns of B1, B2 and rows of A1, A2, and zero rank rows and columns of the
    Tucker cores T1, T2 (each factor product unchanged); an adapter that does not target the layer gets all-zero
    factors (ΔW = 0) and another's scale."""
    out = _padding.lowrank(NAME, path, present, K, {**_FACTORS, **dict.fromkeys(_CORES, 0)})
    for leaves in out.values():
        for c in _CORES:
            if c in leaves:
                leaves[c] = _padding.grown(leaves[c], leaves[c].shape[0], 1)
    return out


def factored(r: int, d_out: int, d_in: int) -> bool:
    """Whether apply uses ΔW = P Q (r² (d_out + d_in) per row) rather than the dense ΔW (d_out·d_in per row)."""
    return r * r * (d_out + d_in) < d_out * d_in


class _HadamardProduct(torch.autograd.Function):
    """(B₁A₁) ⊙ (B₂A₂), saving only the four factors: backward recomputes the two products (as peft's
    HadaWeight does), so autograd never holds them. Plain torch ops both ways, so it runs under vmap
    (generated rule), torch.func.grad and torch.compile."""

    generate_vmap_rule = True

    @staticmethod
    def forward(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        return (B1 @ A1) * (B2 @ A2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # pyright: ignore[reportIncompatibleMethodOverride]
        (g,) = grads  # (d_out, d_in)
        B1, A1, B2, A2 = ctx.saved_tensors
        g1 = g * (B2 @ A2)  # ∂/∂(B₁A₁)
        g2 = g * (B1 @ A1)  # ∂/∂(B₂A₂)
        return g1 @ A1.mT, B1.mT @ g1, g2 @ A2.mT, B2.mT @ g2


def _tucker(B: Tensor, T: Tensor, A: Tensor) -> Tensor:
    """Σ_ij B[o, i] T[i, j, κ] A[j, c] -> (out, in, ∏kernel): one factor product of the Tucker form."""
    return einsum(B, T.flatten(2), A, "o i, i j k, j c -> o c k")


def delta_weight(params: dict[str, Tensor]) -> Tensor:
    """ΔW (d_out, d_in) dense: s·(B₁A₁) ⊙ (B₂A₂) (saving only the factors for backward, as peft), or with Tucker
    cores s·(B₁T₁A₁) ⊙ (B₂T₂A₂) flattened over (in, kernel) as the weight is."""
    B1, A1, B2, A2 = params["B1"] * params["scale"], params["A1"], params["B2"], params["A2"]  # s folded into B1
    if "T1" not in params:
        return _HadamardProduct.apply(B1, A1, B2, A2)
    return (_tucker(B1, params["T1"], A1) * _tucker(B2, params["T2"], A2)).flatten(-2)


def _check_params(params: dict[str, Tensor], W: Tensor, who: str) -> None:
    B1, A1 = params["B1"], params["A1"]
    width = A1.shape[-1] * (math.prod(params["T1"].shape[2:]) if "T1" in params else 1)
    if B1.shape[-2] != W.shape[-2] or width != W.shape[-1]:
        raise ValueError(
            f"{who}: B1 of shape {tuple(B1.shape)} and A1 of shape {tuple(A1.shape)} fit W of shape "
            f"({B1.shape[-2]}, {width}), not W of shape {tuple(W.shape)}; init the params from this W"
        )


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "loha.apply")
    _check_params(params, W, "loha.apply")
    if "T1" in params or not factored(params["A1"].shape[-2], W.shape[-2], W.shape[-1]):
        return linalg.linear_add(x, W, b, x, delta_weight(params))  # x Wᵀ + b + x ΔWᵀ
    B1, A1, B2, A2 = params["B1"] * params["scale"], params["A1"], params["B2"], params["A2"]  # s folded into B1
    P = rearrange(einsum(B1, B2, "o i, o j -> o i j"), "o i j -> o (i j)")  # (d_out, r²)
    Q = rearrange(einsum(A1, A2, "i k, j k -> i j k"), "i j k -> (i j) k")  # (r², d_in)
    return linalg.linear_add(x, W, b, torch.nn.functional.linear(x, Q), P)  # x Wᵀ + b + (x Qᵀ) Pᵀ


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W + ΔW, b): the dense layer ``apply`` computes (peft's merge); the bias passes through."""
    _check_params(params, W, "loha.merged")
    return W + delta_weight(params), b


# ----------------------------------------------------------------------------- peft: the LOHA type
# Tensors per targeted layer (no ".weight" suffix, as every LyCORIS type): hada_w1_a (d_out, r) = B1,
# hada_w1_b (r, d_in) = A1, hada_w2_a = B2, hada_w2_b = A2 — on a convolution too (d_in = in/groups·∏kernel:
# peft's plain conv form); scale = alpha / r with per-layer rank and alpha from rank_pattern / alpha_pattern.
# With use_effective_conv2d, a Conv1d/Conv2d whose kernel is larger than 1 holds the Tucker form instead:
# hada_w*_a (r, out) = B*ᵀ, hada_w*_b (r, in/groups) = A*, hada_t1 / hada_t2 (r, r, kh, kw) or (r, r, k, 1) = T1 / T2.
_TENSORS = {"hada_w1_a": "B1", "hada_w1_b": "A1", "hada_w2_a": "B2", "hada_w2_b": "A2"}
_PEFT_CORES = {"hada_t1": "T1", "hada_t2": "T2"}


def lycoris_conv(layer: PeftLayer, peft_type: str, who: str) -> tuple[int, tuple[int, ...]] | None:
    """(in/groups, kernel) of a convolution as peft's LyCORIS layers (LOHA, LOKR) see it; None for any other
    layer kind.

    Raises:
        ValueError: an nn.Conv3d (peft's LyCORIS types adapt Conv1d and Conv2d only), or a padding_mode other
        than 'zeros': peft convolves its ΔW with the layer's stride, padding and dilation but zero padding,
        while the layer pads its own weight as its padding_mode says, so peft's outputs are those of no
        merged weight (lite_fn substitutes W + ΔW in the layer's own convolution).
    """
    if layer.kind != "Conv":
        return None
    m = layer.module
    if not isinstance(m, (nn.Conv1d, nn.Conv2d)):
        raise ValueError(
            f"{who}: {layer.path!r} is a {type(m).__name__}; peft's {peft_type} adapts nn.Conv1d and nn.Conv2d "
            f"(and nn.Linear) only, so peft can neither write nor load it there; keep this adapter in lite_fn's "
            f"own format (lf.save)"
        )
    if m.padding_mode != "zeros":
        raise ValueError(
            f"{who}: {layer.path!r} pads with padding_mode={m.padding_mode!r}, but peft's {peft_type} convolves its "
            f"update with zero padding, so peft's outputs differ from the merged layer's (which lite_fn computes); "
            f"only padding_mode='zeros' convolutions go through peft's {peft_type} exactly (keep this one in lf.save)"
        )
    return layer.stored[1], tuple(layer.stored[2:])


def core_shape(r: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """peft's Tucker core shape for a Conv2d (r, r, kh, kw) or a Conv1d (r, r, k, 1) kernel."""
    return (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)


def _check_peft_config(cfg: PeftConfig) -> None:
    v = cfg.get("use_effective_conv2d", False)
    if not isinstance(v, bool):
        raise ValueError(f"{cfg.where} sets use_effective_conv2d={v!r}; expected true or false")


def _effective(cfg: PeftConfig, layer: PeftLayer) -> bool:
    """Whether peft holds this layer in the Tucker form: use_effective_conv2d, on a convolution whose kernel is
    larger than 1 (peft turns it off for 1 × 1 and size-1 kernels)."""
    conv = lycoris_conv(layer, "LOHA", cfg.where)
    return conv is not None and cfg.get("use_effective_conv2d", False) is True and math.prod(conv[1]) > 1


def _peft_tensors(cfg: PeftConfig, layer: PeftLayer) -> tuple[str, ...]:
    return tuple(_TENSORS) + (tuple(_PEFT_CORES) if _effective(cfg, layer) else ())


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    t, (d_out, d_in) = layer.tensors, layer.W.shape
    tucker = _effective(cfg, layer)
    if t["hada_w1_a"].ndim != 2:
        want = f"(r, {d_out})" if tucker else f"({d_out}, r)"
        raise ValueError(f"{cfg.file!r}: {layer.path}.hada_w1_a has shape {tuple(t['hada_w1_a'].shape)}, expected {want}")
    r = cfg.rank(layer.path, t["hada_w1_a"].shape[0 if tucker else 1], "hada_w1_a")
    if tucker:
        n_in, kernel = lycoris_conv(layer, "LOHA", cfg.where) or (0, ())
        core = core_shape(r, kernel)
        want = {"hada_w1_a": (r, d_out), "hada_w1_b": (r, n_in), "hada_w2_a": (r, d_out), "hada_w2_b": (r, n_in)}
        want |= dict.fromkeys(_PEFT_CORES, core)
        what = f"the use_effective_conv2d form of a rank-{r} LoHa on a {tuple(layer.stored)} {type(layer.module).__name__}"
    else:
        want = {suffix: v for suffix, v in zip(_TENSORS, ((d_out, r), (r, d_in), (d_out, r), (r, d_in)))}
        what = f"a rank-{r} LoHa on a layer of shape ({d_out}, {d_in})"
    for suffix, shape in want.items():
        if tuple(t[suffix].shape) != shape:
            raise ValueError(
                f"{cfg.file!r}: {layer.path}.{suffix} has shape {tuple(t[suffix].shape)}, expected {shape} for {what}"
            )
    alpha = cfg.per_path("alpha_pattern", "alpha", 8, layer.path)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg.where}: alpha / alpha_pattern gives {alpha!r} for {layer.path!r}; expected a number")
    scale = torch.tensor(alpha / r, dtype=torch.float64)
    if not tucker:
        return {**{leaf: t[suffix] for suffix, leaf in _TENSORS.items()}, "scale": scale}
    return {
        "B1": t["hada_w1_a"].mT,  # peft's Tucker form stores the out factor as (r, out)
        "A1": t["hada_w1_b"],
        "B2": t["hada_w2_a"].mT,
        "A2": t["hada_w2_b"],
        "T1": t["hada_t1"],
        "T2": t["hada_t2"],
        "scale": scale,
    }


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    s = float(leaves["scale"])
    if not math.isfinite(s):
        raise ValueError(f"save_peft: {layer.path!r} has LoHa scale {s}; peft's alpha must be finite")
    conv = lycoris_conv(layer, "LOHA", "save_peft")
    has_core = conv is not None and math.prod(conv[1]) > 1  # peft's use_effective_conv2d would give it cores
    r = leaves["A1"].shape[0]
    facts = {"r": r, "scale": s, "tucker": "T1" in leaves, "has_core": has_core}
    if "T1" not in leaves:
        return {suffix: leaves[leaf].detach() for suffix, leaf in _TENSORS.items()}, facts
    if conv is None or not has_core or math.prod(leaves["T1"].shape[2:]) != math.prod(conv[1]):
        raise ValueError(
            f"save_peft: {layer.path!r} holds LoHa Tucker cores T1 of shape {tuple(leaves['T1'].shape)}, which peft "
            f"keeps (use_effective_conv2d) only on a Conv1d / Conv2d with a kernel larger than 1, over that kernel; "
            f"this layer stores its weight as {tuple(layer.stored)} ({type(layer.module).__name__}). Keep it in lf.save"
        )
    core = core_shape(r, conv[1])
    tensors = {
        "hada_w1_a": leaves["B1"].detach().mT,
        "hada_w1_b": leaves["A1"].detach(),
        "hada_w2_a": leaves["B2"].detach().mT,
        "hada_w2_b": leaves["A2"].detach(),
        "hada_t1": leaves["T1"].detach().reshape(core),  # a Conv1d's kernel as (k, 1), peft's layout
        "hada_t2": leaves["T2"].detach().reshape(core),
    }
    return tensors, facts


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    paths = [layer.path for layer in layers]
    ranks = {p: f["r"] for p, f in zip(paths, facts)}
    alphas = {p: writer.number(f["scale"] * f["r"]) for p, f in zip(paths, facts)}  # alpha = s·r
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    effective = any(f["tucker"] for f in facts)
    plain = [p for p, f in zip(paths, facts) if f["has_core"] and not f["tucker"]]
    if effective and plain:
        tucker = [p for p, f in zip(paths, facts) if f["tucker"]]
        raise ValueError(
            f"save_peft: peft's LoHa has one use_effective_conv2d per adapter: {tucker[:3]} hold Tucker cores (T1, T2), "
            f"which need it on, but {plain[:3]} hold plain factors on convolutions with a kernel larger than 1, which "
            f"peft would then build as Tucker cores; save the two groups to separate directories"
        )
    return {
        "exclude_modules": None,
        "r": r,
        "alpha": alpha,
        "rank_pattern": writer.pattern(ranks, r),
        "alpha_pattern": writer.pattern(alphas, alpha),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "init_weights": True,
        "use_effective_conv2d": effective,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_LOHA = PeftFormat(
    peft_type="LOHA",
    suffixes=(*_TENSORS, *_PEFT_CORES),
    fields=frozenset(
        {
            "r",
            "alpha",
            "rank_pattern",
            "alpha_pattern",
            "use_effective_conv2d",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
        }
    ),
    # initial values the file overrides, and dropouts (training only)
    ignores=frozenset({"init_weights", "rank_dropout", "module_dropout"}),
    refuses_kinds={"Conv1D": "peft's LOHA adapts torch.nn.Linear (and Conv1d / Conv2d), not transformers' Conv1D"},
    kinds=frozenset({"nn.Linear", "Conv1D", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt", "Conv"}),
    check=_check_peft_config,
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_LOHA,
    claims=lambda cfg, path: True,
    tensors=_peft_tensors,
    read=_peft_read,
    write=_peft_write,
)
