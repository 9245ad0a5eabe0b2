"""LoKr — LyCORIS low-rank Kronecker adaptation: Yeh et al. 2023, "Navigating Text-To-Image Customization:
From LyCORIS Fine-Tuning to Model Evaluation", arXiv 2309.14859 (peft: tuners/lokr).

    ΔW = s · (W₁ ⊗ W₂),   s = alpha / r,   W₁ (a, c),  W₂ (b, d),   d_out = a·b,  d_in = c·d
    (a, b) = factorization(d_out, f),  (c, d) = factorization(d_in, f)      (peft's, f = decompose_factor)
    y = x Wᵀ + b + x ΔWᵀ,   computed without forming W₁ ⊗ W₂ (d_out × d_in):
        X = x.reshape(..., c, d);   Y[..., i, p] = s · Σ_{j,q} W₁[i, j] W₂[p, q] X[..., j, q];
        x ΔWᵀ = Y.reshape(..., d_out)      (two small contractions, the cheaper order first)

    Each factor is a full matrix or a rank-r product, as peft decides per layer:
      W₁ = w1 (a, c),  or w1_a (a, r) @ w1_b (r, c) when decompose_both and r < max(a, c) / 2
      W₂ = w2 (b, d),  or w2_a (b, r) @ w2_b (r, d) when r < max(b, d) / 2
    leaf   shape    init (init_weights=True, peft's)       init_weights="lycoris"        trainable
    w1     (a, c)   0                                       kaiming-uniform(a=√5)         yes
    w1_a   (a, r)   0                                       kaiming                       yes
    w1_b   (r, c)   kaiming-uniform(a=√5) = U(±1/√c)        kaiming                       yes
    w2     (b, d)   kaiming = U(±1/√d)                      0                             yes
    w2_a   (b, r)   kaiming = U(±1/√r)                      kaiming                       yes
    w2_b   (r, d)   kaiming = U(±1/√d)                      0                             yes
    scale  ()       s = alpha / r                                                         frozen
    The shapes tell apply everything: which factors are products, the rank, the factor sizes.

Identity at init: W₁ = 0 (peft's default zeroes w1 or w1_a; "lycoris" zeroes w2 or w2_b instead), so
x ΔWᵀ is exactly 0 and apply returns the plain F.linear result bit for bit.
Deviations: init_weights=False (peft: every factor random, not the identity) is refused, as are nonzero
rank_dropout / module_dropout (training-only; peft draws them from torch's global RNG, one mask over ΔW's rows
per forward); r > min(d_out, d_in) is refused at init as for LoRA (peft accepts it, but then W₂ is full, r only
setting the scale, or a product of rank r above min(b, d); load_peft still reads such files). Convolutions (peft's Conv1d /
Conv2d LoKr, use_effective_conv2d) are not adapted by lite_fn.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import einsum
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter
from . import _padding

__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "LoKrConfig",
    "apply",
    "factorization",
    "init",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "lokr"
FACTORS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
TRAINABLE = frozenset(FACTORS)  # leaves an optimizer updates (a layer holds three or four of them)
_RANK_AXIS = {"w1_a": 1, "w1_b": 0, "w2_a": 1, "w2_b": 0}  # the rank axis of each product factor


@dataclass(frozen=True)
class LoKrConfig:
    r: int = 8
    alpha: float = 8.0  # peft's default
    decompose_both: bool = False  # W₁ a rank-r product too (when r < max(a, c) / 2)
    decompose_factor: int = -1  # -1: factors near √dim; f > 0: f · (dim / f) where f divides dim
    init_weights: bool | str = True  # True (peft: W₁ = 0) | "lycoris" (W₂ = 0)
    rank_dropout: float = 0.0  # peft's training-only dropouts: only 0 here
    module_dropout: float = 0.0
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("alpha", self.alpha, who)
        if not isinstance(self.decompose_both, bool):
            raise ValueError(f"{who}: decompose_both={self.decompose_both!r} must be a bool (True or False)")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f <= 0 and f != -1):
            raise ValueError(
                f"{who}: decompose_factor={f!r} must be -1 (factors near √dim, peft's default) or a positive int "
                f"(e.g. decompose_factor=4: dims split as 4 · dim/4 where 4 divides them)"
            )
        if not (self.init_weights is True or self.init_weights == "lycoris"):
            raise ValueError(
                f"{who}: init_weights={self.init_weights!r} is not True (peft's default: W1 = 0) or 'lycoris' "
                f"(W2 = 0); peft's init_weights=False starts away from the identity and is not offered"
            )
        _checks.zero_only(
            self,
            ("rank_dropout", "module_dropout"),
            who,
            "peft's LoKr draws it from torch's global RNG during training (not from an explicit key)",
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.r


Config = LoKrConfig


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = dim, as peft's (LyCORIS's) lokr ``factorization`` gives them.

    ``factor`` > 0 dividing dim: (factor, dim // factor), in that order. Otherwise m climbs through the
    divisors of dim (2, 3, …) while m < n, stopping before a divisor above ``factor`` (-1: no cap; any
    other value ≤ 0 stops at once: (1, dim)), and the pair is returned smaller first. (peft's loop also
    compares m + n with 1 + dim; for a divisor pair m + n ≤ 1 + dim always holds, so that test never stops it.)
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    cap = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        nxt = m + 1
        while dim % nxt:
            nxt += 1
        if nxt > cap:
            break
        m, n = nxt, dim // nxt
    return (n, m) if m > n else (m, n)


def layout(d_out: int, d_in: int, r: int, decompose_both: bool, factor: int) -> dict[str, tuple[int, int]]:
    """The factor leaves (name -> shape) peft builds for a (d_out, d_in) linear layer, in peft's order."""
    a, b = factorization(d_out, factor)
    c, d = factorization(d_in, factor)
    out: dict[str, tuple[int, int]] = {}
    if decompose_both and r < max(a, c) / 2:
        out.update(w1_a=(a, r), w1_b=(r, c))
    else:
        out["w1"] = (a, c)
    if r < max(b, d) / 2:
        out.update(w2_a=(b, r), w2_b=(r, d))
    else:
        out["w2"] = (b, d)
    return out


