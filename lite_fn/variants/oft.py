"""OFT — Qiu et al. 2023, arXiv 2306.07280 (orthogonal finetuning), in peft's block-diagonal form
(peft: tuners/oft, ``OFTConfig``; COFT is the paper's constrained variant, §3.2).

The input side of the layer is rotated by R = blockdiag(R_1, …, R_n), n blocks of size bs (n·bs = d_in):

    Q_i = P_i − P_iᵀ                       skew-symmetric bs × bs; P_i strictly upper triangular, its
                                           entries row i of the leaf Q (peft's oft_R.weight, as is)
    R_i = (I − Q_i)(I + Q_i)⁻¹             use_cayley_neumann=False: the Cayley transform, as peft solves it
    R_i ≈ I + 2Q_i + 2Q_i² + … + 2Q_i^{p−1} + Q_i^p
                                           use_cayley_neumann=True (peft's default): peft's truncated Neumann
                                           series, p = max(T − 1, 3) for T = num_cayley_neumann_terms ≥ 3,
                                           I + 2Q_i for T = 2 (the coefficients are the leaf ``neumann``)
    y  = (x · R) Wᵀ + b                    peft rotates the input before the base layer (merged: W' = W Rᵀ)

    COFT (coft=True): before R is built, each Q_i ← Q_i · min(1, ε' / ‖Q_i‖_F) with ε' = eps / √(rows of
    Q), the projection peft applies; forward only, the gradient passes it unchanged (straight through).
    block_share=True: one block (Q has one row) used for all n blocks.

    Q (n, bs(bs−1)/2), or (1, ·) with block_share   = 0;                          trainable
    eps ()       COFT's eps, only with coft=True;                                   frozen
    neumann (p,) c_1 … c_p of R_i ≈ I + Σ_k c_k Q_i^k, only with use_cayley_neumann;  frozen

Identity at init: Q = 0, so R = I exactly. apply computes x + x·blockdiag(R − I) with R − I built from Q
(exactly zero at Q = 0), so y is F.linear(x, W, b) bit for bit there. The small bs × bs algebra runs in at
least fp32 (torch has no half-precision solve). Block size 1 is refused: a 1 × 1 skew matrix is 0, so
there is nothing to train.
Note: peft's two modes rotate in opposite senses for the same Q: the series expands (I + Q)(I − Q)⁻¹,
the exact solve gives (I − Q)(I + Q)⁻¹ = its inverse. Both are reproduced as peft computes them.
Deviation (COFT): peft writes the projected Q back into its parameter at every forward (in place, under
no_grad); a pure apply cannot, so the leaf keeps what the optimizer made of it and apply projects it at
every call. Output and gradient for given leaves are peft's; an optimizer step then starts from the
unprojected value (peft: from the projected one), so trajectories differ once a block leaves the ball.
Not here: peft's module_dropout (built but never applied by peft 0.21's forward).

Merged (``merged``: what a layer adapted by weight substitution computes with, and lf.merge): W' = W · blockdiag(R)ᵀ,
b' = b — R's blocks applied to W's rows, never a d_in × d_in matrix.

Output side (peft's OFT on an nn.Embedding, oft_embedding_R; leaf ``Q_out`` instead of Q, trainable): the blocks
act on the layer's output instead,
    y = (x Wᵀ + b) · blockdiag(R)            (merged: W' = blockdiag(R)ᵀ W, b' = b · blockdiag(R))
with n·bs = d_out (an embedding's d_out is embedding_dim; its d_in is the vocabulary). lf.load_peft reads peft's
embedding rotations as Q_out; lf.init's OFT always rotates the input side (it cannot see the layer kind), so an
embedding adapter in peft's form is built by hand: {"Q_out": torch.zeros(dim // bs, bs(bs−1)/2), "neumann": …}
with the other leaves as lf.init gives them. The output side transforms no input, so it runs only where weights
are substituted (an embedding), not on a linear layer's own call.
Deviation (an embedding with padding_idx whose padding row is not zero): the outputs are peft's, but peft rotates the
looked-up vectors, so the padding tokens' gradient reaches oft_embedding_R, while the merged table's padding row
gets no gradient (F.embedding), so neither does Q_out from those tokens. nn.Embedding zeroes that row at init,
where both give the same gradient.

Convolutions: lf.init's OFT rotates the flattened kernel's inputs (d_in = in/groups·∏k, peft's flattening) of
any convolution. peft's file form is read and written for 1 × 1 nn.Conv2d layers without groups only: for a
k × k kernel, k > 1, peft 0.21's forward rotates overlapping input patches and sums them back (F.fold of the
rotated F.unfold), which is not its own merge W·Rᵀ, nor the identity at init; lite_fn computes the merge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter, never_random
from . import _padding

# the variant contract; other names are shared helpers
__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "OFTConfig",
    "apply",
    "apply_input",
    "init",
    "merged",
    "pad",
    "random_init",
    "shapes",
]
NAME = "oft"
TRAINABLE = frozenset({"Q", "Q_out"})  # leaves an optimizer updates (Q_out: the output-side form)

random_init = never_random  # init draws no random numbers (Q = 0)

DEFAULT_BLOCK_SIZE = 32  # peft's oft_block_size default


@dataclass(frozen=True)
class OFTConfig:
    r: int | None = None  # number of blocks per layer (peft's r) ...
    oft_block_size: int | None = None  # ... or the block size; set at most one (neither: block size 32, peft's default)
    coft: bool = False  # constrained OFT: project each Q_i into the ball of radius eps / √n
    eps: float = 6e-5  # COFT's radius (peft's default); used only with coft=True
    block_share: bool = False  # one rotation block shared by all blocks of a layer
    use_cayley_neumann: bool = True  # peft's default: the truncated series instead of the exact Cayley transform
    num_cayley_neumann_terms: int = 5
    module_dropout: float = 0.0  # only 0.0: see the module docstring
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        if self.r == 0 and not isinstance(self.r, bool):
            raise ValueError(
                f"{who}: r=0 must be a positive int; peft writes r=0 for 'not set': leave r=None here and set oft_block_size"
            )
        if self.r is not None:
            _checks.positive_int("r", self.r, who)
        if self.oft_block_size is not None:
            bs = self.oft_block_size
            if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2:
                raise ValueError(
                    f"{who}: oft_block_size={bs!r} must be an int >= 2 (a 1 × 1 skew-symmetric block is 0, nothing to "
                    f"train; e.g. oft_block_size=32), or None to give r instead"
                )
        if self.r is not None and self.oft_block_size is not None:
            raise ValueError(
                f"{who}: r={self.r} and oft_block_size={self.oft_block_size} are both set, but r × oft_block_size = d_in "
                f"fixes one by the other; set only r={self.r} (blocks per layer) or only oft_block_size={self.oft_block_size}"
            )
        for name in ("coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{who}: {name}={getattr(self, name)!r} must be True or False")
        _checks.finite_number("eps", self.eps, who)
        if self.eps <= 0:
            raise ValueError(f"{who}: eps={self.eps!r} must be > 0 (COFT's radius; peft's default is eps=6e-5)")
        _checks.positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms, who)
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 2:
            raise ValueError(
                f"{who}: num_cayley_neumann_terms={self.num_cayley_neumann_terms} keeps only the I term, so R = I for "
                f"every Q and nothing trains; use num_cayley_neumann_terms=5 (peft's default) or use_cayley_neumann=False"
            )
        _checks.zero_only(
            self,
            ("module_dropout",),
            who,
            "peft 0.21 builds its block dropout (whole blocks set to I while training) but never applies it in forward, and lite_fn has none",
        )

    @property
    def block_size(self) -> int | None:
        """The block size the config fixes (None when it gives r, the number of blocks, instead)."""
        if self.r is not None:
            return None
        return DEFAULT_BLOCK_SIZE if self.oft_block_size is None else self.oft_block_size


Config = OFTConfig


def neumann_coefficients(terms: int) -> list[float]:
    """[c_1, …, c_p] of peft's Cayley–Neumann series R ≈ I + Σ_k c_k Q^k for num_cayley_neumann_terms=terms
    (peft 0.21's _cayley_batch: 2Q, then 2Q² … 2Q^{p−1} and a last Q^p with p = max(terms − 1, 3))."""
    if terms <= 1:
        return [0.0]  # R = I
    if terms == 2:
        return [2.0]
    p = max(terms - 1, 3)
    return [2.0] * (p - 1) + [1.0]


def _neumann_terms(c: list[float]) -> int | None:
    """The num_cayley_neumann_terms whose series has coefficients ``c`` (trailing zeros, e.g. from padding, add
    nothing), or None when peft has no such series."""
    while c and c[-1] == 0.0:
        c = c[:-1]
    if not c:
        return 1
    terms = 2 if c == [2.0] else len(c) + 1
    return terms if neumann_coefficients(terms) == c else None


def _nearest(valid: Iterable[int], value: int, name: str) -> str:
    """``name=a or name=b``: the valid values just below and above ``value``."""
    valid = sorted(valid)
    lo = [v for v in valid if v < value]
    hi = [v for v in valid if v > value]
    picks = ([lo[-1]] if lo else []) + ([hi[0]] if hi else [])
    return " or ".join(f"{name}={v}" for v in picks)


def _blocks(d_in: int, cfg: OFTConfig, who: str) -> tuple[int, int]:
    """(n blocks, block size) of a layer with d_in inputs, or a ValueError with valid values."""
    divisors = [k for k in range(1, d_in + 1) if d_in % k == 0]
    if d_in < 2:
        raise ValueError(f"{who}: d_in={d_in} cannot hold a rotation block of size >= 2; do not target this layer with OFT")
    bs = cfg.block_size
    if bs is None:
        n = cfg.r
        assert n is not None  # the config sets r or a block size
        valid = [k for k in divisors if d_in // k >= 2]
        if n not in valid:
            raise ValueError(
                f"{who}: r={n} does not split d_in={d_in} into equal blocks of size >= 2; use "
                f"{_nearest(valid, n, 'r')} (a divisor of {d_in} up to {d_in // 2}; peft would change r with a warning)"
            )
        return n, d_in // n
    valid = [k for k in divisors if k >= 2]
    if bs not in valid:
        raise ValueError(
            f"{who}: oft_block_size={bs} does not divide d_in={d_in}; use {_nearest(valid, bs, 'oft_block_size')} "
            f"(a divisor of {d_in}; peft would change the block size with a warning)"
        )
    return d_in // bs, bs


def _layout(q_shape: tuple[int, ...], d_in: int, who: str) -> tuple[int, int]:
    """(block size, n blocks) that a leaf Q of shape ``q_shape`` gives on d_in inputs, or a ValueError."""
    if len(q_shape) == 2 and q_shape[0] >= 1:
        rows, m = q_shape
        bs = (1 + math.isqrt(1 + 8 * m)) // 2
        if bs >= 2 and bs * (bs - 1) // 2 == m and d_in % bs == 0 and rows in (1, d_in // bs):
            return bs, d_in // bs
    raise ValueError(
        f"{who}: Q of shape {tuple(q_shape)} is not an OFT layout for d_in={d_in}: expected (n, bs(bs−1)/2) with "
        f"n·bs = d_in, or (1, bs(bs−1)/2) with block_share; init the params from this layer's W with lf.init"
    )


def init(key: _keys.Key, W: Tensor, cfg: OFTConfig, statistic=None) -> dict[str, Tensor]:
    _, d_in = _checks.check_weight(W, "oft.init")
    n, bs = _blocks(d_in, cfg, "oft.init")
    opts = _checks.like(W)
    params = {"Q": torch.zeros(1 if cfg.block_share else n, bs * (bs - 1) // 2, **opts).requires_grad_(True)}
    if cfg.coft:
        params["eps"] = torch.tensor(float(cfg.eps), **opts)
    if cfg.use_cayley_neumann:
        params["neumann"] = torch.tensor(neumann_coefficients(cfg.num_cayley_neumann_terms), **opts)
    return params


def _rotated(leaves) -> str:
    """The leaf holding the rotation: Q (input side), or Q_out (output side) when only it is given."""
    return "Q_out" if "Q_out" in leaves and "Q" not in leaves else "Q"


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): Q's from Q itself (block size, block_share), which must
    cover d_in (Q_out's: d_out); eps and neumann when present (the series length from neumann itself)."""
    name = _rotated(leaves)
    q = tuple(leaves.get(name, ()))
    _layout(q, d_out if name == "Q_out" else d_in, "oft" if name == "Q" else "oft (Q_out, on d_out)")
    out = {name: q}
    if "eps" in leaves:
        out["eps"] = ()
    if "neumann" in leaves:
        c = tuple(leaves["neumann"])
        out["neumann"] = (max(c[0], 1) if len(c) == 1 else 1,)
    return out


def _coft(S: Tensor, eps: Tensor) -> Tensor:
    """Each Q_i scaled into the Frobenius ball of radius ε' = eps / √(rows) (peft's _project_batch), the
    projection in the forward only: its gradient is the identity, as peft's in-place projection under no_grad."""
    eps = eps / math.sqrt(S.shape[-3])
    Sd = S.detach()
    norm = torch.linalg.matrix_norm(Sd, keepdim=True)  # (rows, 1, 1)  ‖Q_i‖_F
    projected = torch.where(norm <= eps, Sd, eps * (Sd / norm))
    return projected + (S - Sd)  # the projected values exactly (S − Sd = 0), with S's gradient


def rotation_minus_identity(params: dict[str, Tensor], bs: int) -> Tensor:
    """R_i − I for every row of Q (or Q_out), (rows, bs, bs), in at least fp32; exactly 0 where Q_i = 0."""
    Q = params[_rotated(params)]
    dt = torch.promote_types(Q.dtype, torch.float32)
    S = 2.0 * linalg.skew_from_triu(Q.to(dt), bs)  # Q_i = P_i − P_iᵀ (skew_from_triu gives ½(P − Pᵀ))
    if "eps" in params:
        S = _coft(S, params["eps"].to(dt))
    if "neumann" not in params:
        # cayley(X) = (I − X)⁻¹(I + X), so cayley(−Q) = (I + Q)⁻¹(I − Q) = (I − Q)(I + Q)⁻¹, peft's R
        return linalg.cayley(-S) - torch.eye(bs, dtype=dt, device=S.device)
    c = params["neumann"].to(dt)  # (p,)
    power, K = S, c[0] * S
    for k in range(1, c.shape[-1]):
        power = power @ S
        K = K + c[k] * power
    return K


def _steps(params: dict[str, Tensor], d: int, dtype: torch.dtype, who: str) -> Tensor:
    """blockdiag(R) − I's blocks on d features: (n, bs, bs) in ``dtype`` (one block expanded with block_share)."""
    bs, n = _layout(tuple(params[_rotated(params)].shape), d, who)
    return rotation_minus_identity(params, bs).to(dtype).expand(n, bs, bs)


def _rotate(x: Tensor, K: Tensor) -> Tensor:
    """x · blockdiag(I + K) for K (n, bs, bs): exactly x where K = 0."""
    return x + linalg.block_rotate(x, K)


def apply_input(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """x · blockdiag(R): all this variant does to the layer (which then computes (x R) Wᵀ + b).

    Raises:
        ValueError: the output-side form (leaf Q_out), which rotates the layer's output, not its input.
    """
    if "Q" not in params:
        raise ValueError(
            "oft: the output-side form (leaf Q_out: peft's OFT on an nn.Embedding) rotates the layer's output, so it "
            "is no transform of the input; use it on the embedding it was loaded for (adapted by weight substitution)"
        )
    return _rotate(x, _steps(params, x.shape[-1], x.dtype, "oft.apply"))  # exactly x at Q = 0


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "oft.apply")
    if "Q" in params:
        return torch.nn.functional.linear(apply_input(params, x), W, b)
    return _rotate(torch.nn.functional.linear(x, W, b), _steps(params, W.shape[-2], x.dtype, "oft.apply"))


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W Rᵀ, b) with R = blockdiag(R_i) (peft's merge, on the flattened kernel for a convolution), or
    (Rᵀ W, b R) for the output-side form: the dense layer ``apply`` computes, R's blocks applied to W's rows
    (columns), never a d × d matrix."""
    if "Q" in params:
        K = _steps(params, W.shape[-1], W.dtype, "oft.merged")
        return _rotate(W, K.mT), b  # rows w ↦ w Rᵀ: x (W Rᵀ)ᵀ = (x R) Wᵀ
    K = _steps(params, W.shape[-2], W.dtype, "oft.merged")
    return _rotate(W.mT, K).mT, None if b is None else _rotate(b, K)  # (x Wᵀ + b) R = x (Rᵀ W)ᵀ + b R


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): adapters of one layout only (equal Q shapes, i.e. block size and block_share, and
    the same form); Neumann series padded with zero coefficients (0·Q^k adds exactly 0); an adapter that
    does not target the layer gets Q = 0 (R = I exactly)."""
    names = {k: sorted(v) for k, v in present.items()}
    if len({tuple(v) for v in names.values()}) > 1:
        _padding.refuse(
            NAME,
            path,
            f"the adapters compute different functions of Q there (leaves {names}: eps comes with coft=True, "
            "neumann with use_cayley_neumann=True); stack OFT adapters of one form",
        )
    name = _rotated(present[min(present)])
    q_shapes = {k: tuple(v[name].shape) for k, v in present.items()}
    if len(set(q_shapes.values())) > 1:
        _padding.refuse(
            NAME,
            path,
            f"the adapters rotate different blocks there (Q shapes {q_shapes}: another block size or block_share); "
            "stack OFT adapters of equal oft_block_size and block_share",
        )
    p = max((v["neumann"].shape[0] for v in present.values() if "neumann" in v), default=0)
    out = {k: {n: (_padding.grown(t, p, 0) if n == "neumann" else t) for n, t in v.items()} for k, v in present.items()}
    donor = out[min(present)]
    for k in range(K):
        if k not in out:
            out[k] = {n: (torch.zeros_like(t) if n == name else t.detach().clone()) for n, t in donor.items()}
    return out


# ----------------------------------------------------------------------------- peft: the OFT type
# One tensor per targeted module, oft_R.weight (n, bs(bs−1)/2), or (1, ·) with block_share: the leaf Q as
# is (an nn.Embedding's: oft_embedding_R.weight, over its embedding_dim, the leaf Q_out). peft has one r /
# oft_block_size for the whole adapter (no pattern) and resolves it per layer: a value that does not divide the
# rotated width is moved to a nearby divisor (_peft_adjusted), with a warning.
_TENSOR = "oft_R.weight"
_EMBEDDING = "oft_embedding_R.weight"
_LINEAR_ONLY = "peft's OFT adapts torch.nn.Linear (and Conv2d, Embedding) only, not transformers' Conv1D"


def _peft_adjusted(d_in: int, v: int) -> int:
    """peft 0.21's adjust_oft_parameters: the divisor of d_in nearest to v (the lower one on a tie), d_in when v > d_in."""
    if v >= d_in:
        return d_in
    higher = next(h for h in range(v, d_in + 1) if d_in % h == 0)
    lower = next(lo for lo in range(v, 0, -1) if lo == 1 or d_in % lo == 0)
    return lower if v - lower <= higher - v else higher


def _peft_blocks(cfg: PeftConfig, d_in: int) -> tuple[int, int]:
    """(n blocks, block size) that peft gives a layer with d_in inputs under this config."""
    r, bs = cfg.get("r", 0), cfg.get("oft_block_size", DEFAULT_BLOCK_SIZE)
    if r == 0:
        bs = bs if d_in % bs == 0 else _peft_adjusted(d_in, bs)
        return d_in // bs, bs
    r = r if d_in % r == 0 else _peft_adjusted(d_in, r)
    return r, d_in // r


def _peft_check(cfg: PeftConfig) -> None:
    where = cfg.where
    if "oft_block_size" not in cfg.fields:
        raise ValueError(
            f"{where} has no oft_block_size: it was written by peft < 0.14, whose OFT weights are incompatible "
            f"with today's (peft itself refuses it); retrain the adapter"
        )
    r, bs = cfg.get("r", 0), cfg.get("oft_block_size")
    for name, v in (("r", r), ("oft_block_size", bs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where} sets {name}={v!r}; expected an int >= 0 (0: not set)")
    if (r == 0) == (bs == 0):
        raise ValueError(
            f"{where} sets r={r} and oft_block_size={bs}; peft's OFT needs exactly one of them non-zero (peft refuses it too)"
        )
    terms = cfg.get("num_cayley_neumann_terms", 5)
    if isinstance(terms, bool) or not isinstance(terms, int):
        raise ValueError(f"{where} sets num_cayley_neumann_terms={terms!r}; expected an int")
    eps = cfg.get("eps", 6e-5)
    if cfg.get("coft") and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)):
        raise ValueError(f"{where} sets eps={eps!r} with coft=true; expected a finite number")


def _side(layer: PeftLayer) -> tuple[str, str, int, str]:
    """(stored tensor, leaf, rotated width, its name) of one layer: an embedding's outputs, any other's inputs."""
    if layer.kind == "Embedding":
        return _EMBEDDING, "Q_out", layer.W.shape[0], "embedding_dim"
    return _TENSOR, "Q", layer.W.shape[1], "d_in"


def _check_conv(layer: PeftLayer, who: str) -> None:
    """The convolutions whose peft OFT form lite_fn reads and writes, 1 × 1 nn.Conv2d without groups or dilation
    (see the module docstring); a ValueError saying why for any other."""
    if layer.kind != "Conv":
        return
    conv, path = layer.module, layer.path
    if len(layer.stored) != 4:
        raise ValueError(
            f"{who}: {path!r} is an nn.Conv{len(layer.stored) - 2}d, but peft's OFT adapts nn.Linear, nn.Conv2d and "
            f"nn.Embedding only (peft refuses to adapt it); leave it out of the adapter"
        )
    if tuple(conv.kernel_size) != (1, 1):
        raise ValueError(
            f"{who}: {path!r} is an nn.Conv2d with kernel_size={tuple(conv.kernel_size)}. On a kernel larger than 1 × 1, "
            f"peft 0.21's OFT forward rotates overlapping input patches and sums them back (F.fold of the rotated "
            f"F.unfold): neither its own merge (the rotated kernel W·Rᵀ, which lite_fn computes) nor the identity at "
            f"init, so lite_fn cannot match it; it reads and writes peft's OFT on 1 × 1 convolutions only. Keep this "
            f"adapter in lite_fn's format (lf.save), or leave the layer out"
        )
    if conv.groups != 1:
        raise ValueError(
            f"{who}: {path!r} is an nn.Conv2d with groups={conv.groups}: peft's OFT rotates all {conv.in_channels} "
            f"input channels together, which a grouped kernel cannot hold (peft's merge fails there too); leave it out"
        )
    if tuple(conv.dilation) != (1, 1):
        raise ValueError(
            f"{who}: {path!r} is an nn.Conv2d with dilation={tuple(conv.dilation)}, which peft's OFT refuses "
            f"('Conv2d with dilation > 1 is not supported by OFT'); leave it out"
        )


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    _check_conv(layer, cfg.where)
    tensor, leaf, d, what = _side(layer)
    Q = layer.tensors[tensor]
    n, bs = _peft_blocks(cfg, d)
    if bs < 2:
        raise ValueError(
            f"{cfg.where} gives {layer.path!r} ({what}={d}) blocks of size {bs}: a 1 × 1 rotation is the identity "
            f"and lite_fn's OFT refuses it; load this adapter without that layer or retrain with another oft_block_size"
        )
    want = (1 if cfg.get("block_share") else n, bs * (bs - 1) // 2)
    if tuple(Q.shape) != want:
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.{tensor} has shape {tuple(Q.shape)}, but {cfg.where} gives {want} for "
            f"{what}={d} ({n} blocks of size {bs}, block_share={bool(cfg.get('block_share'))}); the files do not belong together"
        )
    leaves = {leaf: Q}
    if cfg.get("coft"):
        leaves["eps"] = torch.tensor(float(cfg.get("eps", 6e-5)), dtype=torch.float64)
    if cfg.get("use_cayley_neumann", True):  # peft's default when the field is absent
        c = neumann_coefficients(cfg.get("num_cayley_neumann_terms", 5))
        leaves["neumann"] = torch.tensor(c, dtype=torch.float64)
    return leaves


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    _check_conv(layer, "save_peft")
    tensor, leaf, d, what = _side(layer)
    if leaf not in leaves:
        if leaf == "Q_out":
            raise ValueError(
                f"save_peft: {layer.path!r} is an nn.Embedding with OFT's input-side leaf Q (as lf.init builds it: blocks "
                f"over its {layer.W.shape[1]} vocabulary entries); peft's OFT rotates an embedding's outputs "
                f"(oft_embedding_R over embedding_dim={d}: the leaf Q_out, see lite_fn/variants/oft.py), so peft cannot "
                f"hold it; keep it in lite_fn's format (lf.save)"
            )
        raise ValueError(
            f"save_peft: {layer.path!r} has OFT's output-side leaf Q_out, which peft holds for nn.Embedding layers only "
            f"(oft_embedding_R); its OFT on a {layer.kind} layer rotates the input (leaf Q)"
        )
    Q = leaves[leaf]
    bs, n = _layout(tuple(Q.shape), d, f"save_peft: {layer.path!r} ({what})")
    terms = None
    if "neumann" in leaves:
        c = [float(v) for v in leaves["neumann"].detach().cpu()]
        terms = _neumann_terms(c)
        if terms is None:
            raise ValueError(
                f"save_peft: {layer.path!r} has Cayley–Neumann coefficients {c}, which no num_cayley_neumann_terms of "
                f"peft gives (e.g. {neumann_coefficients(5)} for 5 terms)"
            )
    facts = {
        "bs": bs,
        "n": n,
        "shared": Q.shape[0] == 1 if n > 1 else None,  # one block: either reading fits
        "eps": float(leaves["eps"]) if "eps" in leaves else None,
        "terms": terms,
    }
    return {tensor: Q.detach()}, facts


def _one(layers: list[PeftLayer], facts: list[dict], key: str, what: str):
    """The one value of ``facts[*][key]`` (None entries fit any), or a ValueError naming two layers that differ."""
    seen = {}
    for layer, f in zip(layers, facts):
        if f[key] is not None:
            seen.setdefault(f[key], layer.path)
    if len(seen) > 1:
        raise ValueError(
            f"save_peft: peft's OFT has one {what} per adapter, but these layers differ: "
            + ", ".join(f"{v!r} at {p!r}" for v, p in seen.items())
        )
    return next(iter(seen), None)


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    if len({f["bs"] for f in facts}) == 1:
        sizes = {"r": 0, "oft_block_size": facts[0]["bs"]}
    elif len({f["n"] for f in facts}) == 1:
        sizes = {"r": facts[0]["n"], "oft_block_size": 0}
    else:
        raise ValueError(
            "save_peft: peft's OFT has one r (blocks per layer) or one oft_block_size per adapter, but these layers "
            "have neither in common: "
            + ", ".join(f"{f['n']} blocks of {f['bs']} at {layer.path!r}" for layer, f in zip(layers, facts))
        )
    modes = {
        layer.path: ("neumann" if f["terms"] is not None else "exact", f["eps"] is not None) for layer, f in zip(layers, facts)
    }
    if len(set(modes.values())) > 1:
        raise ValueError(
            "save_peft: peft's OFT has one use_cayley_neumann and one coft per adapter, but these layers mix "
            + ", ".join(f"{m} coft={c} at {p!r}" for p, (m, c) in modes.items())
        )
    eps = _one(layers, facts, "eps", "eps")
    terms = _one(layers, facts, "terms", "num_cayley_neumann_terms")
    return {
        # the Cayley–Neumann series as peft >= 0.18 computes it (older files get a warning from peft's loader)
        "peft_version": "0.18.0",
        "exclude_modules": None,
        **sizes,
        "block_share": bool(_one(layers, facts, "shared", "block_share")),
        "coft": eps is not None,
        "eps": 6e-5 if eps is None else writer.number(eps),
        "use_cayley_neumann": terms is not None,
        "num_cayley_neumann_terms": 5 if terms is None else terms,
        "module_dropout": 0.0,
        "init_weights": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_OFT = PeftFormat(
    peft_type="OFT",
    suffixes=(_TENSOR, _EMBEDDING),
    fields=frozenset(
        {
            "r",
            "oft_block_size",
            "coft",
            "eps",
            "block_share",
            "use_cayley_neumann",
            "num_cayley_neumann_terms",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "bias",
            "fan_in_fan_out",  # peft sets it to False for nn.Linear, the only kind it reads here
        }
    ),
    # the file overrides the initial values; peft 0.21 builds module_dropout but never applies it
    ignores=frozenset({"init_weights", "module_dropout"}),
    refuses_kinds={"Conv1D": _LINEAR_ONLY},
    kinds=frozenset({"nn.Linear", "Conv1D", "Conv", "Embedding", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt"}),
    check=_peft_check,
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_OFT,
    claims=lambda cfg, path: True,
    tensors=lambda cfg, layer: (_side(layer)[0],),
    read=_peft_read,
    write=_peft_write,
)
