"""HRA — Yuan et al. 2024, arXiv 2405.17484 (Householder reflection adaptation).

    H_i = I − 2 u_i u_iᵀ / ‖u_i‖²,    R = H_0 H_1 ⋯ H_{r−1}    (d_in × d_in, orthogonal; never built)
    y = x (W R)ᵀ + b = (x H_{r−1} ⋯ H_0) Wᵀ + b                  (peft: new_weight = W @ R)

    U (r, d_in): row i is u_i;  trainable.
        init (peft's init_weights=True): r/2 vectors ~ kaiming-uniform(a=√5) of peft's (d_in, r/2) tensor,
        whose fan-in is r/2, so U(±1/√(r/2)); each vector repeated twice in a row (u_0 = u_1, u_2 = u_3, …).
        init_weights=False (peft's reset_hra_parameters_random): r independent vectors ~ kaiming-uniform(a=√5)
        of the (d_in, r) tensor, fan-in r: U(±1/√r); any r, not the identity.

Identity at init: H_{2k} H_{2k+1} = H² = I for each repeated pair, so R = I (up to rounding).
The reflections act on x in compact UT form (linalg.householder_chain): x − ((x Û) T⁻ᵀ) Ûᵀ,
two rank-r products per token, O(r·d_in), instead of r sequential passes over x.
Odd r is rejected with the paired init: peft warns and falls back to a random (non-identity) init; here it is an
error (init_weights=False asks for the random init by name).
r > d_in is rejected: any d_in × d_in orthogonal matrix is a product of at most d_in reflections.

Gram–Schmidt form (peft's apply_GS=True; leaf ``U_gs`` (r, d_in) instead of ``U``, trainable): q_0 … q_{r−1}
orthonormalise u_0 … u_{r−1} in order (peft: modified Gram–Schmidt, column by column), and
    R = I − 2 Q Qᵀ = I − 2 Ûᵀ (Û Ûᵀ)⁻¹ Û        (Q Qᵀ: the orthogonal projector onto span(u_i); Û: rows û_i)
    y = x (W R)ᵀ + b = (x − 2 ((x Ûᵀ) (Û Ûᵀ)⁻¹) Û) Wᵀ + b
R is symmetric and depends only on the span of the u_i. Computed from the Cholesky factor of the r × r Gram
matrix Û Ûᵀ = L Lᵀ (Q = Ûᵀ L⁻ᵀ is Gram–Schmidt's Q exactly), O(r·d_in) per token, never a d_in × d_in matrix.
Deviation: the same function of U as peft's (so the same gradient), with other rounding than its sequential
loop. Linearly dependent vectors give NaN here; peft divides 0 by 0 there (NaN or rounding noise, by the
rounding). peft's paired init is such a case (every second vector orthogonalises to 0), and R is never the
identity (it reflects r directions): there is no identity init, so apply_GS needs init_weights=False (peft's
random init), and a peft file's vectors are checked at load.

Merged (``merged``: what a layer adapted by weight substitution computes with, and lf.merge): W' = W R, b' = b, the
reflections applied to W's rows (the chain in reverse order: w H_0 ⋯ H_{r−1}), never a d_in × d_in matrix.
Convolutions: the flattened kernel (out, in·k·k) is W, as peft's HRA on nn.Conv2d (hra_u (in·k·k, r)). peft's file
form is read and written for the nn.Conv2d layers whose forward peft computes as lite_fn does: square kernels,
groups=1 (peft refuses groups > 1), equal stride and padding along both axes, given as numbers, dilation 1 and
zero padding (peft's forward calls F.conv2d(x, W R, b, stride[0], padding[0]), dropping the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch
from einops import repeat
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter
from . import _padding, _peft_conv

__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "HRAConfig",
    "apply",
    "init",
    "merged",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "hra"
TRAINABLE = frozenset({"U", "U_gs"})  # leaves an optimizer updates (U_gs: the Gram–Schmidt form's vectors)


@dataclass(frozen=True)
class HRAConfig:
    r: int = 8
    apply_GS: bool = False  # peft's Gram–Schmidt form: R = I − 2QQᵀ (leaf U_gs); needs init_weights=False
    init_weights: bool = True  # peft's: True = paired vectors (identity), False = r independent random vectors
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        for name in ("apply_GS", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{who}: {name}={getattr(self, name)!r} must be True or False")
        if self.apply_GS and self.init_weights:
            raise ValueError(
                f"{who}: apply_GS=True has no identity init: R = I − 2QQᵀ reflects r directions and is never I, and "
                f"the paired init (init_weights=True) orthogonalises every second vector to 0 (peft divides 0 by 0); "
                f"pass init_weights=False for peft's random init (r independent vectors, not the identity), or load "
                f"a trained adapter with lf.load_peft"
            )
        if self.r % 2 and self.init_weights:
            use = f"r={self.r + 1} or r={self.r - 1}" if self.r > 1 else "r=2"
            raise ValueError(
                f"{who}: r={self.r} must be even for HRA's identity init (pairs of equal reflections cancel); use {use} "
                f"(or init_weights=False: random vectors, not the identity)"
            )


Config = HRAConfig


def init(key: _keys.Key, W: Tensor, cfg: HRAConfig, statistic=None) -> dict[str, Tensor]:
    d_out, d_in = _checks.check_weight(W, "hra.init")
    if cfg.r > d_in:
        largest = d_in - d_in % 2 if cfg.init_weights else d_in
        raise ValueError(
            f"hra.init: r={cfg.r} exceeds d_in={d_in} for W of shape ({d_out}, {d_in}); more than d_in reflections "
            f"add nothing (and d_in vectors span everything), use {'an even ' if cfg.init_weights else ''}r <= {largest}"
        )
    gen = _keys.generator(key)
    if cfg.init_weights:
        half = linalg.kaiming_uniform(gen, (cfg.r // 2, d_in), fan_in=cfg.r // 2)
        U = repeat(half, "k i -> (k two) i", two=2)  # (r, d_in): u_0 = u_1, u_2 = u_3, …
    else:  # peft's kaiming_uniform_ of its (d_in, r) tensor: fan-in r
        U = linalg.kaiming_uniform(gen, (cfg.r, d_in), fan_in=cfg.r)
    return {"U_gs" if cfg.apply_GS else "U": U.to(dtype=W.dtype, device=W.device).requires_grad_(True)}


def _vectors(leaves) -> str:
    """The leaf holding the vectors: U (reflection chain), or U_gs (Gram–Schmidt form) when only it is given."""
    return "U_gs" if "U_gs" in leaves and "U" not in leaves else "U"


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): U, or U_gs for the Gram–Schmidt form (never both); the
    number of vectors r is read from it."""
    name = _vectors(leaves)
    r = leaves[name][0] if len(leaves.get(name, ())) == 2 else 0
    return {name: (r, d_in)}


