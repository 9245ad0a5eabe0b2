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
    _check_parameters(cfg)
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


# peft's tensors per layer kind. Linear kinds: lora_A.weight (r, d_in), lora_B.weight (d_out, r). Convolutions (peft's
# _ConvNd): lora_A.weight (r, in, *k) is a conv with the base's kernel, stride and padding, lora_B.weight (out, r, 1, …)
# a 1×1 conv, so conv(conv(x, A), B) = conv(x, B·A as (out, in, *k)): their flattened (r, in·∏k) and (out, r) are
# lite_fn's A and B on the conv's (out, in·∏k) view — exactly, for groups=1, no dilation and zero padding (others are
# refused: ``conv_refusal``). Embeddings: lora_embedding_A (r, num_embeddings), lora_embedding_B (embedding_dim, r),
# peft's F.embedding(ids, Aᵀ) Bᵀ = one_hot(ids) Aᵀ Bᵀ: lite_fn's A and B on the embedding's (dim, vocab) view Wᵀ.
LINEAR_KINDS = frozenset({"nn.Linear", "Conv1D", "bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt"})
_FACTOR_NAMES = {"Embedding": ("lora_embedding_A", "lora_embedding_B")}
_SHAPED_KINDS = frozenset({"Conv", "Embedding"})  # kinds whose peft factors are not the linear (r, d_in), (d_out, r)


def factor_names(layer: PeftLayer) -> tuple[str, str]:
    """The names of peft's LoRA factors A and B at ``layer`` (by its layer kind)."""
    return _FACTOR_NAMES.get(layer.kind, ("lora_A.weight", "lora_B.weight"))


def conv_refusal(module) -> str | None:
    """Why peft's conv LoRA at ``module`` is no update of its (out, in/groups·∏k) weight view, or None when it is."""
    k = tuple(module.kernel_size)
    if module.groups != 1:
        return (
            f"it has groups={module.groups}: peft's conv LoRA convolves all {module.in_channels} input channels in "
            f"lora_A and uses a grouped 1×1 lora_B, so its update connects channels across groups, which the grouped "
            f"convolution's own weight (out, in/groups, *k) cannot hold"
        )
    if any(d != 1 and n != 1 for d, n in zip(module.dilation, k)):
        return (
            f"it has dilation={tuple(module.dilation)}: peft builds lora_A with the base's kernel, stride and padding "
            f"but without its dilation, so its update is not a convolution with the base's geometry"
        )
    pads = module.padding != "valid" and (isinstance(module.padding, str) or any(module.padding))
    if module.padding_mode != "zeros" and pads:
        return (
            f"it has padding_mode={module.padding_mode!r}: peft's lora_A pads with zeros, the base layer with "
            f"{module.padding_mode!r}, so the update sees other inputs at the border than the weight it is added to"
        )
    return None


def _checked_conv(layer: PeftLayer, where: str) -> tuple[int, ...]:
    """The kernel size of a conv layer peft's LoRA adapts exactly (groups=1), else a ValueError naming why not."""
    why = conv_refusal(layer.module)
    if why is not None:
        raise ValueError(
            f"{where}: {layer.path!r} is a {type(layer.module).__name__} and lite_fn cannot reproduce peft's LoRA on "
            f"it: {why}. Exclude it from target_modules (or build the layer with groups=1, dilation=1, zero padding)"
        )
    return tuple(layer.stored[2:])


