"""DeLoRA — Bini et al. 2025, arXiv 2503.18225 (decoupled low-rank adaptation).

    h = (x ⊙ w) Aᵀ                                                         (..., r)
    h ← h ⊙ (λ / r) / (max(‖A_i‖, 1e-4) · max(‖B_{:,i}‖, 1e-4))             per rank component i
    y = x Wᵀ + b + h Bᵀ
    i.e. ΔW = (λ/r) Σ_i (B_{:,i}/‖B_{:,i}‖)(A_i/‖A_i‖)ᵀ · diag(w):  the direction is learned, the
    strength is bounded by λ (‖ΔW‖_F ≤ |λ| · max_i w_i).

    A (r, d_in)  ~ kaiming-uniform(a=√5) = U(±1/√d_in)  (peft);   trainable
    B (d_out, r) = 0;                                               trainable
    lam ()       = λ (peft default 15);                             trainable
    wnorm (d_in,) = w = ‖W[:, i]‖₂, the column norms of W;          frozen

Identity at init: B = 0. Gradients flow through the norms ‖A_i‖, ‖B_{:,i}‖ (not detached), as in
peft's DeloraLinear.forward; r in λ/r is A's row count. λ₀ = 0 is rejected: the output would be the
identity, but every gradient would be zero (B's is scaled by λ, A's and λ's by B = 0), so training
could never start (SPEC §4). Not here: peft's module_dropout.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter
from . import _padding

__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "DeLoRAConfig",
    "apply",
    "init",
    "merged",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "delora"
TRAINABLE = frozenset({"A", "B", "lam"})  # leaves an optimizer updates


@dataclass(frozen=True)
class DeLoRAConfig:
    r: int = 8
    lam: float = 15.0  # peft: delora_lambda
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("lam", self.lam, who)
        if self.lam == 0:
            raise ValueError(
                f"{who}: lam={self.lam!r} would make every gradient zero at init (B = 0 and the B gradient is "
                f"scaled by lam), so training never starts; use a nonzero lam such as peft's lam=15.0"
            )


Config = DeLoRAConfig


def init(key: _keys.Key, W: Tensor, cfg: DeLoRAConfig, statistic=None) -> dict[str, Tensor]:
    d_out, d_in = _checks.check_weight(W, "delora.init")
    _checks.check_rank(cfg.r, d_out, d_in, "delora.init")
    A = linalg.kaiming_uniform(_keys.generator(key), (cfg.r, d_in), fan_in=d_in)
    opts = _checks.like(W)
    return {
        "A": A.to(**opts).requires_grad_(True),
        "B": torch.zeros(d_out, cfg.r, **opts).requires_grad_(True),
        "lam": torch.tensor(cfg.lam, **opts).requires_grad_(True),
        "wnorm": linalg.col_norm(W.detach()),
    }


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); the rank r is read from A."""
    r = leaves["A"][0] if len(leaves.get("A", ())) == 2 else 0
    return {"A": (r, d_in), "B": (d_out, r), "lam": (), "wnorm": (d_in,)}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank rows/columns, with λ rescaled to λ·r'/r (λ/r counts rows; zero
    rows contribute 0/clamp = 0); no adapter here: zero factors."""
    out = _padding.lowrank(NAME, path, present, K, {"A": 0, "B": 1})
    R = out[min(present)]["A"].shape[0]
    for k, leaves in present.items():
        if leaves["A"].shape[0] != R:
            out[k]["lam"] = leaves["lam"].detach() * (R / leaves["A"].shape[0])
    return out


def _gains(params: dict[str, Tensor]) -> Tensor:
    """(λ/r) / (max(‖A_i‖, 1e-4) · max(‖B_{:,i}‖, 1e-4)) per rank component i, (r,); not detached (as peft)."""
    A, B = params["A"], params["B"]
    A_norm = linalg.row_norm(A).clamp_min(1e-4)  # (r,)  ‖A_i‖
    B_norm = linalg.col_norm(B).clamp_min(1e-4)  # (r,)  ‖B_{:,i}‖
    return (params["lam"] / A.shape[-2]) / (A_norm * B_norm)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "delora.apply")
    # (x ⊙ ‖W‖_col) Aᵀ computed as x (A ⊙ ‖W‖_col)ᵀ: the scaling touches r × d_in numbers, not every token
    h = torch.nn.functional.linear(x, params["A"] * params["wnorm"]) * _gains(params)
    return linalg.linear_add(x, W, b, h, params["B"])


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W + B diag(g) (A ⊙ w), b), g = ``_gains``: apply's layer as one dense weight (the bias passes through)."""
    return W + (params["B"] * _gains(params)) @ (params["A"] * params["wnorm"]), b


# ----------------------------------------------------------------------------- peft: the DELORA type
# Tensors per targeted module: delora_A (r, d_in), delora_B (d_out, r), delora_lambda (1,), delora_w_norm
# (d_in,) = A, B, lam (), wnorm. Per-layer rank: rank_pattern.
_TENSORS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    t = layer.tensors
    A, lam = t["delora_A"], t["delora_lambda"]
    if A.ndim != 2:
        raise ValueError(f"{cfg.file!r}: {layer.path}.delora_A has shape {tuple(A.shape)}, expected (r, d_in)")
    cfg.rank(layer.path, A.shape[0], "delora_A")
    if lam.numel() != 1:
        raise ValueError(f"{cfg.file!r}: {layer.path}.delora_lambda has shape {tuple(lam.shape)}, expected (1,)")
    return {"A": A, "B": t["delora_B"], "lam": lam.reshape(()), "wnorm": t["delora_w_norm"]}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    tensors = {
        "delora_A": leaves["A"].detach(),
        "delora_B": leaves["B"].detach(),
        "delora_lambda": leaves["lam"].detach().reshape(1),
        "delora_w_norm": leaves["wnorm"].detach(),
    }
    return tensors, {"r": leaves["A"].shape[0], "lam": float(leaves["lam"].detach())}


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    ranks = {layer.path: f["r"] for layer, f in zip(layers, facts)}
    r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "exclude_modules": None,
        "r": r,
        "rank_pattern": writer.pattern(ranks, r),
        "delora_lambda": Counter(writer.number(f["lam"]) for f in facts).most_common(1)[0][0],
        "lambda_pattern": {},
        "module_dropout": 0.0,
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_DELORA = PeftFormat(
    peft_type="DELORA",
    suffixes=_TENSORS,
    fields=frozenset({"r", "rank_pattern", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "bias"}),
    # initial values the file overrides, and dropout (training only)
    ignores=frozenset({"init_weights", "delora_lambda", "lambda_pattern", "module_dropout"}),
    refuses_kinds={"Conv1D": "peft's DELORA adapts torch.nn.Linear only"},
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_DELORA, claims=lambda cfg, path: True, tensors=lambda cfg, layer: _TENSORS, read=_peft_read, write=_peft_write
)
