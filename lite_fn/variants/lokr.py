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

Convolutions (nn.Conv1d/2d/3d, adapted by weight substitution: every use of the kernel sees W + ΔW) are the
same math on the flattened weight W = weight.reshape(out, in/groups·∏kernel). peft's conv LoKr factors the
channels, not the flattened width: (c, d) = factorization(in/groups, f), and W₂ is (b, d·∏kernel) — peft's
lokr_w2 (b, d, *kernel) reshaped, or w2_a (b, r) @ w2_b (r, d·∏kernel) (W₂ a product when r < max(b, d) / 2);
ΔW = s · W₁ ⊗ W₂ on the flattened weight either way (kernel positions are the innermost columns of W₂).
With peft's use_effective_conv2d (a Conv1d/Conv2d whose kernel is larger than 1, W₂ a product) W₂ is a Tucker
product over the kernel positions κ:
    t2 (r, r, *kernel)   peft's lokr_t2 (a Conv1d's is (r, r, k, 1), as peft stores it);  trainable
    w2_a (b, r)          peft's lokr_w2_a (r, b) transposed;  w2_b (r, d) = lokr_w2_b
    W₂[p, (q κ)] = Σ_ij w2_a[p, i] t2[i, j, κ] w2_b[j, q]
Two peft 0.21 layouts are mirrored as peft computes them: a Conv1d's full lokr_w2 (b, d, k) stays a 3-D leaf w2,
for which peft's torch.kron of the (a, c) and (b, d, k) factors gives ΔW[(p i), (q j κ)] = s·W₁[i, j]·W₂[p, q, κ]
(rows p-major, not W₁ ⊗ W₂; ``delta_weight``); and a Conv1d's Tucker form, which peft writes but cannot run
(torch.kron fails on its (b, d, k, 1) factor), is read by the formula above.
lf.load_peft reads both conv forms exactly and lf.save_peft writes them back. lf.init sees the flattened
weight only, so on a convolution it factors in/groups·∏kernel: its layout is peft's when decompose_factor = f
divides in/groups (and W₂'s form agrees); save_peft refuses, naming the fix, when it is not. It cannot build
Tucker cores (``LoKrConfig(use_effective_conv2d=True)`` is refused). Not saved or read as peft's: nn.Conv3d
and a padding_mode other than 'zeros' (``loha.lycoris_conv`` says why).

Deviations: init_weights=False (peft: every factor random, not the identity) is refused, as are nonzero
rank_dropout / module_dropout (training-only; peft draws them from torch's global RNG, one mask over ΔW's rows
per forward); r > min(d_out, d_in) is refused at init as for LoRA (peft accepts it, but then W₂ is full, r only
setting the scale, or a product of rank r above min(b, d); load_peft still reads such files).
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
from . import _padding, loha

__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "LoKrConfig",
    "apply",
    "factorization",
    "init",
    "merged",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "lokr"
FACTORS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
TRAINABLE = frozenset(FACTORS)  # leaves an optimizer updates (a layer holds three to five of them)
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
    use_effective_conv2d: bool = False  # peft's Tucker W₂ on convolutions: only False here (lf.load_peft reads it)
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
        if self.use_effective_conv2d is not False:
            raise ValueError(
                f"{who}: use_effective_conv2d={self.use_effective_conv2d!r} is not offered by lf.init: it sees a "
                f"convolution as its flattened (out, in/groups·∏kernel) weight and cannot build peft's Tucker core "
                f"over the kernel (lokr_t2). Use use_effective_conv2d=False (peft's default), or load an adapter "
                f"peft trained with it through lf.load_peft (read exactly)"
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


def layout(d_out: int, d_in: int, r: int, decompose_both: bool, factor: int, k: int = 1) -> dict[str, tuple[int, int]]:
    """The factor leaves (name -> shape) peft builds for a (d_out, d_in) linear layer, in peft's order; for a
    convolution d_in = in/groups (the channels peft factors) and k = ∏kernel (W₂'s columns are d·k)."""
    a, b = factorization(d_out, factor)
    c, d = factorization(d_in, factor)
    out: dict[str, tuple[int, int]] = {}
    if decompose_both and r < max(a, c) / 2:
        out.update(w1_a=(a, r), w1_b=(r, c))
    else:
        out["w1"] = (a, c)
    if r < max(b, d) / 2:
        out.update(w2_a=(b, r), w2_b=(r, d * k))
    else:
        out["w2"] = (b, d * k)
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


def _kernel(leaves: dict) -> int:
    """∏kernel of a Tucker core t2 (r, r, *kernel) among a layer's leaves or leaf shapes; 1 without one."""
    t = tuple(getattr(leaves["t2"], "shape", leaves["t2"])) if "t2" in leaves else ()
    return math.prod(t[2:]) if len(t) >= 3 else 1


def _factor_shape(leaves: dict, k: str) -> tuple[int, int] | None:
    """Factor k's (rows, cols) from a layer's leaves or leaf shapes (a full matrix, a product's two, or W₂'s
    Tucker form: w2_a (b, r), t2 (r, r, *kernel), w2_b (r, d) -> (b, d·∏kernel)), or None."""
    full, fa, fb = (tuple(getattr(v, "shape", v)) for v in (leaves.get(n, ()) for n in (k, f"{k}_a", f"{k}_b")))
    if len(full) == 2:
        return full[0], full[1]
    if len(full) == 3 and k == "w2":  # peft's Conv1d full lokr_w2 (b, d, k): b rows, d·k columns
        return full[0], full[1] * full[2]
    if len(fa) == 2 and len(fb) == 2:
        return fa[0], fb[1] * (_kernel(leaves) if k == "w2" else 1)
    return None


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in). W₁'s shape (a, c) is read from its leaves and must tile
    W (W₂ is then (d_out / a, d_in / c)); each factor's form (full, product, or W₂'s Tucker form with a core t2
    (r, r, *kernel): then w2_b is (r, d_in / c / ∏kernel)) from which leaves are present; the one rank r from
    the first product factor."""
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
    if "t2" in leaves:
        t, k = tuple(leaves["t2"]), _kernel(leaves)
        if len(t) < 3 or k <= 0 or d % k:
            raise ValueError(
                f"LoKr's Tucker core t2 of shape {t} does not fit W2 of shape ({b}, {d}): expected (r, r, *kernel) "
                f"with ∏kernel dividing {d}; read such leaves from peft with lf.load_peft"
            )
        out.update({"w2_a": (b, r), "w2_b": (r, d // k), "t2": (r, r, *t[2:])})
    elif len(leaves.get("w2", ())) == 3:  # peft's Conv1d layout (b, d, k)
        k = leaves["w2"][2]
        if k <= 0 or d % k:
            raise ValueError(
                f"LoKr's W2 of shape {tuple(leaves['w2'])} does not fit W2's ({b}, {d}) numbers: expected (b, d, k) with "
                f"k dividing {d} (peft's Conv1d layout); read such leaves from peft with lf.load_peft"
            )
        out["w2"] = (b, d // k, k)
    else:
        out.update({"w2": (b, d)} if "w2" in leaves else {"w2_a": (b, r), "w2_b": (r, d)})
    return {**out, "scale": ()}


def _factor(params: dict[str, Tensor], k: str) -> Tensor:
    """W₁ or W₂: the full leaf, the product of its two rank-r leaves, or W₂'s Tucker product over the kernel
    (small: never d_out × d_in)."""
    if k in params:
        return params[k]
    if k == "w2" and "t2" in params:
        return einsum(params["w2_a"], params["t2"].flatten(2), params["w2_b"], "p i, i j k, j q -> p q k").flatten(-2)
    return params[f"{k}_a"] @ params[f"{k}_b"]


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


def delta_weight(params: dict[str, Tensor]) -> Tensor:
    """ΔW (d_out, d_in) dense: s·W₁ ⊗ W₂, rows (i p), columns (j q) — or, for peft's Conv1d layout of a full W₂
    (b, d, k), what peft computes there (torch.kron of the (a, c) and (b, d, k) factors pads W₁ to (1, a, c), and
    the (b, a·d, c·k) result is read as the (a·b, c·d, k) weight): ΔW[(p i), (q j κ)] = s·W₁[i, j]·W₂[p, q, κ]."""
    W1 = _factor(params, "w1") * params["scale"]  # (a, c)
    W2 = _factor(params, "w2")
    (a, c), (b, d) = W1.shape[-2:], W2.shape[:2]
    if W2.ndim == 3:
        return einsum(W1, W2, "i j, p q k -> p i q j k").reshape(a * b, -1)
    return einsum(W1, W2, "a c, b d -> a b c d").reshape(a * b, c * d)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "lokr.apply")
    if "w2" in params and params["w2"].ndim == 3:  # peft's Conv1d layout: only on convolutions, whose forward
        return linalg.linear_add(x, W, b, x, _checked_delta(params, W, "lokr.apply"))  # uses ``merged``
    return torch.nn.functional.linear(x, W, b) + kron_delta(params, x, W.shape[0])


def _checked_delta(params: dict[str, Tensor], W: Tensor, who: str) -> Tensor:
    dW = delta_weight(params)
    if dW.shape != W.shape[-2:]:
        raise ValueError(
            f"{who}: the LoKr factors {_form(params)} give ΔW of shape {tuple(dW.shape)}, but W has shape {tuple(W.shape)}; init the params from this W"
        )
    return dW


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W + ΔW, b) (``delta_weight``): the dense layer ``apply`` computes (peft's merge); the bias passes through."""
    return W + _checked_delta(params, W, "lokr.merged"), b