def peft_factors(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    """A, B and scale of one layer of a peft LORA file (what lora, dora and pissa read): conv factors flattened to
    lite_fn's (r, in·∏k) and (out, r)."""
    if layer.kind == PARAMETER_KIND:
        return _expert_factors(cfg, layer)
    a, b = factor_names(layer)
    A, B = layer.tensors[a], layer.tensors[b]
    if layer.kind == "Conv":  # (r, in, *k) and (out, r, 1, …); their sizes are checked against the model later
        k = _checked_conv(layer, cfg.where)
        ok = A.ndim == B.ndim == 2 + len(k) and B.shape[1] == A.shape[0] and all(n == 1 for n in B.shape[2:])
        want = f"(r, in_channels, *{k}) and (out_channels, r{', 1' * len(k)})"
    else:
        ok, want = A.ndim == B.ndim == 2, "(r, d_in) and (d_out, r)"
    if not ok:
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.{a} / .{b} have shapes {tuple(A.shape)} / {tuple(B.shape)}, but peft's LoRA "
            f"on this {layer.kind} layer ({type(layer.module).__name__}) stores {want}; the adapter does not belong "
            f"to this model"
        )
    r = cfg.rank(layer.path, A.shape[0], a)
    alpha = cfg.per_path("alpha_pattern", "lora_alpha", 8, layer.path)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg.where}: lora_alpha / alpha_pattern gives {alpha!r} for {layer.path!r}; expected a number")
    s = scaling(alpha, r, bool(cfg.get("use_rslora")))
    A, B = A.reshape(r, -1), B.reshape(B.shape[0], r)
    return {"A": A, "B": B, "scale": torch.tensor(s, dtype=torch.float64)}  # cast once, to the weight dtype


def peft_lowrank(A: Tensor, B: Tensor, s: float, layer: PeftLayer | str, **facts) -> tuple[dict[str, Tensor], dict]:
    """The LORA tensors of the update s·BA (what every variant written as LoRA hands the format), in the layout of
    ``layer``'s kind (conv-shaped factors, embedding names). Given only a path (a str), the linear layout: the
    format then refuses it on any other layer kind (``facts["layout"]``)."""
    path = layer if isinstance(layer, str) else layer.path
    if not math.isfinite(s):
        raise ValueError(f"save_peft: {path!r} has scale {s}; peft's LoRA needs a finite scale")
    A, B = A.detach(), B.detach()
    if isinstance(layer, str):
        return {"lora_A.weight": A, "lora_B.weight": B}, {"r": A.shape[0], "scale": s, "layout": "linear", **facts}
    if layer.kind == PARAMETER_KIND:
        return _expert_lowrank(A, B, s, layer, facts)
    if layer.kind == "Conv":
        k = _checked_conv(layer, "save_peft")
        A, B = A.reshape(A.shape[0], -1, *k), B.reshape(*B.shape, *(1,) * len(k))
    a, b = factor_names(layer)
    return {a: A, b: B}, {"r": A.shape[0], "scale": s, "layout": layer.kind, **facts}


def _peft_tensors(cfg: PeftConfig, layer: PeftLayer) -> tuple[str, ...]:
    base_bias = (BASE_BIAS,) if trains_base_bias(cfg, layer) else ()
    return (*factor_names(layer), *(("lora_B.bias",) if cfg.get("lora_bias") else ()), *base_bias)


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    leaves = peft_factors(cfg, layer)
    leaves = {**leaves, "bias": layer.tensors["lora_B.bias"]} if cfg.get("lora_bias") else leaves
    return _with_trained_bias(cfg, layer, leaves) if BASE_BIAS in layer.tensors else leaves


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    tensors, facts = peft_lowrank(leaves["A"], leaves["B"], one_scale(leaves["scale"], layer.path), layer)
    if "bias" not in leaves:
        return tensors, facts
    if layer.kind == "Embedding":
        raise ValueError(
            f"save_peft: {layer.path!r} is an embedding with a lora_bias leaf 'bias'; peft refuses lora_bias on "
            f"embeddings (its lora_embedding_B has no bias), so there is no peft file for it; drop the leaf or keep "
            f"this adapter in lite_fn's own format (lf.save)"
        )
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
    _check_parameter_layers(layers, facts)
    flat = [layer.path for layer, f in zip(layers, facts) if f.get("layout") == "linear" and layer.kind in _SHAPED_KINDS]
    if flat:
        raise ValueError(
            f"save_peft: {flat[:3]} are conv / embedding layers, but their variant's codec wrote its LoRA factors in the "
            f"linear layout (lora.peft_lowrank(..., layer.path)), which peft cannot load there; the codec must pass the "
            f"PeftLayer itself (lora.peft_lowrank(..., layer)) to get peft's conv shapes and embedding names"
        )
    paths = [layer.path for layer in layers]
    ranks = {p: f["r"] for p, f in zip(paths, facts)}
    # alpha = s·r, or s·√r with use_rslora: whichever needs fewer alpha_pattern entries; on a tie, whichever the
    # config's 7-digit numbers hold more exactly (rsLoRA's s = 3/√2 is alpha 3 with use_rslora, not alpha 4.242641)
    exact = {p: (f["scale"] * f["r"], f["scale"] * math.sqrt(f["r"])) for p, f in zip(paths, facts)}
    plain = {p: writer.number(a) for p, (a, _) in exact.items()}
    rs = {p: writer.number(a) for p, (_, a) in exact.items()}

    def cost(alphas: dict, i: int) -> tuple[int, float]:
        return len(set(alphas.values())), sum(abs(alphas[p] - e[i]) / max(abs(e[i]), 1e-30) for p, e in exact.items())

    use_rslora = cost(rs, 1) < cost(plain, 0)
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


