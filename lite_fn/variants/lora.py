"""LoRA — Hu et al. 2021, arXiv 2106.09685 (rsLoRA: Kalajdzievski 2023, arXiv 2312.03732).

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,      s = alpha / r   (rsLoRA: s = alpha / √r)

    A (r, d_in)  ~ kaiming-uniform(a=√5) = U(±1/√d_in)  (peft default), or N(0, 1/r²)
                   with init="gaussian" (peft: normal_(std=1/r));  trainable
    B (d_out, r) = 0;                                                 trainable
    scale ()     = s;                                                 frozen leaf
    dropout ()   = p, only when p > 0;                                frozen leaf
    bias (d_out,) = 0, only with lora_bias=True (peft's lora_B.bias); trainable

With lora_bias (peft's LoraConfig(lora_bias=True): lora_B is an nn.Linear with a bias, scaled with it):
    y = x Wᵀ + b + s · ((x Aᵀ) Bᵀ + bias)
so a merged layer has W' = W + s·BA and b' = b + s·bias; a layer without a bias of its own has no place for
s·bias, and merging it is refused (as in peft; ``lf.call`` adds it all the same, as peft's forward does).

Identity at init: B = 0 (and bias = 0).
Dropout (peft's lora_dropout) acts on the adapter branch's input only, inverted:
    y = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ,   x̃ = x ⊙ [u ≥ p] / (1 − p)
with u the uniform ``noise`` (same shape as x) that the runtime derives from an explicit key
(``lf.call(..., key=k)``); no noise, no dropout, bit for bit. The bias is not dropped (it is lora_B's own).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter
from . import _arithmetic, _padding

__all__ = [
    "MERGE",
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "LoRAConfig",
    "apply",
    "apply_runs",
    "init",
    "merged",
    "pad",
    "shapes",
]  # the variant contract; other names are shared helpers
NAME = "lora"
TRAINABLE = frozenset({"A", "B", "bias"})  # leaves an optimizer updates
MERGE = _arithmetic.LOWRANK  # adapter arithmetic (merge_adapters): all of peft's combination types


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    init: str = "kaiming"  # "kaiming" (peft default) | "gaussian"
    dropout: float = 0.0  # peft's lora_dropout, on the adapter input; active only with lf.call(..., key=k)
    lora_bias: bool = False  # peft's lora_bias: a trainable bias on lora_B (leaf "bias", zero at init)
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("alpha", self.alpha, who)
        _checks.one_of("init", self.init, {"kaiming", "gaussian"}, who)
        check_dropout(self.dropout, who)
        if not isinstance(self.lora_bias, bool):
            raise ValueError(f"{who}: lora_bias={self.lora_bias!r} must be True or False")

    @property
    def scale(self) -> float:
        return scaling(self.alpha, self.r, self.use_rslora)


Config = LoRAConfig


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / √r with rsLoRA — the scale every LoRA-family config exposes."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def check_dropout(p, who: str) -> None:
    _checks.finite_number("dropout", p, who)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: dropout={p!r} must be in [0, 1) (the probability of dropping an input feature, e.g. 0.1)")


def dropout_leaf(cfg, opts: dict) -> dict[str, Tensor]:
    """{"dropout": p} when the config drops (p > 0), else nothing: params without it never drop."""
    p = getattr(cfg, "dropout", 0.0)
    return {"dropout": torch.tensor(float(p), **opts)} if p > 0 else {}


def dropped(params: dict[str, Tensor], x: Tensor, noise: Tensor | None) -> Tensor:
    """x̃ = x ⊙ [u ≥ p] / (1 − p) with u = ``noise``; x itself without noise or without a dropout leaf."""
    if noise is None or "dropout" not in params:
        return x
    p = params["dropout"]
    return torch.where(noise >= p, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


def init_factors(key: _keys.Key, W: Tensor, cfg, who: str) -> dict[str, Tensor]:
    """A (random), B (zero), scale, and bias (zero) with lora_bias: shared by LoRA and DoRA."""
    d_out, d_in = _checks.check_weight(W, who)
    _checks.check_rank(cfg.r, d_out, d_in, who)
    gen = _keys.generator(key)
    if getattr(cfg, "init", "kaiming") == "gaussian":
        A = torch.randn((cfg.r, d_in), generator=gen) / cfg.r
    else:
        A = linalg.kaiming_uniform(gen, (cfg.r, d_in), fan_in=d_in)
    opts = _checks.like(W)
    return {
        "A": A.to(**opts).requires_grad_(True),
        "B": torch.zeros(d_out, cfg.r, **opts).requires_grad_(True),
        "scale": torch.tensor(cfg.scale, **opts),
        **dropout_leaf(cfg, opts),
        **({"bias": torch.zeros(d_out, **opts).requires_grad_(True)} if getattr(cfg, "lora_bias", False) else {}),
    }


def init(key: _keys.Key, W: Tensor, cfg: LoRAConfig, statistic=None) -> dict[str, Tensor]:
    return init_factors(key, W, cfg, "lora.init")


def projected(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """s · x Aᵀ, (..., d_in) -> (..., r): the scale applied on the r-wide h, not the d_out-wide output."""
    return torch.nn.functional.linear(x, params["A"]) * params["scale"]


def delta(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """s · (x Aᵀ) Bᵀ — the low-rank branch alone, (..., d_in) -> (..., d_out)."""
    return torch.nn.functional.linear(projected(params, x), params["B"])


def linear_delta(x: Tensor, W: Tensor, b: Tensor | None, params: dict[str, Tensor], xd: Tensor) -> Tensor:
    """x Wᵀ + b + s · ((x̃ Aᵀ) Bᵀ + bias) with x̃ = ``xd`` (no bias leaf: no bias term): the layer's product and
    the low-rank branch, the second GEMM accumulated into the first (``linalg.linear_add``)."""
    y = linalg.linear_add(x, W, b, projected(params, xd), params["B"])
    # added after the GEMMs, not folded into b: a quantized layer's product is its own call's output only with its own b
    return y + params["scale"] * params["bias"] if "bias" in params else y


def apply_runs(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    """K adapters on K equal runs of rows at once (a routed call's fast path): every leaf has a
    leading axis K, x is (K, m..., d_in) -> (K, m..., d_out); equal to ``vmap(apply)`` over that axis.
    One GEMM for the base over all rows, one batched GEMM for x Aᵀ, and the K products with B
    accumulated into the base output by one in-place ``baddbmm_``. No dropout (the runtime vmaps
    ``apply`` when a key is given)."""
    K = x.shape[0]
    h = torch.bmm(x.reshape(K, -1, x.shape[-1]), params["A"].mT) * params["scale"].view(K, 1, 1)  # (K, rows, r)
    y = linalg.add_product(torch.nn.functional.linear(x, W, b), h.view(*x.shape[:-1], -1), params["B"])
    if "bias" in params:  # s_k · bias_k on run k: (K, 1…, d_out)
        y = y + (params["scale"].view(K, 1) * params["bias"]).view(K, *([1] * (x.ndim - 2)), -1)
    return y


def factor_shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """A, B, scale (and dropout when given) for W of (d_out, d_in): the leaves every LoRA-family variant holds."""
    r = leaves["A"][0] if len(leaves.get("A", ())) == 2 else 0
    return {"A": (r, d_in), "B": (d_out, r), "scale": (), **({"dropout": ()} if "dropout" in leaves else {})}


_OWN_LEAVES = frozenset({"A", "B", "scale", "dropout", "bias"})


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); the rank r is read from A; bias (d_out,) when given.

    The bias is offered only to leaves that are LoRA's own: a variant that extends these shapes with leaves
    of its own (PiSSA's A0/B0) and applies them without ``linear_delta`` then refuses a stray bias as an
    unexpected leaf instead of ignoring it. (EVA holds exactly LoRA's leaves and runs ``linear_delta``: a bias
    leaf there computes LoRA's math.)"""
    out = factor_shapes(leaves, d_out, d_in)
    if "bias" in leaves and leaves.keys() <= _OWN_LEAVES:
        out["bias"] = (d_out,)
    return out


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank rows of A / columns of B; no adapter here: zero factors. When some
    adapters have a lora_bias here, the others get a zero bias (their output is unchanged)."""
    if any("bias" in leaves for leaves in present.values()):
        present = {k: {**v, "bias": v["bias"] if "bias" in v else v["B"].new_zeros(v["B"].shape[0])} for k, v in present.items()}
    return _padding.lowrank(NAME, path, present, K, {"A": 0, "B": 1}, zero={"A", "B", "bias"})


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W + s·BA, b + s·bias): the dense layer ``apply`` computes (peft's merge: ``get_delta_weight`` and, with
    lora_bias, base bias += s·lora_B.bias).

    Raises:
        ValueError: a bias leaf on a layer without a bias of its own (the merged layer has no bias to carry it;
        peft refuses the same merge).
    """
    s = params["scale"]
    W_new = W + s * (params["B"] @ params["A"])
    if "bias" not in params:
        return W_new, b
    if b is None:
        raise ValueError(
            f"lora: a layer with weight {tuple(W.shape)} and no bias has a lora_bias leaf 'bias': its merged form "
            f"needs b' = s·bias, but the layer has no bias parameter to carry it (functional_call cannot add one; "
            f"peft refuses this merge too: 'the base layer has no bias'). Use lf.call / lf.applied, which add it, "
            f"or give the layer a zero bias (e.g. nn.Linear(..., bias=True) with bias.zero_()) before merging"
        )
    return W_new, b + s * params["bias"]


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "lora.apply")
    return linear_delta(x, W, b, params, dropped(params, x, noise))


