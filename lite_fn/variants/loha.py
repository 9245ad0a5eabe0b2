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

Not here: peft's rank_dropout and module_dropout (training only, drawn from torch's global RNG; peft
rescales by the mask's mean): ``LoHaConfig`` refuses nonzero values, and a peft file that sets them
loads (they change nothing in eval mode). Convolutions (peft's Conv1d/Conv2d LoHa with hada_t1/hada_t2,
use_effective_conv2d): lite_fn adapts linear layers only, so such targets are refused at load. peft's
LoHa does not adapt transformers' Conv1D (GPT-2), so save_peft refuses it.
Padding (lf.stack(pad=True)) is exact: zero rank columns of B₁, B₂ and rows of A₁, A₂ leave each B_kA_k,
hence ΔW, unchanged (every extra term is 0·0); a missing adapter gets all-zero factors (ΔW = 0).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import einsum, rearrange
from torch import Tensor

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
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "loha"
TRAINABLE = frozenset({"B1", "A1", "B2", "A2"})  # leaves an optimizer updates
_FACTORS = {"B1": 1, "A1": 0, "B2": 1, "A2": 0}  # each factor's rank axis


@dataclass(frozen=True)
class LoHaConfig:
    r: int = 8
    alpha: float = 8.0  # peft's default: s = alpha / r = 1 at r = 8
    init_weights: bool = True  # peft: True gives A2 = 0 (identity); False draws A2 like A1 (not the identity)
    rank_dropout: float = 0.0  # peft's training-only dropouts: not implemented, only 0 is accepted
    module_dropout: float = 0.0
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
    """The exact leaf shapes for W of (d_out, d_in); the rank r is read from A1 (both pairs share it)."""
    r = leaves["A1"][0] if len(leaves.get("A1", ())) == 2 else 0
    return {"B1": (d_out, r), "A1": (r, d_in), "B2": (d_out, r), "A2": (r, d_in), "scale": ()}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank columns of B1, B2 and rows of A1, A2 (each B_kA_k unchanged); an
    adapter that does not target the layer gets all-zero factors (ΔW = 0) and another's scale."""
    return _padding.lowrank(NAME, path, present, K, _FACTORS)


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


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "loha.apply")
    B1, A1, B2, A2 = params["B1"] * params["scale"], params["A1"], params["B2"], params["A2"]  # s folded into B1
    if B1.shape[-2] != W.shape[-2] or A1.shape[-1] != W.shape[-1]:
        raise ValueError(
            f"loha.apply: B1 of shape {tuple(B1.shape)} and A1 of shape {tuple(A1.shape)} fit W of shape "
            f"({B1.shape[-2]}, {A1.shape[-1]}), not W of shape {tuple(W.shape)}; init the params from this W"
        )
    if not factored(A1.shape[-2], W.shape[-2], W.shape[-1]):
        return linalg.linear_add(x, W, b, x, _HadamardProduct.apply(B1, A1, B2, A2))  # x Wᵀ + b + x ΔWᵀ
    P = rearrange(einsum(B1, B2, "o i, o j -> o i j"), "o i j -> o (i j)")  # (d_out, r²)
    Q = rearrange(einsum(A1, A2, "i k, j k -> i j k"), "i j k -> (i j) k")  # (r², d_in)
    return linalg.linear_add(x, W, b, torch.nn.functional.linear(x, Q), P)  # x Wᵀ + b + (x Qᵀ) Pᵀ


# ----------------------------------------------------------------------------- peft: the LOHA type
# Tensors per targeted Linear (no ".weight" suffix, as every LyCORIS type): hada_w1_a (d_out, r) = B1,
# hada_w1_b (r, d_in) = A1, hada_w2_a = B2, hada_w2_b = A2; scale = alpha / r with per-layer rank and
# alpha from rank_pattern / alpha_pattern. hada_t1 / hada_t2 exist on convolutions only (refused by kind).
_TENSORS = {"hada_w1_a": "B1", "hada_w1_b": "A1", "hada_w2_a": "B2", "hada_w2_b": "A2"}


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    t, (d_out, d_in) = layer.tensors, layer.W.shape
    if t["hada_w1_a"].ndim != 2:
        raise ValueError(f"{cfg.file!r}: {layer.path}.hada_w1_a has shape {tuple(t['hada_w1_a'].shape)}, expected ({d_out}, r)")
    r = cfg.rank(layer.path, t["hada_w1_a"].shape[1], "hada_w1_a")
    want = shapes({"A1": (r, d_in)}, d_out, d_in)
    for suffix, leaf in _TENSORS.items():
        if tuple(t[suffix].shape) != want[leaf]:
            raise ValueError(
                f"{cfg.file!r}: {layer.path}.{suffix} has shape {tuple(t[suffix].shape)}, expected {want[leaf]} for a "
                f"rank-{r} LoHa on a ({d_out}, {d_in}) linear layer"
            )
    alpha = cfg.per_path("alpha_pattern", "alpha", 8, layer.path)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg.where}: alpha / alpha_pattern gives {alpha!r} for {layer.path!r}; expected a number")
    return {**{leaf: t[suffix] for suffix, leaf in _TENSORS.items()}, "scale": torch.tensor(alpha / r, dtype=torch.float64)}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    s = float(leaves["scale"])
    if not math.isfinite(s):
        raise ValueError(f"save_peft: {layer.path!r} has LoHa scale {s}; peft's alpha must be finite")
    return {suffix: leaves[leaf].detach() for suffix, leaf in _TENSORS.items()}, {"r": leaves["A1"].shape[0], "scale": s}


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    paths = [layer.path for layer in layers]
    ranks = {p: f["r"] for p, f in zip(paths, facts)}
    alphas = {p: writer.number(f["scale"] * f["r"]) for p, f in zip(paths, facts)}  # alpha = s·r
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "exclude_modules": None,
        "r": r,
        "alpha": alpha,
        "rank_pattern": writer.pattern(ranks, r),
        "alpha_pattern": writer.pattern(alphas, alpha),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "init_weights": True,
        "use_effective_conv2d": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_LOHA = PeftFormat(
    peft_type="LOHA",
    suffixes=(*_TENSORS, "hada_t1", "hada_t2"),
    fields=frozenset(
        {
            "r",
            "alpha",
            "rank_pattern",
            "alpha_pattern",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
        }
    ),
    # initial values the file overrides, dropouts (training only), and a convolution-only option (such targets
    # are refused by their layer kind)
    ignores=frozenset({"init_weights", "rank_dropout", "module_dropout", "use_effective_conv2d"}),
    refuses_kinds={"Conv1D": "peft's LOHA adapts torch.nn.Linear (and Conv1d / Conv2d), not transformers' Conv1D"},
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_LOHA,
    claims=lambda cfg, path: True,
    tensors=lambda cfg, layer: tuple(_TENSORS),
    read=_peft_read,
    write=_peft_write,
)