# peft's target_parameters (LoRA on raw parameters, e.g. MoE experts' fused gate_up_proj (E, 2I, H)): one ParamWrapper
# per parameter, nested when a module has several (the room adds the "base_layer." prefixes of the nesting). Its tensors
# (tuners/lora/layer.py ParamWrapper): lora_A.weight (r·E, in), lora_B.weight (out, r·E); expert e's A_e is rows
# e·r … e·r+r−1 of lora_A, its B_e the columns j·E + e (j < r) of lora_B (peft views lora_B as (out, r, E)), and
# ΔW_e = s·B_e A_e. A 3-D parameter is (E, out, in) to peft unless its module says is_transposed ((E, in, out));
# a 2-D one is (out, in). lite_fn's view is always (E, shape[1], shape[2]), so on a transposed parameter lite_fn's
# A_e = peft's B_eᵀ and its B_e = peft's A_eᵀ (ΔW_e = s·A_eᵀB_eᵀ as stored). peft's ParamWrapper refuses DoRA,
# lora_bias, dropout and fan_in_fan_out; its residual inits (pissa, olora) need a weight the experts do not have.
PARAMETER_KIND = "parameter"  # lite_fn's layer kind of a raw parameter targeted by its path


def _check_parameters(cfg: PeftConfig) -> None:
    """target_parameters only with what peft's ParamWrapper computes: plain LoRA (no DoRA, lora_bias, residual init)."""
    names = cfg.get("target_parameters")
    if not names:
        return
    init = cfg.get("init_lora_weights", True)
    why = (
        "use_dora=True"
        if cfg.get("use_dora")
        else "lora_bias=True"
        if cfg.get("lora_bias")
        else f"init_lora_weights={init!r}"
        if isinstance(init, str) and init.lower() in _RESIDUAL_INITS
        else None
    )
    if why is not None:
        raise ValueError(
            f"{cfg.where} sets target_parameters={names!r} with {why}, which peft's ParamWrapper refuses (it adapts a "
            f"raw parameter with plain LoRA only); the file cannot come from peft"
        )


def _transposed(layer: PeftLayer) -> bool:
    """Whether peft reads this 3-D parameter as (E, in, out): its module says is_transposed (transformers' experts)."""
    return layer.W.ndim == 3 and bool(getattr(layer.module, "is_transposed", False))


def one_scale(scale: Tensor, path: str) -> float:
    """The scale of a layer's leaves as one number: a 3-D parameter's (E,) scales must all be equal (peft has one)."""
    if scale.ndim and bool((scale != scale.reshape(-1)[0]).any()):
        raise ValueError(
            f"save_peft: {path!r} has per-expert scales {scale.tolist()}; peft's LoRA on a parameter has one scale "
            f"(lora_alpha / r) for all its experts — give them one scale"
        )
    return float(scale.reshape(-1)[0])