# ----------------------------------------------------------------------------- peft: the LORA type
# peft's adapter_config.json for LoRA and the variants it stores as LoRA (dora, pissa, eva, antipasto).
# Tensors per targeted module (W is d_out × d_in): lora_A.weight (r, d_in), lora_B.weight (d_out, r);
# with use_dora also lora_magnitude_vector (d_out,); with lora_bias also lora_B.bias (d_out,), on every layer
# (one flag per adapter). Per-layer rank and alpha: rank_pattern / alpha_pattern.
#
# init_lora_weights is plain LoRA on disk, but two inits change the base inside from_pretrained: "pissa"
# and "olora" re-run on the model given and subtract s·B₀A₀ from its weights; such layers load as lite_fn's
# pissa variant (its codec). EVA, LoRA-GA, MiCA, orthogonal and gaussian leave the base alone: plain LoRA.
_PLAIN_INITS = (True, False, "orthogonal", "eva", "lora_ga")  # compared as peft's LoraLayer.update_layer does
_PLAIN_INITS_ANY_CASE = ("gaussian", "mica")
_RESIDUAL_INITS = ("pissa", "olora")
_REFUSED_INITS = {
    "pissa_niter": "peft's randomized SVD redraws its random sketch at every load (from torch's global RNG), so "
    "even peft does not reproduce the trained model; convert the adapter with peft's "
    "save_pretrained(path_initial_model_for_weight_conversion=...) to a plain LoRA",
    "corda": "peft itself cannot load it without running preprocess_corda on data; convert the adapter with "
    "save_pretrained(path_initial_model_for_weight_conversion=...) to a plain LoRA",
    "loftq": "peft replaces the base weights by quantized ones at load; load the adapter onto the LoftQ base "
    "with init_lora_weights set to true instead",
}


