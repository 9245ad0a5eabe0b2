"""RoAd — Liao et al. 2024, arXiv 2409.00119 (peft: tuners/road).

    y  = x Wᵀ + b                                   (bias included: it is rotated too)
    y' = y ⊙ c₁ + rot_half(y) ⊙ c₂,    c₁ = α cos θ,  c₂ = α sin θ

Output features are split into groups of ``group_size`` (even, dividing d_out); inside a
group, element j of the first half pairs with element j of the second half, and
rot_half(y) = (−y_second, y_first) per group (paper eq. 4; peft's layout).

    theta, alpha (trainable), with G = d_out / group_size groups and h = group_size / 2:
      road_1  (G, 1, h)      one (θ, α) per pair, shared by both halves
      road_2  (G, 2, h)      one (θ, α) per output element
      road_4  (G, 2, 2, h)   [:, 0] gives c₁ = α cos θ, [:, 1] gives c₂ = α sin θ, per element
    Each is peft's flat road_theta / road_alpha in peft's element order, reshaped: copy with
    ``peft_tensor.reshape(leaf.shape)``. The shape tells apply the variant and group size.

Identity at init: θ = 0, α = 1 (so c₁ = 1, c₂ = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter, never_random
from . import _padding

# the variant contract; other names are shared helpers
__all__ = ["NAME", "PEFT", "TRAINABLE", "Config", "ROADConfig", "apply", "init", "merged", "pad", "random_init", "shapes"]
NAME = "road"
TRAINABLE = frozenset({"theta", "alpha"})  # leaves an optimizer updates

random_init = never_random  # init draws no random numbers


VARIANTS = ("road_1", "road_2", "road_4")


@dataclass(frozen=True)
class ROADConfig:
    variant: str = "road_1"
    group_size: int = 64
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.one_of("variant", self.variant, set(VARIANTS), who)
        _checks.positive_int("group_size", self.group_size, who)
        if self.group_size % 2:
            lower = self.group_size - 1
            hint = f"group_size={lower} or {lower + 2}" if lower else "group_size=2"
            raise ValueError(
                f"{who}: group_size={self.group_size} must be even (each group pairs its first half "
                f"with its second half); use {hint}"
            )


Config = ROADConfig


def _check_groups(d_out: int, group_size: int, who: str) -> None:
    if d_out % group_size == 0:
        return
    if d_out % 2:
        raise ValueError(
            f"{who}: d_out={d_out} is odd, so no even group_size={group_size} divides it; "
            "RoAd rotates output features in pairs and needs an even d_out"
        )
    valid = max(g for g in range(2, min(group_size, d_out) + 1, 2) if d_out % g == 0)
    raise ValueError(
        f"{who}: group_size={group_size} does not divide d_out={d_out}; use an even divisor of {d_out}, e.g. group_size={valid}"
    )


def init(key: _keys.Key, W: Tensor, cfg: ROADConfig, statistic=None) -> dict[str, Tensor]:
    d_out, _ = _checks.check_weight(W, "road.init")
    _check_groups(d_out, cfg.group_size, "road.init")
    G, h = d_out // cfg.group_size, cfg.group_size // 2
    shape = {"road_1": (G, 1, h), "road_2": (G, 2, h), "road_4": (G, 2, 2, h)}[cfg.variant]
    opts = _checks.like(W)
    return {
        "theta": torch.zeros(shape, **opts).requires_grad_(True),
        "alpha": torch.ones(shape, **opts).requires_grad_(True),
    }


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): theta's form (road_1/2/4, group size) is read
    from theta itself and must cover d_out; alpha has theta's shape."""
    t = leaves.get("theta", ())
    forms = {3: {1: "road_1", 2: "road_2"}, 4: {2: "road_4"}}
    if len(t) not in forms or t[1] not in forms[len(t)] or (len(t) == 4 and t[2] != 2) or 2 * t[0] * t[-1] != d_out:
        raise ValueError(
            f"theta of shape {t} is not a RoAd layout for d_out={d_out}; expected (G, 1, h) (road_1), "
            f"(G, 2, h) (road_2) or (G, 2, 2, h) (road_4) with 2·G·h = d_out (d_out must be even)"
        )
    return {"theta": t, "alpha": t}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): one group size; forms lifted exactly to the largest (road_1 → road_2 →
    road_4); an adapter that does not target the layer gets θ = 0, α = 1."""
    _padding.same_leaf_names(NAME, path, present)
    groups = {k: (v["theta"].shape[0], v["theta"].shape[-1]) for k, v in present.items()}
    if len(set(groups.values())) > 1:
        _padding.refuse(
            NAME,
            path,
            "the adapters use different group sizes there ("
            + ", ".join(f"adapter {k}: group_size={2 * h}" for k, (_, h) in groups.items())
            + "), which pair different output features",
        )
    G, h = next(iter(groups.values()))
    ndim = max(v["theta"].ndim for v in present.values())
    rows = max(v["theta"].shape[1] for v in present.values() if v["theta"].ndim == 3) if ndim == 3 else 2

    def lift(t: Tensor) -> Tensor:
        t = t.detach()
        if t.ndim == 3 and t.shape[1] == 1 and (ndim == 4 or rows == 2):
            t = t.expand(G, 2, h)  # road_1 → road_2: the pair's (θ, α) for both halves
        if t.ndim == 3 and ndim == 4:
            t = t.unsqueeze(1).expand(G, 2, 2, h)  # road_2 → road_4: the same (θ, α) for c₁ and c₂
        return t.contiguous()

    out = {k: {leaf: lift(v) for leaf, v in leaves.items()} for k, leaves in present.items()}
    like = out[min(present)]["theta"]
    for k in range(K):
        if k not in out:
            out[k] = {"theta": torch.zeros_like(like), "alpha": torch.ones_like(like)}
    return out


def _check_params(theta: Tensor, d_out: int, who: str) -> None:
    if 2 * theta.shape[0] * theta.shape[-1] != d_out:
        raise ValueError(
            f"{who}: theta of shape {tuple(theta.shape)} covers {2 * theta.shape[0] * theta.shape[-1]} "
            f"output features but W has d_out={d_out}; init the params from this W"
        )


def _rotate(params: dict[str, Tensor], y: Tensor) -> Tensor:
    """y' = y ⊙ c₁ + rot_half(y) ⊙ c₂ on the last axis of y (..., d_out): the rotation ``apply`` puts on the
    layer's output, and ``merged`` on W's columns and on b."""
    theta, alpha = params["theta"], params["alpha"]
    if theta.ndim == 4:  # road_4: separate (θ, α) for the two columns of each 2×2 block
        c1 = alpha[:, 0] * torch.cos(theta[:, 0])  # (g, s, h)
        c2 = alpha[:, 1] * torch.sin(theta[:, 1])
    else:  # road_1 (g, 1, h) broadcasts over the halves s; road_2 is (g, s, h)
        c1, c2 = alpha * torch.cos(theta), alpha * torch.sin(theta)
    # per group, the two halves y₀ = y_first, y₁ = y_second of the output:
    #   y'₀ = y₀ ⊙ c₁[0] − y₁ ⊙ c₂[0],   y'₁ = y₁ ⊙ c₁[1] + y₀ ⊙ c₂[1]
    # computed on views of y (autograd keeps only y for the gradients, no rot_half copy) and
    # stacked once into the output
    G, h = theta.shape[0], theta.shape[-1]
    c1, c2 = c1.expand(G, 2, h), c2.expand(G, 2, h)
    y = y.unflatten(-1, (G, 2, h))  # (..., g, s, h)
    y0, y1 = y[..., 0, :], y[..., 1, :]
    first = torch.addcmul(y0 * c1[:, 0], y1, c2[:, 0], value=-1.0)
    second = torch.addcmul(y1 * c1[:, 1], y0, c2[:, 1])
    return torch.stack((first, second), dim=-2).flatten(-3)


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "road.apply")
    _check_params(params["theta"], W.shape[0], "road.apply")
    return _rotate(params, torch.nn.functional.linear(x, W, b))  # the bias is rotated too


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(R W, R b): the output rotation R applied to W's rows — as ``_rotate`` on the columns of Wᵀ — and to b."""
    _check_params(params["theta"], W.shape[-2], "road.merged")
    return _rotate(params, W.mT).mT, (None if b is None else _rotate(params, b))