def _form(leaves: dict) -> str:
    """One adapter's factor forms at a layer, for messages: 'W1 (4, 4) ⊗ W2 (8, 6) as a rank-2 product'."""

    def one(k: str) -> str:
        rows, cols = _factor_shape(leaves, k) or (0, 0)
        tucker = " Tucker" if k == "w2" and "t2" in leaves else ""
        how = "" if k in leaves else f" as a rank-{leaves[f'{k}_a'].shape[-1]}{tucker} product"
        return f"{k.upper()} ({rows}, {cols}){how}"

    return f"{one('w1')} ⊗ {one('w2')}"


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): products of different rank r padded with zero rank columns / rows (the products
    are unchanged); an adapter that does not target the layer gets all-zero factors (ΔW = 0 exactly).
    Refused: different factor shapes (W₁ ⊗ W₂ tiles W differently) or forms (full vs product)."""
    kinds = {
        k: (
            tuple(sorted(set(v) - set(_RANK_AXIS))),
            _factor_shape(v, "w1"),
            _factor_shape(v, "w2"),
            tuple(v["t2"].shape[2:]) if "t2" in v else (),
        )
        for k, v in present.items()
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
    out = _padding.lowrank(NAME, path, present, K, {**_RANK_AXIS, "t2": 0}, zero=TRAINABLE)
    for leaves in out.values():
        if "t2" in leaves:  # the core's second rank axis too (zero rows and columns: W₂ unchanged)
            leaves["t2"] = _padding.grown(leaves["t2"], leaves["t2"].shape[0], 1)
    return out


# ----------------------------------------------------------------------------- peft: the LOKR type
# Per targeted layer, the factor tensors under peft's names, without a ".weight" suffix: lokr_w1 or
# lokr_w1_a + lokr_w1_b, and lokr_w2 or lokr_w2_a + lokr_w2_b (as the leaves, same layout); which ones a
# layer holds follows from its (d_out, d_in), its r (rank_pattern), decompose_both and decompose_factor.
# s = alpha / r per layer (alpha_pattern). On a convolution peft factors in/groups and stores a full W₂ as
# lokr_w2 (b, d, *kernel) (the leaf w2 is it reshaped to (b, d·∏kernel)); with use_effective_conv2d and a kernel
# larger than 1, a product W₂ is lokr_t2 (r, r, kh, kw) or (r, r, k, 1) = t2, lokr_w2_a (r, b) = w2_aᵀ, lokr_w2_b (r, d).
_PREFIX = "lokr_"
_SUFFIXES = tuple(_PREFIX + k for k in FACTORS)


def _check_peft_config(cfg: PeftConfig) -> None:
    both, f = cfg.get("decompose_both", False), cfg.get("decompose_factor", -1)
    if not isinstance(both, bool):
        raise ValueError(f"{cfg.where} sets decompose_both={both!r}; expected true or false")
    if isinstance(f, bool) or not isinstance(f, int):
        raise ValueError(f"{cfg.where} sets decompose_factor={f!r}; expected an int (-1: factors near √dim)")
    v = cfg.get("use_effective_conv2d", False)
    if not isinstance(v, bool):
        raise ValueError(f"{cfg.where} sets use_effective_conv2d={v!r}; expected true or false")


def _geometry(layer: PeftLayer, who: str) -> tuple[int, tuple[int, ...]]:
    """(the input width peft factors, kernel): (d_in, ()) for a linear layer, (in/groups, kernel) for a convolution."""
    conv = loha.lycoris_conv(layer, "LOKR", who)
    return (layer.W.shape[1], ()) if conv is None else conv


def _stored_shapes(leaves: dict[str, tuple[int, int]], kernel: tuple[int, ...], tucker: bool) -> dict[str, tuple[int, ...]]:
    """peft's tensor shapes (by suffix) for a layer whose leaves have the ``layout`` shapes ``leaves``: a
    convolution's full W₂ as (b, d, *kernel); in the Tucker form the core and peft's (r, b), (r, d) factors."""
    k = math.prod(kernel)
    out: dict[str, tuple[int, ...]] = {}
    for name, (rows, cols) in leaves.items():
        if name == "w2" and kernel:
            out[_PREFIX + name] = (rows, cols // k, *kernel)
        elif name == "w2_a" and tucker:
            out[_PREFIX + name] = (cols, rows)
        elif name == "w2_b" and tucker:
            out[_PREFIX + name] = (rows, cols // k)
        else:
            out[_PREFIX + name] = (rows, cols)
    if tucker:
        out[_PREFIX + "t2"] = loha.core_shape(leaves["w2_a"][1], kernel)
    return out


def _peft_layout(cfg: PeftConfig, layer: PeftLayer) -> tuple[int, float, dict[str, tuple[int, ...]], bool]:
    """(r, alpha, {suffix: shape}, Tucker form?) of the tensors peft's LoKr holds for this layer of this config."""
    r = cfg.per_path("rank_pattern", "r", 8, layer.path)
    alpha = cfg.per_path("alpha_pattern", "alpha", 8, layer.path)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{cfg.where}: r / rank_pattern gives r={r!r} for {layer.path!r}; expected a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg.where}: alpha / alpha_pattern gives {alpha!r} for {layer.path!r}; expected a number")
    n_in, kernel = _geometry(layer, cfg.where)
    both, f = cfg.get("decompose_both", False), cfg.get("decompose_factor", -1)
    leaves = layout(layer.W.shape[0], n_in, r, both, f, math.prod(kernel))
    # peft's rule: the Tucker form for a product W₂ on a convolution whose kernel is larger than 1
    tucker = cfg.get("use_effective_conv2d", False) is True and math.prod(kernel) > 1 and "w2_a" in leaves
    return r, alpha, _stored_shapes(leaves, kernel, tucker), tucker


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    r, alpha, want, tucker = _peft_layout(cfg, layer)
    got = {k: tuple(t.shape) for k, t in layer.tensors.items()}
    if got != want:
        both, f = cfg.get("decompose_both", False), cfg.get("decompose_factor", -1)
        what = (
            f"a {tuple(layer.stored)} {type(layer.module).__name__}"
            if layer.kind == "Conv"
            else f"a {tuple(layer.W.shape)} linear layer"
        )
        raise ValueError(
            f"{cfg.file!r}: {layer.path} holds {got}, but peft's LoKr with r={r}, decompose_both={both}, "
            f"decompose_factor={f} on {what} holds {want}; the files do not belong together"
        )
    leaves = {k.removeprefix(_PREFIX): t for k, t in layer.tensors.items()}
    if "w2" in leaves and leaves["w2"].ndim == 4:
        leaves["w2"] = leaves["w2"].flatten(1)  # a Conv2d's (b, d, kh, kw) as (b, d·kh·kw); a Conv1d's stays (b, d, k)
    if tucker:
        leaves["w2_a"] = leaves["w2_a"].mT  # peft's Tucker form stores it as (r, b)
    return {**leaves, "scale": torch.tensor(alpha / r, dtype=torch.float64)}  # cast once, to the weight dtype


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    n_in, kernel = _geometry(layer, "save_peft")
    positions, tucker = math.prod(kernel), "t2" in leaves
    w2 = _factor_shape(leaves, "w2")
    if w2 is None or w2[1] % positions:
        raise ValueError(
            f"save_peft: {layer.path!r} has LoKr factors {_form(leaves)}, whose W2 does not span its {positions} kernel "
            f"positions as peft's does{_conv_hint([(layer.W.shape[0], n_in)])}"
        )
    if tucker and (positions == 1 or _kernel(leaves) != positions):
        raise ValueError(
            f"save_peft: {layer.path!r} holds a LoKr Tucker core t2 of shape {tuple(leaves['t2'].shape)}, which peft "
            f"keeps (use_effective_conv2d) only on a Conv1d / Conv2d with a kernel larger than 1, over that kernel; "
            f"this layer stores its weight as {tuple(layer.stored)}. Keep it in lf.save"
        )
    conv1d = len(kernel) == 1
    if "w2" in leaves and (leaves["w2"].ndim == 3) != conv1d:
        raise ValueError(
            f"save_peft: {layer.path!r} holds a full LoKr W2 of shape {tuple(leaves['w2'].shape)}, but peft's LoKr "
            + (
                "combines a Conv1d's full lokr_w2 (b, d, k) with W1 in its own layout (torch.kron of a 2-D and a 3-D "
                "factor: ΔW[(p i), (q j κ)] = s·W1[i, j]·W2[p, q, κ]), which a W2 in lite_fn's Kronecker layout does not "
                "give; use a rank r < max(b, d) / 2 there (W2 a product, in both layouts the same), or keep it in lf.save"
                if conv1d
                else "reads a 3-D W2 (its Conv1d layout) only on a Conv1d; init the params from this layer"
            )
        )
    r = next((leaves[k].shape[ax] for k, ax in _RANK_AXIS.items() if k in leaves), None)
    tensors = {}
    for name in TRAINABLE & leaves.keys():
        v = leaves[name].detach()
        if name == "w2" and len(kernel) == 2:
            v = v.reshape(v.shape[0], -1, *kernel)  # peft's (b, d, kh, kw); a Conv1d's (b, d, k) is the leaf
        elif name == "w2_a" and tucker:
            v = v.mT  # peft's Tucker form stores it as (r, b)
        elif name == "t2":
            v = v.reshape(loha.core_shape(v.shape[0], kernel))  # a Conv1d's kernel as (k, 1), peft's layout
        tensors[_PREFIX + name] = v
    facts = {
        "w1": _factor_shape(leaves, "w1"),
        "w2": w2,
        "full": ("w1" in leaves, "w2" in leaves),
        "r": r,
        "scale": float(leaves["scale"].detach()),
        "n_in": n_in,  # the input width peft factors (in/groups on a convolution)
        "k": positions,
        "tucker": tucker,
        "core": positions > 1,  # a convolution whose product W₂ use_effective_conv2d turns into a Tucker form
    }
    return tensors, facts