def init(key: _keys.Key, W: Tensor, cfg: LoKrConfig, statistic=None) -> dict[str, Tensor]:
    d_out, d_in = _checks.check_weight(W, "lokr.init")
    _checks.check_rank(cfg.r, d_out, d_in, "lokr.init")
    zero = {"w1", "w1_a"} if cfg.init_weights is True else {"w2", "w2_b"}
    gen, opts = _keys.generator(key), _checks.like(W)
    leaves = {}
    for name, shape in layout(d_out, d_in, cfg.r, cfg.decompose_both, cfg.decompose_factor).items():
        t = torch.zeros(shape) if name in zero else linalg.kaiming_uniform(gen, shape, fan_in=shape[1])
        leaves[name] = t.to(**opts).requires_grad_(True)
    return {**leaves, "scale": torch.tensor(cfg.scale, **opts)}


def _factor_shape(leaves: dict, k: str) -> tuple[int, int] | None:
    """Factor k's (rows, cols) from a layer's leaves or leaf shapes (a full matrix or a product's two), or None."""
    full, fa, fb = (tuple(getattr(v, "shape", v)) for v in (leaves.get(n, ()) for n in (k, f"{k}_a", f"{k}_b")))
    if len(full) == 2:
        return full[0], full[1]
    if len(fa) == 2 and len(fb) == 2:
        return fa[0], fb[1]
    return None


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in). W₁'s shape (a, c) is read from its leaves and must tile
    W (W₂ is then (d_out / a, d_in / c)); each factor's form (full or product) from which leaves are present;
    the one rank r from the first product factor."""
    w1 = _factor_shape(leaves, "w1")
    if w1 is None:
        raise ValueError(
            f"LoKr leaves {sorted(leaves)} hold no W1: expected 'w1' (a, c) or 'w1_a' (a, r) with 'w1_b' (r, c); "
            f"build them with lf.init"
        )
    a, c = w1
    if a <= 0 or c <= 0 or d_out % a or d_in % c:
        raise ValueError(
            f"W1 of shape ({a}, {c}) does not tile W of shape ({d_out}, {d_in}) (its rows must divide d_out and "
            f"its columns d_in); init the params from this W"
        )
    b, d = d_out // a, d_in // c
    r = next((leaves[k][ax] for k, ax in _RANK_AXIS.items() if len(leaves.get(k, ())) == 2), 0)
    out: dict[str, tuple[int, ...]] = {"w1": (a, c)} if "w1" in leaves else {"w1_a": (a, r), "w1_b": (r, c)}
    out.update({"w2": (b, d)} if "w2" in leaves else {"w2_a": (b, r), "w2_b": (r, d)})
    return {**out, "scale": ()}


def _factor(params: dict[str, Tensor], k: str) -> Tensor:
    """W₁ or W₂: the full leaf, or the product of its two rank-r leaves (small: never d_out × d_in)."""
    return params[k] if k in params else params[f"{k}_a"] @ params[f"{k}_b"]


def kron_delta(params: dict[str, Tensor], x: Tensor, d_out: int) -> Tensor:
    """x ΔWᵀ = s · x (W₁ ⊗ W₂)ᵀ for x (..., d_in) -> (..., d_out), on x reshaped to (..., c, d)."""
    W1 = _factor(params, "w1") * params["scale"]  # (a, c), the scale folded into its a·c numbers, not into every row
    W2 = _factor(params, "w2")  # (b, d)
    (a, c), (b, d) = W1.shape[-2:], W2.shape[-2:]
    if a * b != d_out or c * d != x.shape[-1]:
        raise ValueError(
            f"lokr.apply: W1 {tuple(W1.shape)} ⊗ W2 {tuple(W2.shape)} is ({a * b}, {c * d}) but W has shape "
            f"({d_out}, {x.shape[-1]}); init the params from this W"
        )
    X = x.unflatten(-1, (c, d))
    if c * b * (d + a) <= a * d * (c + b):  # multiply-adds per row: W₂ on the d axis first, or W₁ on c first
        Y = einsum(W1, einsum(X, W2, "... c d, b d -> ... c b"), "a c, ... c b -> ... a b")
    else:
        Y = einsum(einsum(W1, X, "a c, ... c d -> ... a d"), W2, "... a d, b d -> ... a b")
    return Y.flatten(-2)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "lokr.apply")
    return torch.nn.functional.linear(x, W, b) + kron_delta(params, x, W.shape[0])


def _form(leaves: dict) -> str:
    """One adapter's factor forms at a layer, for messages: 'W1 (4, 4) ⊗ W2 (8, 6) as a rank-2 product'."""

    def one(k: str) -> str:
        rows, cols = _factor_shape(leaves, k) or (0, 0)
        how = "" if k in leaves else f" as a rank-{leaves[f'{k}_a'].shape[-1]} product"
        return f"{k.upper()} ({rows}, {cols}){how}"

    return f"{one('w1')} ⊗ {one('w2')}"


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): products of different rank r padded with zero rank columns / rows (the products
    are unchanged); an adapter that does not target the layer gets all-zero factors (ΔW = 0 exactly).
    Refused: different factor shapes (W₁ ⊗ W₂ tiles W differently) or forms (full vs product)."""
    kinds = {
        k: (tuple(sorted(set(v) - set(_RANK_AXIS))), _factor_shape(v, "w1"), _factor_shape(v, "w2")) for k, v in present.items()
    }
    if len(set(kinds.values())) > 1:
        _padding.refuse(
            NAME,
            path,
            "the adapters' Kronecker factors differ in shape or form ("
            + "; ".join(f"adapter {k}: {_form(v)}" for k, v in present.items())
            + "), and no padding of one into the other computes the same ΔW; stack LoKr adapters built with "
            "equal decompose_factor and decompose_both, and ranks on the same side of peft's full-factor threshold",
        )
    return _padding.lowrank(NAME, path, present, K, _RANK_AXIS, zero=TRAINABLE)


# ----------------------------------------------------------------------------- peft: the LOKR type
# Per targeted nn.Linear, the factor tensors under peft's names, without a ".weight" suffix: lokr_w1 or
# lokr_w1_a + lokr_w1_b, and lokr_w2 or lokr_w2_a + lokr_w2_b (as the leaves, same layout); which ones a
# layer holds follows from its (d_out, d_in), its r (rank_pattern), decompose_both and decompose_factor.
# s = alpha / r per layer (alpha_pattern). lokr_t2 is a convolution's (use_effective_conv2d).
_PREFIX = "lokr_"
_SUFFIXES = tuple(_PREFIX + k for k in FACTORS) + ("lokr_t2",)


def _check_peft_config(cfg: PeftConfig) -> None:
    both, f = cfg.get("decompose_both", False), cfg.get("decompose_factor", -1)
    if not isinstance(both, bool):
        raise ValueError(f"{cfg.where} sets decompose_both={both!r}; expected true or false")
    if isinstance(f, bool) or not isinstance(f, int):
        raise ValueError(f"{cfg.where} sets decompose_factor={f!r}; expected an int (-1: factors near √dim)")


def _peft_layout(cfg: PeftConfig, layer: PeftLayer) -> tuple[int, float, dict[str, tuple[int, ...]]]:
    """(r, alpha, {suffix: shape}) of the tensors peft's LoKr holds for this layer of this config."""
    r = cfg.per_path("rank_pattern", "r", 8, layer.path)
    alpha = cfg.per_path("alpha_pattern", "alpha", 8, layer.path)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{cfg.where}: r / rank_pattern gives r={r!r} for {layer.path!r}; expected a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg.where}: alpha / alpha_pattern gives {alpha!r} for {layer.path!r}; expected a number")
    d_out, d_in = layer.W.shape
    both, f = cfg.get("decompose_both", False), cfg.get("decompose_factor", -1)
    return r, alpha, {_PREFIX + k: s for k, s in layout(d_out, d_in, r, both, f).items()}


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    r, alpha, want = _peft_layout(cfg, layer)
    got = {k: tuple(t.shape) for k, t in layer.tensors.items()}
    if got != want:
        both, f = cfg.get("decompose_both", False), cfg.get("decompose_factor", -1)
        raise ValueError(
            f"{cfg.file!r}: {layer.path} holds {got}, but peft's LoKr with r={r}, decompose_both={both}, "
            f"decompose_factor={f} on a {tuple(layer.W.shape)} linear layer holds {want}; the files do not belong together"
        )
    leaves = {k.removeprefix(_PREFIX): t for k, t in layer.tensors.items()}
    return {**leaves, "scale": torch.tensor(alpha / r, dtype=torch.float64)}  # cast once, to the weight dtype


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    tensors = {_PREFIX + k: v.detach() for k, v in leaves.items() if k in TRAINABLE}
    r = next((leaves[k].shape[ax] for k, ax in _RANK_AXIS.items() if k in leaves), None)
    facts = {
        "w1": _factor_shape(leaves, "w1"),
        "w2": _factor_shape(leaves, "w2"),
        "full": ("w1" in leaves, "w2" in leaves),
        "r": r,
        "scale": float(leaves["scale"].detach()),
    }
    return tensors, facts