def _expert_factors(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    """A (E, r, d_in), B (E, d_out, r), scale (E,) — or A (r, d_in), B (d_out, r), scale () on a 2-D parameter — from
    peft's ParamWrapper tensors (see above)."""
    A, B, W = layer.tensors["lora_A.weight"], layer.tensors["lora_B.weight"], layer.W
    E = W.shape[0] if W.ndim == 3 else 1
    flip = _transposed(layer)
    p_out, p_in = (W.shape[-1], W.shape[-2]) if flip else (W.shape[-2], W.shape[-1])
    rE = A.shape[0] if A.ndim == 2 else 0
    if A.ndim != 2 or rE % E or rE == 0 or tuple(A.shape) != (rE, p_in) or tuple(B.shape) != (p_out, rE):
        raise ValueError(
            f"{cfg.file!r}: {layer.path} lora_A.weight / lora_B.weight have shapes {tuple(A.shape)} / {tuple(B.shape)}, "
            f"but peft's LoRA on the parameter {layer.path!r} of shape {layer.stored} ({E} expert(s), in={p_in}, "
            f"out={p_out}) stores (r·{E}, {p_in}) and ({p_out}, r·{E}); the adapter does not belong to this model"
        )
    r = cfg.rank(layer.path, rE // E, "lora_A.weight")
    alpha = cfg.per_path("alpha_pattern", "lora_alpha", 8, layer.path)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg.where}: lora_alpha / alpha_pattern gives {alpha!r} for {layer.path!r}; expected a number")
    s = scaling(alpha, r, bool(cfg.get("use_rslora")))
    A_e = A.reshape(E, r, p_in)  # (E, r, in)
    B_e = B.reshape(p_out, r, E).permute(2, 0, 1)  # (E, out, r)
    if flip:  # stored (E, in, out): ΔW_e = s·A_eᵀ B_eᵀ
        A_e, B_e = B_e.mT, A_e.mT
    if W.ndim == 2:
        return {"A": A_e[0], "B": B_e[0], "scale": torch.tensor(s, dtype=torch.float64)}
    return {"A": A_e.contiguous(), "B": B_e.contiguous(), "scale": torch.full((E,), s, dtype=torch.float64)}


def _expert_lowrank(A: Tensor, B: Tensor, s: float, layer: PeftLayer, facts: dict) -> tuple[dict[str, Tensor], dict]:
    """peft's ParamWrapper tensors of the update s·B_e A_e on each expert (inverse of ``_expert_factors``)."""
    W = layer.W
    if W.ndim == 2:
        return {"lora_A.weight": A, "lora_B.weight": B}, {"r": A.shape[0], "scale": s, "layout": PARAMETER_KIND, **facts}
    E, d_out, d_in = W.shape
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != E or B.shape[0] != E or A.shape[1] != B.shape[2]:
        raise ValueError(
            f"save_peft: {layer.path!r} is a parameter of {E} experts, but its low-rank factors have shapes "
            f"{tuple(A.shape)} / {tuple(B.shape)}; peft's LoRA on it needs one rank-r pair per expert, A ({E}, r, "
            f"{d_in}) and B ({E}, {d_out}, r)"
        )
    r = A.shape[1]
    A_p, B_p = (B.mT, A.mT) if _transposed(layer) else (A, B)  # (E, r, in), (E, out, r) in peft's in / out
    lora_A = A_p.reshape(E * r, A_p.shape[-1])
    lora_B = B_p.permute(1, 2, 0).reshape(B_p.shape[1], r * E)  # column j·E + e
    return {"lora_A.weight": lora_A, "lora_B.weight": lora_B}, {"r": r, "scale": s, "layout": PARAMETER_KIND, **facts}


def _check_parameter_layers(layers: list[PeftLayer], facts: list[dict]) -> None:
    """A LORA file with parameter layers holds plain LoRA written in peft's ParamWrapper layout (see above)."""
    params = [layer.path for layer in layers if layer.kind == PARAMETER_KIND]
    if not params:
        return
    flat = [
        layer.path
        for layer, f in zip(layers, facts)
        if layer.kind == PARAMETER_KIND and layer.W.ndim == 3 and f.get("layout") != PARAMETER_KIND
    ]
    if flat:
        raise ValueError(
            f"save_peft: {flat[:3]} are 3-D parameters (one matrix per expert), but their variant's codec wrote one "
            f"pair of LoRA factors in the linear layout (lora.peft_lowrank(..., layer.path)); peft's LoRA on a "
            f"parameter has one pair per expert — the codec must pass the PeftLayer itself (lora.peft_lowrank(..., layer))"
        )
    odd = next((k for k in ("use_dora", "lora_bias") if any(f.get(k) for f in facts)), None)
    if odd is not None:
        raise ValueError(
            f"save_peft: {params[:3]} are raw parameters (peft's target_parameters), which peft adapts with plain LoRA "
            f"only (its ParamWrapper refuses {odd}), but this adapter needs {odd}=True; save the parameters' adapters "
            f"to a directory of their own"
        )


# peft's bias="all" / "<type>_only" trains (and saves) the base layers' biases: a LoRA layer's as
# "<path>.base_layer.bias". lite_fn holds it in LoRA's bias leaf (lora_bias' own, scaled by s), which computes
# b + s·bias: a trained bias b_t is the leaf (b_t − b)/s on the model's own b (plus lora_B.bias with lora_bias).
BASE_BIAS = "base_layer.bias"


def trains_base_bias(cfg: PeftConfig, layer: PeftLayer) -> bool:
    """Whether ``layer``'s base bias is in the file: the config trains biases and the layer has one."""
    return cfg.get("bias", "none") != "none" and layer.kind != PARAMETER_KIND and getattr(layer.module, "bias", None) is not None


def _with_trained_bias(cfg: PeftConfig, layer: PeftLayer, leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    s, own = float(leaves["scale"]), layer.module.bias
    if own.is_meta:
        raise ValueError(
            f"{cfg.where}: {layer.path!r} has a trained bias (bias={cfg.get('bias')!r}), which lite_fn holds as its "
            f"difference from the model's own bias, but the model's is on the meta device; load onto a model with weights"
        )
    b = own.detach().to("cpu", torch.float64)
    shift = layer.tensors[BASE_BIAS].to(torch.float64) - b  # what training added to the model's bias
    if s == 0:
        if bool(shift.any()):
            raise ValueError(
                f"{cfg.where}: {layer.path!r} has a trained bias (bias={cfg.get('bias')!r}) but scale 0 (lora_alpha=0), "
                f"so lite_fn's LoRA bias leaf (added as s·bias) cannot carry it"
            )
        shift = shift * 0
    else:
        shift = shift / s
    return {**leaves, "bias": leaves["bias"].to(torch.float64) + shift if "bias" in leaves else shift}


PEFT_LORA = PeftFormat(
    peft_type="LORA",
    suffixes=(
        "lora_A.weight",
        "lora_B.weight",
        "lora_B.bias",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_magnitude_vector.weight",
    ),
    aliases={"lora_magnitude_vector.weight": "lora_magnitude_vector"},
    # nn.MultiheadAttention is not among them: peft 0.21 adds its out_proj update twice (see test_layer_kinds_lora.py)
    kinds=LINEAR_KINDS | _SHAPED_KINDS | {PARAMETER_KIND},
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
            "target_parameters",  # raw parameters (MoE experts): peft's ParamWrapper, plain LoRA only
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
        "trainable_token_indices": "trainable tokens replace chosen rows of an embedding by trained ones, which no lite_fn variant holds",
        "layer_replication": "it duplicates decoder layers, changing the model's structure",
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