# ----------------------------------------------------------------------------- peft: the ROAD type
# road_theta and road_alpha per targeted module, flat in peft's order: theta, alpha reshaped to
# (G, 1, h) road_1, (G, 2, h) road_2, (G, 2, 2, h) road_4 (G = d_out / group_size, h = group_size / 2).
# peft's RoAd has one variant and group_size for the whole adapter.
_TENSORS = ("road_theta", "road_alpha")


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    variant, gs, d_out = cfg.get("variant", "road_1"), cfg.get("group_size", 64), layer.W.shape[0]
    if variant not in VARIANTS:
        raise ValueError(f"{cfg.where} sets variant={variant!r}; RoAd variants are road_1, road_2, road_4")
    if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 2 or d_out % gs:
        raise ValueError(
            f"{cfg.where} sets group_size={gs!r}, which does not split {layer.path!r} (d_out={d_out}) into even groups"
        )
    G, h = d_out // gs, gs // 2
    shape = {"road_1": (G, 1, h), "road_2": (G, 2, h), "road_4": (G, 2, 2, h)}[variant]
    for k in _TENSORS:
        if layer.tensors[k].numel() != math.prod(shape):
            raise ValueError(
                f"{cfg.file!r}: {layer.path}.{k} has {layer.tensors[k].numel()} entries, but {variant} with "
                f"group_size={gs} on d_out={d_out} has {math.prod(shape)}"
            )
    return {"theta": layer.tensors["road_theta"].reshape(shape), "alpha": layer.tensors["road_alpha"].reshape(shape)}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    t = leaves["theta"]
    variant = {3: {1: "road_1", 2: "road_2"}, 4: {2: "road_4"}}[t.ndim][t.shape[1]]
    tensors = {"road_theta": t.detach().reshape(-1), "road_alpha": leaves["alpha"].detach().reshape(-1)}
    return tensors, {"variant": variant, "group_size": 2 * t.shape[-1]}


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    forms = {layer.path: (f["variant"], f["group_size"]) for layer, f in zip(layers, facts)}
    if len(set(forms.values())) > 1:
        seen = {f: p for p, f in forms.items()}
        raise ValueError(
            "save_peft: peft's RoAd has one variant and group_size per adapter, but these layers use "
            + ", ".join(f"{v} group_size={g} (e.g. {p!r})" for (v, g), p in seen.items())
        )
    variant, gs = next(iter(forms.values()))
    return {"variant": variant, "group_size": gs}  # peft's RoadConfig has no exclude_modules


PEFT_ROAD = PeftFormat(
    peft_type="ROAD",
    suffixes=_TENSORS,
    fields=frozenset({"variant", "group_size", "target_modules"}),
    ignores=frozenset({"init_weights"}),  # the file overrides the initial values
    refuses_kinds={"Conv1D": "peft's ROAD adapts torch.nn.Linear only"},
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_ROAD, claims=lambda cfg, path: True, tensors=lambda cfg, layer: _TENSORS, read=_peft_read, write=_peft_write
)