def _conv_hint(convs: list[tuple[int, int]]) -> str:
    """The fix for lf.init's LoKr on convolutions ((out, in/groups) each) that peft factors otherwise; "" for none."""
    if not convs:
        return ""
    largest = max(max(o, n) for o, n in convs)
    common = next((f for f in range(2, largest + 1) if all(n % f == 0 and o % f == 0 for o, n in convs)), None)
    return (
        "; on a convolution peft factors in/groups while lf.init, which sees the flattened weight, factors "
        "in/groups·∏kernel: the two agree when decompose_factor = f divides in/groups and out"
        + (f" (e.g. LoKrConfig(decompose_factor={common}))" if common else "")
    )


def _common_factor(layers: list[PeftLayer], facts: list[dict]) -> int:
    """The one decompose_factor under which peft's factorization gives every layer its factor shapes (on a
    convolution peft factors in/groups, and W₂'s columns are d·∏kernel)."""
    dims = {(layer.W.shape[0], f["n_in"], f["k"], f["w1"], f["w2"], layer.kind == "Conv") for layer, f in zip(layers, facts)}
    sizes = sorted({n for _, _, k, w1, w2, _ in dims for n in (*w1, w2[0], w2[1] // k)})
    largest = max(max(d_out, n_in) for d_out, n_in, *_ in dims)
    for f in dict.fromkeys([-1, *sizes, *range(1, largest + 1)]):
        if all(
            factorization(d_out, f) == (w1[0], w2[0]) and w2[1] % k == 0 and factorization(n_in, f) == (w1[1], w2[1] // k)
            for d_out, n_in, k, w1, w2, _ in dims
        ):
            return f
    shown = "; ".join(
        f"({d_out}, {n_in}{f' · {k} kernel positions' if k > 1 else ''}) as {w1} ⊗ {w2}"
        for d_out, n_in, k, w1, w2, _ in sorted(dims)
    )
    hint = _conv_hint([(d_out, n_in) for d_out, n_in, *_, conv in dims if conv])
    raise ValueError(
        f"save_peft: peft's LoKr has one decompose_factor per adapter, and none splits these layers as their "
        f"factors do ({shown}); save adapters built with different decompose_factor apart{hint}"
    )


def _peft_rank(path: str, fact: dict, both: bool, preferred: int | None) -> int:
    """The r peft needs to build this layer's factor forms (given decompose_both), or a ValueError."""
    (a, c), (b, dk) = fact["w1"], fact["w2"]
    d = dk // fact["k"]  # the factored input channels (peft's threshold uses them, not W₂'s columns)
    full1, full2 = fact["full"]

    def fits(r: int) -> bool:
        return full1 == (not (both and r < max(a, c) / 2)) and full2 == (not r < max(b, d) / 2)

    if fact["r"] is not None:
        if not fits(fact["r"]):
            conv = " (on a convolution peft compares r with max(b, in/groups / c) / 2)" if fact["k"] > 1 else ""
            raise ValueError(
                f"save_peft: {path!r} holds W1 ({a}, {c}){'' if full1 else ' as a product'} and W2 ({b}, {dk})"
                f"{'' if full2 else ' as a product'} of rank {fact['r']}, which peft's LoKr (decompose_both={both}) "
                f"builds otherwise{conv}; save layers built with different decompose_both apart"
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
    effective = any(f["tucker"] for f in facts)
    plain = [layer.path for layer, f in zip(layers, facts) if f["core"] and not f["full"][1] and not f["tucker"]]
    if effective and plain:
        tucker = [layer.path for layer, f in zip(layers, facts) if f["tucker"]]
        raise ValueError(
            f"save_peft: peft's LoKr has one use_effective_conv2d per adapter: {tucker[:3]} hold Tucker cores (t2), "
            f"which need it on, but {plain[:3]} hold a plain product W2 on convolutions with a kernel larger than 1, "
            f"which peft would then build as Tucker cores; save the two groups to separate directories"
        )
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
        "use_effective_conv2d": effective,
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
            "use_effective_conv2d",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
        }
    ),
    # initial values the file overrides; training-only dropouts
    ignores=frozenset({"init_weights", "rank_dropout", "module_dropout", "rank_dropout_scale"}),
    refuses_kinds={"Conv1D": "peft's LOKR adapts torch.nn.Linear (and Conv1d / Conv2d), not transformers' Conv1D"},
    kinds=frozenset({"nn.Linear", "Conv1D", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt", "Conv"}),
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