def peft_init(cfg: PeftConfig) -> str:
    """'plain' or 'residual' (pissa / olora: the pissa codec reads those layers) for the config's
    init_lora_weights, or a ValueError naming it."""
    init, where = cfg.get("init_lora_weights", True), cfg.where
    if any(init is v or (isinstance(init, str) and init == v) for v in _PLAIN_INITS) or (
        isinstance(init, str) and init.lower() in _PLAIN_INITS_ANY_CASE
    ):
        return "plain"
    if init == "pissa" or (isinstance(init, str) and init.lower() == "olora"):
        if cfg.get("use_dora"):
            raise ValueError(
                f"{where} sets use_dora=True with init_lora_weights={init!r}: peft's DoRA then takes its norm "
                f"from the residual base weight, which lite_fn's DoRA (on the shared base) cannot; "
                f"only use_dora with a plain init loads"
            )
        return "residual"
    key = next((k for k in _REFUSED_INITS if isinstance(init, str) and init.lower().startswith(k)), None)
    reason = _REFUSED_INITS[key] if key else f"lite_fn knows {list(_PLAIN_INITS + _PLAIN_INITS_ANY_CASE + _RESIDUAL_INITS)}"
    raise ValueError(f"{where} sets init_lora_weights={init!r}, which lite_fn cannot reproduce: {reason}")


