"""BOFT — Liu et al. 2024, arXiv 2311.06243 (ICLR 2024; butterfly orthogonal finetuning; peft: tuners/boft).

    d_in = D · H: D blocks of size H;  m = n_butterfly_factor factors (m = 1 is plain OFT)
    Q_{i,k} = (I − S_{i,k}) (I + S_{i,k})⁻¹,   S = ½ (R_{i,k} − R_{i,k}ᵀ)     (Cayley, H × H, orthogonal)
    M_i = P_i · blockdiag(Q_{i,0}, …, Q_{i,D−1}) · P_iᵀ                       (d_in × d_in, never built)
    y = (x M_{m−1} ⋯ M_1 M_0 Wᵀ) ⊙ s + b                  (peft: x_rotated = x @ (M_{m−1} ⋯ M_0))

    P_i (peft's boft_P, a permutation matrix with (P v) = v[π_i]): factor i ≥ 1 groups the input
    features by 2^i·H; inside a group, chunks of H/2 features are reordered even chunks first, then
    odd ones, so each H-block of factor i joins two half-blocks H apart within groups that double
    per factor (the butterfly: log2(D) + 1 factors connect every input to every output); π_0 = identity.

    R (m, D, H, H) = 0;  peft's boft_R as is (only its skew part ½(R − Rᵀ) acts);   trainable
    s (d_out,)     = 1;  peft's boft_s (d_out, 1), flattened: an output scale;       trainable

Identity at init: R = 0, s = 1, bit for bit: apply works with Q − I = −2 (I + S)⁻¹ S (a solve that
is exactly 0 at S = 0, and more precise than Q − I for small S), rotating x as
x + blockrot(x, Q − I) per factor, and scales by y + (s − 1) ⊙ (y − b) (peft's (y − b) ⊙ s + b).
The permutations are index gathers on x (adjacent ones composed into one), never d_in × d_in
matrices; the H × H solves run in at least fp32 (torch has no half-precision solve).

Block sizes resolve as peft does: exactly one of block_size (H) or block_num (D) is set, the other
is d_in divided by it. With m > 1 peft requires an even H and D a multiple of 2^(m−1).
Not here: peft's boft_dropout (training only: in train mode it resets a random subset of one random
factor's blocks to the identity) — a non-zero dropout is refused, and ignored when loading peft files.
peft without its CUDA extension (fbd_cuda) silently trains m = 1 whatever n_butterfly_factor says,
and cannot load an adapter with m > 1; lite_fn computes any m on any device, and loads such a
one-factor file as the one factor it holds.

Merged (``merged``: what a layer adapted by weight substitution computes with, and lf.merge): W' = diag(s) W Mᵀ,
b' = b (peft's merge: W ← (M Wᵀ)ᵀ ⊙ s), M's factors applied to W's rows in reverse order with transposed blocks
(x M_iᵀ = blockrot(x[π_i⁻¹], Q_iᵀ)[π_i]), never a d_in × d_in matrix.
Convolutions: the flattened kernel (out, in·k·k) is W, as peft's BOFT on nn.Conv2d (boft_R over in·k·k, boft_s of
shape (1, out)). peft's file form is read and written for the nn.Conv2d layers whose forward peft computes as
lite_fn does (square kernel, groups=1, dilation 1, zero padding, equal stride and padding on both axes: peft's
forward calls F.conv2d(x, W', b, stride[0], padding[0]) itself).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter, never_random
from . import _padding, _peft_conv

# the variant contract; other names are shared helpers
__all__ = ["NAME", "PEFT", "TRAINABLE", "BOFTConfig", "Config", "apply", "init", "merged", "pad", "random_init", "shapes"]
NAME = "boft"
TRAINABLE = frozenset({"R", "s"})  # leaves an optimizer updates

random_init = never_random  # init draws no random numbers


def _non_negative_int(name: str, value, who: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{who}: {name}={value!r} must be an int >= 0 (0: derived from d_in and the other; e.g. {name}=4)")


def _nearest(valid: list[int], want: int) -> str:
    """'a or b': the valid values just below and above ``want`` (one of them when the other is missing)."""
    lo = [v for v in valid if v < want][-1:]
    hi = [v for v in valid if v > want][:1]
    return " or ".join(str(v) for v in lo + hi)


@dataclass(frozen=True)
class BOFTConfig:
    # exactly one of block_size (H) and block_num (D); the other is d_in divided by it. Unset (None or 0): 0,
    # and block_size=4 (peft's default) when neither is given
    block_size: int | None = None  # peft: boft_block_size
    block_num: int | None = None  # peft: boft_block_num
    n_butterfly_factor: int = 1  # peft: boft_n_butterfly_factor (m); 1 is plain OFT
    dropout: float = 0.0  # peft: boft_dropout; only 0 (peft's block dropout is not implemented)
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        size = (0 if self.block_num else 4) if self.block_size is None else self.block_size
        num = 0 if self.block_num is None else self.block_num
        object.__setattr__(self, "block_size", size)
        object.__setattr__(self, "block_num", num)
        _non_negative_int("block_size", size, who)
        _non_negative_int("block_num", num, who)
        if (size == 0) == (num == 0):
            raise ValueError(
                f"{who}: block_size={size} and block_num={num}: set exactly one of them "
                f"(block_size · block_num = d_in, so one gives the other), e.g. block_size=4, block_num=0"
            )
        _checks.positive_int("n_butterfly_factor", self.n_butterfly_factor, who)
        m, step = self.n_butterfly_factor, 2 ** (self.n_butterfly_factor - 1)
        if step > 1 and size % 2:
            raise ValueError(
                f"{who}: block_size={size} must be even with n_butterfly_factor={m} (each butterfly factor "
                f"pairs half-blocks); use block_size={_nearest(list(range(2, 2 * size + 2, 2)), size)}"
            )
        if num % step:
            raise ValueError(
                f"{who}: block_num={num} must be a multiple of 2^(n_butterfly_factor − 1)={step} with "
                f"n_butterfly_factor={m}; use block_num={_nearest(list(range(step, 2 * num + step, step)), num)}"
            )
        _checks.zero_only(
            self,
            ("dropout",),
            who,
            "peft's boft_dropout (resetting random blocks to the identity in training) is not implemented in lite_fn",
        )


Config = BOFTConfig


def _blocks(cfg: BOFTConfig, d_in: int, who: str) -> tuple[int, int]:
    """(D, H) for a layer of width d_in, resolved from the config as peft does, or a ValueError with valid values."""
    m, step = cfg.n_butterfly_factor, 2 ** (cfg.n_butterfly_factor - 1)
    even = 2 if m > 1 else 1  # m > 1: H even (D is then a multiple of 2^(m−1) >= 2)
    sizes = [h for h in range(even, d_in + 1, even) if d_in % (h * step) == 0]  # valid H
    if not sizes:
        raise ValueError(
            f"{who}: d_in={d_in} has no even block size H with d_in / H a multiple of {step}, as "
            f"n_butterfly_factor={m} needs; use n_butterfly_factor=1"
        )
    size, num = cfg.block_size or 0, cfg.block_num or 0  # resolved by BOFTConfig: exactly one is non-zero
    if size:
        if size not in sizes:
            need = f"a multiple of {size * step} (block_size · 2^(n_butterfly_factor − 1))" if step > 1 else "a multiple of it"
            raise ValueError(
                f"{who}: block_size={size} does not fit d_in={d_in}, which must be {need}; use block_size={_nearest(sizes, size)}"
            )
        return d_in // size, size
    nums = [d_in // h for h in reversed(sizes)]  # valid D
    if num not in nums:
        even = " with an even block size d_in / block_num" if m > 1 else ""
        raise ValueError(
            f"{who}: block_num={num} does not fit d_in={d_in} with n_butterfly_factor={m} (d_in must be a "
            f"multiple of it{even}); use block_num={_nearest(nums, num)}"
        )
    return num, d_in // num


def init(key: _keys.Key, W: Tensor, cfg: BOFTConfig, statistic=None) -> dict[str, Tensor]:
    d_out, d_in = _checks.check_weight(W, "boft.init")
    D, H = _blocks(cfg, d_in, "boft.init")
    opts = _checks.like(W)
    return {
        "R": torch.zeros(cfg.n_butterfly_factor, D, H, H, **opts).requires_grad_(True),
        "s": torch.ones(d_out, **opts).requires_grad_(True),
    }


def _layout_error(R: tuple[int, ...], d_in: int) -> str | None:
    """Why R of this shape is not a BOFT layout for d_in (None when it is)."""
    if len(R) != 4 or R[2] != R[3] or min(R) < 1 or R[1] * R[2] != d_in:
        return (
            f"R of shape {R} is not a BOFT layout for d_in={d_in}; expected (n_butterfly_factor, block_num, "
            f"block_size, block_size) with block_num · block_size = d_in"
        )
    if R[0] > 1 and (R[2] % 2 or R[1] % 2 ** (R[0] - 1)):
        return (
            f"R of shape {R} has {R[0]} butterfly factors, which need an even block_size and block_num a multiple "
            f"of 2^{R[0] - 1}; re-init it with lf.init"
        )
    return None


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); factors, block count and size are read from R."""
    R = leaves.get("R", ())
    why = _layout_error(R, d_in)
    if why is not None:
        raise ValueError(why)
    return {"R": R, "s": (d_out,)}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): an adapter that does not target the layer gets R = 0, s = 1 (the identity,
    exactly); adapters of different block layouts are refused (no exact padding between them)."""
    _padding.same_leaf_names(NAME, path, present)
    layouts = {k: tuple(v["R"].shape) for k, v in present.items()}
    if len(set(layouts.values())) > 1:
        _padding.refuse(
            NAME,
            path,
            f"the adapters use different block layouts there (R shapes {layouts}): their rotations act on "
            f"different feature groups; stack BOFT adapters of one block_size / block_num and n_butterfly_factor",
        )
    like = present[min(present)]
    out = {k: {leaf: v.detach() for leaf, v in leaves.items()} for k, leaves in present.items()}
    for k in range(K):
        if k not in out:
            out[k] = {"R": torch.zeros_like(like["R"]).detach(), "s": torch.ones_like(like["s"]).detach()}
    return out


def _butterfly(d_in: int, D: int, H: int, i: int, device: torch.device) -> Tensor:
    """π_i as indices (P_i v = v[π_i]): factor i >= 1 reorders each group of 2^i·H features, seen as
    2^(i+1) chunks of H/2, to even chunks then odd chunks; factor 0 is the identity."""
    idx = torch.arange(d_in, device=device)
    if i == 0:
        return idx
    return idx.reshape(D // 2**i, 2**i, 2, H // 2).transpose(1, 2).reshape(d_in)


def gathers(d_in: int, m: int, D: int, H: int, device: torch.device, transposed: bool = False) -> tuple[Tensor | None, ...]:
    """The m + 1 index gathers of x · M_{m−1} ⋯ M_0 (``None``: the identity, skipped).

    x M_i = (blockrot(x[π_i⁻¹], Q_i))[π_i], so working in each factor's own order: gather π_{m−1}⁻¹, rotate by
    factor m−1, gather π_{i+1}[π_i⁻¹] (two gathers as one), rotate by factor i, …, rotate by factor 0, gather
    π_0 (the identity). One factor (plain OFT) gathers nothing. ``transposed``: those of x · M_0ᵀ ⋯ M_{m−1}ᵀ
    (x M_iᵀ = blockrot(x[π_i⁻¹], Q_iᵀ)[π_i]): gather π_0⁻¹ (the identity), rotate by factor 0, gather π_i[π_{i+1}⁻¹],
    rotate by factor i + 1, …, gather π_{m−1}."""
    build = _gathers.__wrapped__ if torch.compiler.is_compiling() else _gathers  # compile: traced, no cache
    return build(d_in, m, D, H, device, transposed)


@functools.lru_cache(maxsize=256)
def _gathers(d_in: int, m: int, D: int, H: int, device: torch.device, transposed: bool) -> tuple[Tensor | None, ...]:
    """Built once per layout and device, outside any inference mode (an inference tensor could not be
    saved for a later backward)."""
    if m == 1:
        return (None, None)
    with torch.inference_mode(False), torch.no_grad():
        perms = [_butterfly(d_in, D, H, i, device) for i in range(m)]
        inv = [torch.argsort(p) for p in perms]
        if transposed:
            return (None, *(perms[i][inv[i + 1]] for i in range(m - 1)), perms[m - 1])
        return (inv[m - 1], *(perms[i + 1][inv[i]] for i in reversed(range(m - 1))), None)


def rotation_step(R: Tensor, dtype: torch.dtype) -> Tensor:
    """Q − I = −2 (I + S)⁻¹ S per block, S = ½(R − Rᵀ): (..., H, H), exactly 0 at R = 0; solved in at
    least fp32, then cast to ``dtype``. (Q = (I − S)(I + S)⁻¹ = (I + S)⁻¹(I − S), peft's cayley_batch.)"""
    dt = torch.promote_types(R.dtype, torch.float32)
    Rf = R.to(dt)
    S = 0.5 * (Rf - Rf.mT)
    eye = torch.eye(R.shape[-1], dtype=dt, device=R.device)
    return torch.linalg.solve(eye + S, -2.0 * S).to(dtype)


def rotate(x: Tensor, R: Tensor) -> Tensor:
    """x · M_{m−1} ⋯ M_1 M_0 for x (..., d_in) and R (m, D, H, H): x unchanged (bit for bit) at R = 0."""
    m, D, H = R.shape[0], R.shape[1], R.shape[2]
    K = rotation_step(R, x.dtype)  # (m, D, H, H)
    steps = gathers(D * H, m, D, H, x.device)
    u = x
    for i, g in zip(reversed(range(m)), steps):  # factor m−1 acts on x first
        if g is not None:
            u = torch.index_select(u, -1, g)
        u = u + linalg.block_rotate(u, K[i])
    last = steps[m]
    return u if last is None else torch.index_select(u, -1, last)


def rotate_transposed(x: Tensor, R: Tensor) -> Tensor:
    """x · M_0ᵀ M_1ᵀ ⋯ M_{m−1}ᵀ = x · (M_{m−1} ⋯ M_0)ᵀ for x (..., d_in) and R (m, D, H, H): the rows of W Mᵀ."""
    m, D, H = R.shape[0], R.shape[1], R.shape[2]
    K = rotation_step(R, x.dtype).mT  # (m, D, H, H)  Qᵀ − I
    steps = gathers(D * H, m, D, H, x.device, transposed=True)
    u = x
    for i, g in zip(range(m), steps):  # factor 0 acts first
        if g is not None:
            u = torch.index_select(u, -1, g)
        u = u + linalg.block_rotate(u, K[i])
    last = steps[m]
    return u if last is None else torch.index_select(u, -1, last)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "boft.apply")
    R, s = params["R"], params["s"]
    why = _layout_error(tuple(R.shape), W.shape[-1])
    if why is not None:
        raise ValueError(f"boft.apply: {why} (W has shape {tuple(W.shape)}); init the params from this W")
    y = torch.nn.functional.linear(rotate(x, R), W, b)  # x M Wᵀ + b
    # (y − b) ⊙ s + b as peft, written as y + (s − 1) ⊙ (y − b): exactly y at s = 1
    return torch.addcmul(y, y if b is None else y - b, s - 1.0)


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(diag(s) W Mᵀ, b): the dense layer ``apply`` computes (peft's merge), from W's rows."""
    R, s = params["R"], params["s"]
    why = _layout_error(tuple(R.shape), W.shape[-1])
    if why is not None:
        raise ValueError(f"boft.merged: {why} (W has shape {tuple(W.shape)}); init the params from this W")
    return rotate_transposed(W, R) * s[:, None], b


# ----------------------------------------------------------------------------- peft: the BOFT type
# boft_R (m, D, H, H) and boft_s (d_out, 1) per targeted module, (1, d_out) on an nn.Conv2d (peft's boft_P is a
# non-persistent buffer, rebuilt from the sizes). peft's BOFT has one boft_block_size or one boft_block_num, and one
# boft_n_butterfly_factor, for the whole adapter; each layer resolves the other size from its d_in.
_TENSORS = ("boft_R", "boft_s")


def _file_config(cfg: PeftConfig, factors: int | None = None) -> BOFTConfig:
    """The file's sizes as a BOFTConfig (``factors`` overrides n_butterfly_factor), or a ValueError naming the field."""
    fields = {
        "block_size": cfg.get("boft_block_size", 4),
        "block_num": cfg.get("boft_block_num", 0),
        "n_butterfly_factor": cfg.get("boft_n_butterfly_factor", 1) if factors is None else factors,
    }
    try:
        return BOFTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{cfg.where} sets {_sizes(cfg)}: {e}") from None


def _sizes(cfg: PeftConfig) -> str:
    return f"boft_block_size={cfg.get('boft_block_size', 4)!r}, boft_block_num={cfg.get('boft_block_num', 0)!r}"


def _check(cfg: PeftConfig) -> None:
    """The sizes' types and the one-of rule; the butterfly rules per layer in ``_peft_read`` (they depend on
    the factor count boft_R holds)."""
    _file_config(cfg, 1)
    m = cfg.get("boft_n_butterfly_factor", 1)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"{cfg.where} sets boft_n_butterfly_factor={m!r}; expected a positive int (1 is plain OFT)")


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    _peft_conv.check_plain_conv2d(layer, cfg.where, "BOFT")
    R, s = layer.tensors["boft_R"], layer.tensors["boft_s"]
    d_out, d_in = layer.W.shape
    # peft without its CUDA extension trains and saves one factor whatever boft_n_butterfly_factor says
    m = 1 if R.ndim == 4 and R.shape[0] == 1 else cfg.get("boft_n_butterfly_factor", 1)
    try:
        D, H = _blocks(_file_config(cfg, m), d_in, f"layer {layer.path!r}")
    except ValueError as e:
        raise ValueError(f"{cfg.where} sets {_sizes(cfg)} and boft_n_butterfly_factor={m}: {e}") from None
    if tuple(R.shape) != (m, D, H, H):
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.boft_R has shape {tuple(R.shape)}, but {cfg.where} gives "
            f"{(m, D, H, H)} (n_butterfly_factor, block_num, block_size, block_size) for d_in={d_in}"
        )
    want = (1, d_out) if layer.kind == "Conv" else (d_out, 1)  # peft's Conv2d keeps boft_s as a row
    if tuple(s.shape) != want:
        raise ValueError(f"{cfg.file!r}: {layer.path}.boft_s has shape {tuple(s.shape)}, expected {want}")
    return {"R": R, "s": s.reshape(d_out)}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    _peft_conv.check_plain_conv2d(layer, "save_peft", "BOFT")
    R, s = leaves["R"].detach(), leaves["s"].detach()
    tensors = {"boft_R": R, "boft_s": s.reshape(1, -1) if layer.kind == "Conv" else s.reshape(-1, 1)}
    return tensors, {"m": R.shape[0], "D": R.shape[1], "H": R.shape[2]}


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    def seen(key: str) -> dict:
        return {f[key]: layer.path for layer, f in zip(layers, facts)}  # value -> an example path

    factors, sizes, nums = seen("m"), seen("H"), seen("D")
    if len(factors) > 1:
        raise ValueError(
            f"save_peft: peft's BOFT has one boft_n_butterfly_factor per adapter, but these layers use "
            f"{', '.join(f'{m} (e.g. {p!r})' for m, p in factors.items())}"
        )
    if len(sizes) > 1 and len(nums) > 1:
        raise ValueError(
            f"save_peft: peft's BOFT has one boft_block_size or one boft_block_num per adapter, but these layers "
            f"have block sizes {', '.join(f'{h} (e.g. {p!r})' for h, p in sizes.items())} and block counts "
            f"{', '.join(f'{d} (e.g. {p!r})' for d, p in nums.items())}; save them in groups of one of the two"
        )
    block_size, block_num = (next(iter(sizes)), 0) if len(sizes) == 1 else (0, next(iter(nums)))
    return {
        "exclude_modules": None,
        "boft_block_size": block_size,
        "boft_block_num": block_num,
        "boft_n_butterfly_factor": next(iter(factors)),
        "boft_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_BOFT = PeftFormat(
    peft_type="BOFT",
    suffixes=_TENSORS,
    fields=frozenset(
        {
            "boft_block_size",
            "boft_block_num",
            "boft_n_butterfly_factor",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "bias",
        }
    ),
    # the initial values the file overrides; dropout (training only); fan_in_fan_out (peft resets it to
    # False for nn.Linear; its Conv2d does not read it)
    ignores=frozenset({"init_weights", "boft_dropout", "fan_in_fan_out"}),
    refuses_kinds={"Conv1D": "peft's BOFT adapts torch.nn.Linear and Conv2d only"},
    kinds=frozenset({"nn.Linear", "Conv1D", "Conv", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt"}),
    check=_check,
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_BOFT, claims=lambda cfg, path: True, tensors=lambda cfg, layer: _TENSORS, read=_peft_read, write=_peft_write
)