def _common_factor(layers: list[PeftLayer], facts: list[dict]) -> int:
    """The one decompose_factor under which peft's factorization gives every layer its factor shapes."""
    dims = {(tuple(layer.W.shape), f["w1"], f["w2"]) for layer, f in zip(layers, facts)}
    sizes = sorted({n for _, w1, w2 in dims for n in (*w1, *w2)})
    largest = max(n for (shape, _, _) in dims for n in shape)
    for f in dict.fromkeys([-1, *sizes, *range(1, largest + 1)]):
        if all(
            factorization(d_out, f) == (w1[0], w2[0]) and factorization(d_in, f) == (w1[1], w2[1])
            for (d_out, d_in), w1, w2 in dims
        ):
            return f
    shown = "; ".join(f"({d_out}, {d_in}) as {w1} ⊗ {w2}" for (d_out, d_in), w1, w2 in sorted(dims))
    raise ValueError(
        f"save_peft: peft's LoKr has one decompose_factor per adapter, and none splits these layers as their "
        f"factors do ({shown}); save adapters built with different decompose_factor apart"
    )


def _peft_rank(path: str, fact: dict, both: bool, preferred: int | None) -> int:
    """The r peft needs to build this layer's factor forms (given decompose_both), or a ValueError."""
    (a, c), (b, d) = fact["w1"], fact["w2"]
    full1, full2 = fact["full"]

    def fits(r: int) -> bool:
        return full1 == (not (both and r < max(a, c) / 2)) and full2 == (not r < max(b, d) / 2)

    if fact["r"] is not None:
        if not fits(fact["r"]):
            raise ValueError(
                f"save_peft: {path!r} holds W1 ({a}, {c}){'' if full1 else ' as a product'} and W2 ({b}, {d})"
                f"{'' if full2 else ' as a product'} of rank {fact['r']}, which peft's LoKr (decompose_both={both}) "
                f"builds otherwise; save layers built with different decompose_both apart"
            )
        return fact["r"]
    if preferred is not None and fits(preferred):
        return preferred
    return max(1, math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if both else 0)  # the least r with both full


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    factor = _common_factor(layers, facts)
    both = any(not f["full"][0] for f in facts)
    fixed = Counter(f["r"] for f in facts if f["r"] is not None).most_common(1)
    preferred = fixed[0][0] if fixed else None
    ranks = {layer.path: _peft_rank(layer.path, f, both, preferred) for layer, f in zip(layers, facts)}
    alphas = {layer.path: writer.number(f["scale"] * ranks[layer.path]) for layer, f in zip(layers, facts)}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "exclude_modules": None,
        "r": r,
        "alpha": alpha,
        "rank_pattern": writer.pattern(ranks, r),
        "alpha_pattern": writer.pattern(alphas, alpha),
        "decompose_both": both,
        "decompose_factor": factor,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "rank_dropout_scale": False,
        "use_effective_conv2d": False,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_LOKR = PeftFormat(
    peft_type="LOKR",
    suffixes=_SUFFIXES,
    fields=frozenset(
        {
            "r",
            "alpha",
            "rank_pattern",
            "alpha_pattern",
            "decompose_both",
            "decompose_factor",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
        }
    ),
    # initial values the file overrides; training-only dropouts; a convolution-only form (lite_fn adapts no convolution)
    ignores=frozenset({"init_weights", "rank_dropout", "module_dropout", "rank_dropout_scale", "use_effective_conv2d"}),
    refuses_kinds={"Conv1D": "peft's LOKR adapts torch.nn.Linear (and torch's convolutions), not transformers' Conv1D"},
    check=_check_peft_config,
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_LOKR,
    claims=lambda cfg, path: True,
    tensors=lambda cfg, layer: tuple(_peft_layout(cfg, layer)[2]),
    read=_peft_read,
    write=_peft_write,
)