def _peft_check(cfg: PeftConfig) -> str:
    """``peft_init``, after refusing lora_bias where peft's LoraConfig refuses it (with DoRA; with an init other
    than true / false: the residual inits' codec and lite_fn's DoRA have no bias leaf)."""
    lora_bias, where = cfg.get("lora_bias", False), cfg.where
    if not isinstance(lora_bias, bool):
        raise ValueError(f"{where} sets lora_bias={lora_bias!r}; expected true or false")
    if lora_bias and cfg.get("use_dora"):
        raise ValueError(
            f"{where} sets lora_bias=True with use_dora=True, which peft itself refuses ('lora_bias=True is not "
            f"supported for DoRA') and lite_fn's DoRA has no bias leaf for; only one of them loads"
        )
    init = cfg.get("init_lora_weights", True)
    if lora_bias and init is not True and init is not False:
        raise ValueError(
            f"{where} sets lora_bias=True with init_lora_weights={init!r}, which peft itself refuses (lora_bias=True "
            f"is only supported with init_lora_weights=True or False); only those load with lora_bias"
        )
    return peft_init(cfg)


def peft_factors(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    """A, B and scale of one layer of a peft LORA file (what lora, dora and pissa read)."""
    A, B = layer.tensors["lora_A.weight"], layer.tensors["lora_B.weight"]
    if A.ndim != 2:
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.lora_A.weight has shape {tuple(A.shape)}; lite_fn adapts linear layers "
            f"only (a 4-D factor is a Conv2d LoRA)"
        )
    r = cfg.rank(layer.path, A.shape[0], "lora_A.weight")
    alpha = cfg.per_path("alpha_pattern", "lora_alpha", 8, layer.path)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg.where}: lora_alpha / alpha_pattern gives {alpha!r} for {layer.path!r}; expected a number")
    s = scaling(alpha, r, bool(cfg.get("use_rslora")))
    return {"A": A, "B": B, "scale": torch.tensor(s, dtype=torch.float64)}  # cast once, to the weight dtype


def peft_lowrank(A: Tensor, B: Tensor, s: float, path: str, **facts) -> tuple[dict[str, Tensor], dict]:
    """The LORA tensors of the update s·BA (what every variant written as LoRA hands the format)."""
    if not math.isfinite(s):
        raise ValueError(f"save_peft: {path!r} has scale {s}; peft's LoRA needs a finite scale")
    return {"lora_A.weight": A.detach(), "lora_B.weight": B.detach()}, {"r": A.shape[0], "scale": s, **facts}


def _peft_tensors(cfg: PeftConfig, layer: PeftLayer) -> tuple[str, ...]:
    return ("lora_A.weight", "lora_B.weight", *(("lora_B.bias",) if cfg.get("lora_bias") else ()))


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    leaves = peft_factors(cfg, layer)
    return {**leaves, "bias": layer.tensors["lora_B.bias"]} if cfg.get("lora_bias") else leaves


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    tensors, facts = peft_lowrank(leaves["A"], leaves["B"], float(leaves["scale"]), layer.path)
    if "bias" not in leaves:
        return tensors, facts
    return {**tensors, "lora_B.bias": leaves["bias"].detach()}, {**facts, "lora_bias": True}


