"""HRA — Yuan et al. 2024, arXiv 2405.17484 (Householder reflection adaptation).

    H_i = I − 2 u_i u_iᵀ / ‖u_i‖²,    R = H_0 H_1 ⋯ H_{r−1}    (d_in × d_in, orthogonal; never built)
    y = x (W R)ᵀ + b = (x H_{r−1} ⋯ H_0) Wᵀ + b                  (peft: new_weight = W @ R)

    U (r, d_in): row i is u_i;  trainable.
        init (peft): r/2 vectors ~ kaiming-uniform(a=√5) of peft's (d_in, r/2) tensor, whose fan-in
        is r/2, so U(±1/√(r/2)); each vector repeated twice in a row (u_0 = u_1, u_2 = u_3, …).

Identity at init: H_{2k} H_{2k+1} = H² = I for each repeated pair, so R = I (up to rounding).
The reflections act on x in compact UT form (linalg.householder_chain): x − ((x Û) T⁻ᵀ) Ûᵀ,
two rank-r products per token, O(r·d_in), instead of r sequential passes over x.
Odd r is rejected: peft warns and falls back to a random (non-identity) init; here it is an error.
r > d_in is rejected: any d_in × d_in orthogonal matrix is a product of at most d_in reflections.
Not here: peft's apply_GS=True (Gram-Schmidt). It gives R = I − 2QQᵀ (Q the orthonormalised u's),
which is never the identity; with peft's paired init the second vector of each pair orthogonalises
to exactly zero and peft returns NaN, so there is no identity init to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch
from einops import repeat
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter
from . import _padding

__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "HRAConfig",
    "apply",
    "init",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "hra"
TRAINABLE = frozenset({"U"})  # leaves an optimizer updates


@dataclass(frozen=True)
class HRAConfig:
    r: int = 8
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        if self.r % 2:
            use = f"r={self.r + 1} or r={self.r - 1}" if self.r > 1 else "r=2"
            raise ValueError(
                f"{who}: r={self.r} must be even for HRA's identity init (pairs of equal reflections cancel); use {use}"
            )


Config = HRAConfig


def init(key: _keys.Key, W: Tensor, cfg: HRAConfig, statistic=None) -> dict[str, Tensor]:
    d_out, d_in = _checks.check_weight(W, "hra.init")
    if cfg.r > d_in:
        raise ValueError(
            f"hra.init: r={cfg.r} exceeds d_in={d_in} for W of shape ({d_out}, {d_in}); "
            f"more than d_in reflections add nothing, use an even r <= {d_in - d_in % 2}"
        )
    half = linalg.kaiming_uniform(_keys.generator(key), (cfg.r // 2, d_in), fan_in=cfg.r // 2)
    U = repeat(half, "k i -> (k two) i", two=2)  # (r, d_in): u_0 = u_1, u_2 = u_3, …
    return {"U": U.to(dtype=W.dtype, device=W.device).requires_grad_(True)}


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); the number of reflections r is read from U."""
    r = leaves["U"][0] if len(leaves.get("U", ())) == 2 else 0
    return {"U": (r, d_in)}


def pad(path: str, present: dict, K: int, own) -> NoReturn:
    """lf.stack(pad=True) cannot pad HRA: refused with the reason."""
    _padding.refuse(
        NAME,
        path,
        "HRA's reflections cannot be padded: a reflection of the zero vector is undefined "
        "(I − 2uuᵀ/‖u‖² at u = 0), and a pair of equal reflections is the identity only up to "
        "rounding; stack HRA adapters of equal r on equal target sets",
    )


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "hra.apply")
    return torch.nn.functional.linear(linalg.householder_chain(x, params["U"]), W, b)  # x Rᵀ Wᵀ + b


# ----------------------------------------------------------------------------- peft: the HRA type
# One tensor per targeted module, hra_u (d_in, r): the Householder vectors as columns (U = hra_uᵀ).
# peft's HRA has one r for the whole adapter (no rank_pattern).
_LINEAR_ONLY = "peft's HRA adapts torch.nn.Linear only"


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    u = layer.tensors["hra_u"]
    if u.ndim != 2:
        raise ValueError(f"{cfg.file!r}: {layer.path}.hra_u has shape {tuple(u.shape)}, expected (d_in, r)")
    cfg.rank(layer.path, u.shape[1], "hra_u")
    return {"U": u.T}


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    rs = {layer.path: f["r"] for layer, f in zip(layers, facts)}
    if len(set(rs.values())) > 1:
        raise ValueError(
            f"save_peft: peft's HRA has one r for all layers (no rank_pattern), but these HRA layers "
            f"have ranks {sorted(set(rs.values()))} (e.g. {next(iter(rs.items()))})"
        )
    return {
        "exclude_modules": None,
        "r": next(iter(rs.values())),
        "apply_GS": False,
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_HRA = PeftFormat(
    peft_type="HRA",
    suffixes=("hra_u",),
    fields=frozenset({"r", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "bias"}),
    ignores=frozenset({"init_weights"}),  # the file overrides the initial values
    refuses={"apply_GS": "lite_fn's HRA has no Gram-Schmidt form (see lite_fn/variants/hra.py); only apply_GS=false loads"},
    refuses_kinds={"Conv1D": _LINEAR_ONLY},
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_HRA,
    claims=lambda cfg, path: True,
    tensors=lambda cfg, layer: ("hra_u",),
    read=_peft_read,
    write=lambda leaves, layer: ({"hra_u": leaves["U"].detach().T}, {"r": leaves["U"].shape[0]}),
)