def pad(path: str, present: dict, K: int, own) -> NoReturn:
    """lf.stack(pad=True) cannot pad HRA: refused with the reason."""
    _padding.refuse(
        NAME,
        path,
        "HRA's reflections cannot be padded: a reflection of the zero vector is undefined "
        "(I − 2uuᵀ/‖u‖² at u = 0), and a pair of equal reflections is the identity only up to "
        "rounding; stack HRA adapters of equal r on equal target sets",
    )


def gram_schmidt_reflect(x: Tensor, U: Tensor) -> Tensor:
    """x (I − 2 Q Qᵀ), Q the Gram–Schmidt orthonormalisation of the rows of U (r, d): x (..., d) -> (..., d).

    Q Qᵀ = Ûᵀ G⁻¹ Û with G = Û Ûᵀ (r × r), so x − 2 ((x Ûᵀ) G⁻¹) Û: two rank-r products per token. G⁻¹ from
    its Cholesky factor, in at least fp32; a G that is not positive definite (dependent vectors) gives NaN,
    without a data-dependent branch (vmap, compile)."""
    Un = U / torch.linalg.vector_norm(U, dim=-1, keepdim=True)  # (r, d) rows û_i
    dt = torch.promote_types(U.dtype, torch.float32)
    G = Un.to(dt) @ Un.to(dt).T  # (r, r)
    L, info = torch.linalg.cholesky_ex(G)
    ok = info == 0
    eye = torch.eye(U.shape[0], dtype=dt, device=U.device)
    Ginv = torch.cholesky_inverse(torch.where(ok, L, eye))  # L⁻ᵀ L⁻¹ = G⁻¹; the identity stands in for a failed L
    Ginv = torch.where(ok, Ginv, torch.full_like(Ginv, torch.nan)).to(x.dtype)
    h = torch.nn.functional.linear(x, Un)  # (..., r)  x Ûᵀ
    return x - 2.0 * torch.nn.functional.linear(torch.nn.functional.linear(h, Ginv), Un.T)  # G⁻¹ is symmetric


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "hra.apply")
    if "U_gs" in params:
        return torch.nn.functional.linear(gram_schmidt_reflect(x, params["U_gs"]), W, b)  # x R Wᵀ + b (R = Rᵀ)
    return torch.nn.functional.linear(linalg.householder_chain(x, params["U"]), W, b)  # x Rᵀ Wᵀ + b


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W R, b): the dense layer ``apply`` computes (peft's merge: new_weight = W @ R), from W's rows."""
    if "U_gs" in params:
        return gram_schmidt_reflect(W, params["U_gs"]), b  # w (I − 2QQᵀ) per row
    # householder_chain(w, U) = w H_{r−1} ⋯ H_0; with the vectors reversed, w H_0 ⋯ H_{r−1} = w R
    return linalg.householder_chain(W, params["U"].flip(0)), b


# ----------------------------------------------------------------------------- peft: the HRA type
# One tensor per targeted module, hra_u (d_in, r): the Householder vectors as columns (U = hra_uᵀ; U_gs with
# apply_GS); on an nn.Conv2d (in·k·k, r), the flattened kernel's inputs. peft's HRA has one r and one apply_GS for the
# whole adapter (no rank_pattern).
_LINEAR_ONLY = "peft's HRA adapts torch.nn.Linear only of the linear layer types (and nn.Conv2d), not transformers' Conv1D"
_DEPENDENT = 1e-6  # sin of the angle between a vector and the span of the earlier ones, below which GS is ~0/0


def _check_independent(cfg: PeftConfig, path: str, U: Tensor) -> None:
    """A Gram–Schmidt file's vectors are linearly independent, or a ValueError naming the first dependent one.

    The Cholesky factor of the cosine matrix Û Ûᵀ has L_ii = ‖v_i‖ / ‖u_i‖, v_i the part of u_i outside the span
    of u_0 … u_{i−1}: what Gram–Schmidt divides by (relative to ‖u_i‖)."""
    U = U.detach().to(torch.float64)
    norms = torch.linalg.vector_norm(U, dim=-1)
    if bool((norms == 0).any()):
        i = int((norms == 0).nonzero()[0])
        raise ValueError(f"{cfg.file!r}: {path}.hra_u's vector {i} is zero; peft's Gram–Schmidt (apply_GS) divides by 0 there")
    Un = U / norms[:, None]
    L, info = torch.linalg.cholesky_ex(Un @ Un.T)
    resid = torch.diagonal(L).nan_to_num(0.0)
    if int(info) > 0:
        resid[int(info) - 1 :] = 0.0
    bad = (resid < _DEPENDENT).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{cfg.where} sets apply_GS=True, but {path}.hra_u's vector {i} lies in the span of vectors 0..{i - 1} "
            f"(relative residual {float(resid[i]):.1e}): peft's Gram–Schmidt divides by ~0 there and computes NaN "
            f"or rounding noise. Such vectors come from peft's paired init (init_weights=True) untrained; train the "
            f"adapter from init_weights=False instead"
        )


def _peft_check(cfg: PeftConfig) -> None:
    gs = cfg.get("apply_GS", False)
    if not isinstance(gs, bool):
        raise ValueError(f"{cfg.where} sets apply_GS={gs!r}; expected true or false")


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    _peft_conv.check_plain_conv2d(layer, cfg.where, "HRA")
    u = layer.tensors["hra_u"]
    if u.ndim != 2:
        raise ValueError(f"{cfg.file!r}: {layer.path}.hra_u has shape {tuple(u.shape)}, expected (d_in, r)")
    cfg.rank(layer.path, u.shape[1], "hra_u")
    if not cfg.get("apply_GS"):
        return {"U": u.T}
    _check_independent(cfg, layer.path, u.T)
    return {"U_gs": u.T}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    _peft_conv.check_plain_conv2d(layer, "save_peft", "HRA")
    name = _vectors(leaves)
    return {"hra_u": leaves[name].detach().T}, {"r": leaves[name].shape[0], "apply_GS": name == "U_gs"}


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    rs = {layer.path: f["r"] for layer, f in zip(layers, facts)}
    if len(set(rs.values())) > 1:
        raise ValueError(
            f"save_peft: peft's HRA has one r for all layers (no rank_pattern), but these HRA layers "
            f"have ranks {sorted(set(rs.values()))} (e.g. {next(iter(rs.items()))})"
        )
    gs = {layer.path: f["apply_GS"] for layer, f in zip(layers, facts)}
    if len(set(gs.values())) > 1:
        forms = {p for p, v in gs.items() if v}
        raise ValueError(
            f"save_peft: peft's HRA has one apply_GS for all layers, but {sorted(forms)[:3]} are in the Gram–Schmidt "
            f"form (leaf U_gs) and {sorted(set(gs) - forms)[:3]} are not (leaf U); save the two groups to separate "
            f"directories"
        )
    return {
        "exclude_modules": None,
        "r": next(iter(rs.values())),
        "apply_GS": next(iter(gs.values())),
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_HRA = PeftFormat(
    peft_type="HRA",
    suffixes=("hra_u",),
    fields=frozenset({"r", "apply_GS", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "bias"}),
    ignores=frozenset({"init_weights"}),  # the file overrides the initial values
    refuses_kinds={"Conv1D": _LINEAR_ONLY},
    kinds=frozenset({"nn.Linear", "Conv1D", "Conv", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt"}),
    check=_peft_check,
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_HRA,
    claims=lambda cfg, path: True,
    tensors=lambda cfg, layer: ("hra_u",),
    read=_peft_read,
    write=_peft_write,
)