def _lora_bias(layers: list[PeftLayer], facts: list[dict]) -> bool:
    """peft's lora_bias (one flag for the whole adapter): whether the layers carry a lora_B bias — all or none."""
    biased = [layer.path for layer, f in zip(layers, facts) if f.get("lora_bias")]
    if biased and len(biased) < len(layers):
        plain = [layer.path for layer, f in zip(layers, facts) if not f.get("lora_bias")]
        raise ValueError(
            f"save_peft: peft's lora_bias is one flag for the whole adapter, but {biased[:3]} have a lora_B bias "
            f"(leaf 'bias') and {plain[:3]} do not; give the LoRA layers among those a zero bias "
            f"(params[path]['lora']['bias'] = torch.zeros(d_out), which changes nothing) or save the two groups "
            f"to separate directories"
        )
    return bool(biased)


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    paths = [layer.path for layer in layers]
    ranks = {p: f["r"] for p, f in zip(paths, facts)}
    # alpha = s·r, or s·√r with use_rslora: whichever needs fewer alpha_pattern entries
    plain = {p: writer.number(f["scale"] * f["r"]) for p, f in zip(paths, facts)}
    rs = {p: writer.number(f["scale"] * math.sqrt(f["r"])) for p, f in zip(paths, facts)}
    use_rslora = len(set(rs.values())) < len(set(plain.values()))
    alphas = rs if use_rslora else plain
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "exclude_modules": None,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "use_dora": any(f.get("use_dora", False) for f in facts),
        "fan_in_fan_out": any(layer.kind == "Conv1D" for layer in layers),
        "bias": "none",
        "lora_bias": _lora_bias(layers, facts),
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "rank_pattern": writer.pattern(ranks, r),
        "alpha_pattern": writer.pattern(alphas, alpha),
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_LORA = PeftFormat(
    peft_type="LORA",
    suffixes=("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_magnitude_vector.weight"),
    aliases={"lora_magnitude_vector.weight": "lora_magnitude_vector"},
    fields=frozenset(
        {
            "r",
            "lora_alpha",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
            "use_rslora",
            "use_dora",
            "init_lora_weights",
            "bias",
            "lora_bias",  # plain LoRA only (_peft_check)
            "fan_in_fan_out",  # peft sets it per layer from the layer type (Conv1D is fan-in-fan-out)
        }
    ),
    # training-only, or the configs of data-driven inits (the init itself is judged by init_lora_weights)
    ignores=frozenset(
        {
            "lora_dropout",
            "megatron_core",
            "qalora_group_size",
            "eva_config",
            "corda_config",
            "loftq_config",
            "lora_ga_config",
            "ensure_weight_tying",
            "runtime_config",
        }
    ),
    refuses={
        "trainable_token_indices": "trainable tokens replace rows of an embedding, which lite_fn does not adapt",
        "layer_replication": "it duplicates decoder layers, changing the model's structure",
        "target_parameters": "it adapts raw nn.Parameters (e.g. MoE experts), not linear layers",
        "alora_invocation_tokens": "activated LoRA switches the adapter on per token position",
        "use_qalora": "QALoRA pools the adapter input for quantized layers",
        "megatron_config": "Megatron-parallel layers are not nn.Linear",
        "arrow_config": "Arrow routes between adapters per token",
        "kasa_config": "KaSA adds a singular-value term to the forward",
        "velora_config": "VeLoRA changes the forward",
        "monteclora_config": "MonteCLoRA samples the adapter",
        "use_bdlora": "BD-LoRA uses block-diagonal factors",
    },
    check=_peft_check,
    config=_peft_config,
)

PEFT = PeftCodec(
    format=PEFT_LORA,
    claims=lambda cfg, path: not cfg.get("use_dora") and peft_init(cfg) == "plain",
    tensors=_peft_tensors,
    read=_peft_read,
    write=_peft_write,
)
