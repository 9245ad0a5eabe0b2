"""VeRA — Kopiczko, Blankevoort & Asano 2024, "VeRA: Vector-based Random Matrix Adaptation" (ICLR 2024,
arXiv 2310.11454; peft: tuners/vera).

    y = x Wᵀ + b + λ_b ⊙ (B (λ_d ⊙ (A x)))  =  x Wᵀ + b + (λ_d ⊙ x Aᵀ) (diag(λ_b) B)ᵀ

    A (r, d_in)         the first d_in columns of the shared random A* (r, D_in);    frozen
    B (d_out, r)        the first d_out rows of the shared random B* (D_out, r);     frozen
    lambda_d (r,)       = d_initial (peft default 0.1);                              trainable
    lambda_b (d_out,)   = 0;                                                         trainable
    dropout ()          = p, only when p > 0;                                        frozen leaf

The projections are shared by every adapted layer (the paper's one frozen random pair): (D_out, D_in) is the largest (d_out, d_in)
over the targeted layers (``projection_shape``; ``plan`` fills it in from all the layers' shapes), and A*, B*
are drawn as peft draws them: one CPU ``torch.Generator`` seeded with ``projection_prng_key``, A* first,
then B*, each U(±√3·√2/√fan_in) in float32 (kaiming-uniform with gain √2; fan_in = D_in for A*, r for B*).
So a layer's A and B depend on (key, r, D_out, D_in), never on lite_fn's init key or the layer path: every
layer holds its own slices of the same two matrices, and lf.init reproduces peft's values bit for bit.

Identity at init: λ_b = 0 (exact).
Two rank-r GEMMs per token, as LoRA: h = λ_d ⊙ (x̃ Aᵀ), then λ_b ⊙ (h Bᵀ) added to the layer's own
product (one addcmul); scaling the output (as peft) keeps λ_b's gradient elementwise, where scaling B's
rows would cost a (d_out, r) GEMM per step in backward (routed runs, ``apply_runs``, scale B instead).
Dropout (peft's vera_dropout) as LoRA's, on the adapter branch's input x̃, with the runtime's explicit noise.
Deviation: lf.init refuses r > min(d_out, d_in), as for LoRA (the update's rank cannot exceed it); peft
allows it, and such peft files still load.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys, linalg
from .._contract import PeftCodec, PeftConfig, PeftFormat, PeftLayer, PeftWriter, never_random
from . import _padding, lora

# the variant contract; other names are shared helpers
__all__ = [
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "VeRAConfig",
    "apply",
    "apply_runs",
    "init",
    "merged",
    "pad",
    "plan",
    "random_init",
    "shapes",
]
NAME = "vera"
TRAINABLE = frozenset({"lambda_d", "lambda_b"})  # leaves an optimizer updates

random_init = never_random  # the projections come from cfg.projection_prng_key, not from lf.init's key


@dataclass(frozen=True)
class VeRAConfig:
    r: int = 256  # peft's default; VeRA's rank is much larger than LoRA's (each rank costs one number per layer)
    d_initial: float = 0.1  # λ_d's initial value
    projection_prng_key: int = 0  # seeds the shared projections A*, B* (peft's projection_prng_key)
    projection_shape: tuple[int, int] | None = None  # (D_out, D_in) of A*, B*; None: lf.init takes the largest over its targets
    dropout: float = 0.0  # peft's vera_dropout, on the adapter input; active only with lf.call(..., key=k)
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("d_initial", self.d_initial, who)
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or not -(2**63) <= key < 2**64:
            raise ValueError(
                f"{who}: projection_prng_key={key!r} must be an int seed for torch.Generator.manual_seed "
                f"(in [-2**63, 2**64), e.g. projection_prng_key=0)"
            )
        shape = self.projection_shape
        if shape is not None:
            if not isinstance(shape, (tuple, list)) or len(shape) != 2:
                raise ValueError(
                    f"{who}: projection_shape={shape!r} must be None or (D_out, D_in), the largest d_out and d_in "
                    f"over the adapted layers, e.g. projection_shape=(4096, 11008)"
                )
            for name, n in zip(("D_out", "D_in"), shape):
                _checks.positive_int(f"projection_shape's {name}", n, who)
            object.__setattr__(self, "projection_shape", tuple(shape))  # a list becomes a (hashable) tuple
        lora.check_dropout(self.dropout, who)


Config = VeRAConfig


def _kaiming_gain2(gen: torch.Generator, shape: tuple[int, int], fan_in: int) -> Tensor:
    """U(±√3 · √2/√fan_in) from ``gen`` in float32 on CPU: peft's VeRA draw (kaiming-uniform, gain √2, the
    bound evaluated in peft's order so that it is the same float)."""
    bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(fan_in))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


@functools.lru_cache(maxsize=4)
def _projections(key: int, r: int, D_out: int, D_in: int) -> tuple[Tensor, Tensor]:
    """The shared A* (r, D_in) and B* (D_out, r), float32 on CPU; cached (every layer of one lf.init slices
    the same pair) and never handed out: callers copy their slices. Drawn outside any inference mode, so
    copies of them can be saved for a later backward."""
    with torch.inference_mode(False), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(key)
        A = _kaiming_gain2(gen, (r, D_in), fan_in=D_in)
        return A, _kaiming_gain2(gen, (D_out, r), fan_in=r)


def _sliced(key: int, r: int, shape: tuple[int, int], d_out: int, d_in: int) -> tuple[Tensor, Tensor]:
    """A = A*[:, :d_in] (r, d_in) and B = B*[:d_out] (d_out, r) of the projections for ``shape`` = (D_out, D_in),
    as new float32 CPU tensors."""
    A, B = _projections(key, r, *shape)
    return A[:, :d_in].clone(memory_format=torch.contiguous_format), B[:d_out].clone()


def init(key: _keys.Key, W: Tensor, cfg: VeRAConfig, statistic=None) -> dict[str, Tensor]:
    who = "vera.init"
    d_out, d_in = _checks.check_weight(W, who)
    _checks.check_rank(cfg.r, d_out, d_in, who)
    shape = cfg.projection_shape or (d_out, d_in)
    if shape[0] < d_out or shape[1] < d_in:
        raise ValueError(
            f"{who}: projection_shape={shape} does not cover W of shape ({d_out}, {d_in}); the shared projections "
            f"must be at least as large as every adapted layer: use projection_shape=({max(shape[0], d_out)}, "
            f"{max(shape[1], d_in)}) or more (or None, for lf.init to take the largest over its targets)"
        )
    A, B = _sliced(cfg.projection_prng_key, cfg.r, shape, d_out, d_in)
    opts = _checks.like(W)
    return {
        "A": A.to(**opts),
        "B": B.to(**opts),
        "lambda_d": torch.full((cfg.r,), float(cfg.d_initial), **opts).requires_grad_(True),
        "lambda_b": torch.zeros(d_out, **opts).requires_grad_(True),
        **lora.dropout_leaf(cfg, opts),
    }


def plan(stats: dict, cfgs: dict[str, VeRAConfig], dims: dict[str, tuple[int, int]]) -> dict[str, VeRAConfig | None]:
    """The cross-layer step of lf.init: every layer's config gets projection_shape = the largest (d_out, d_in)
    over all targeted layers (``dims``), as peft sizes its shared vera_A / vera_B. A config that already sets
    projection_shape keeps it (init checks that it covers its layer)."""
    shaped = [dims[p] for p, cfg in cfgs.items() if cfg is not None]
    if not shaped:
        return dict(cfgs)
    largest = (max(d for d, _ in shaped), max(d for _, d in shaped))
    return {
        p: (cfg if cfg is None or cfg.projection_shape is not None else dataclasses.replace(cfg, projection_shape=largest))
        for p, cfg in cfgs.items()
    }


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in); the rank r is read from lambda_d."""
    r = leaves["lambda_d"][0] if len(leaves.get("lambda_d", ())) == 1 else 0
    dropout = {"dropout": ()} if "dropout" in leaves else {}
    return {"A": (r, d_in), "B": (d_out, r), "lambda_d": (r,), "lambda_b": (d_out,), **dropout}


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): zero rank rows of A and λ_d, zero columns of B (each added rank has λ_d = 0 and
    adds exactly 0); an adapter that does not target the layer gets zero A, B, λ_d (its update is exactly 0)."""
    return _padding.lowrank(NAME, path, present, K, {"A": 0, "B": 1, "lambda_d": 0})


def _check_params(params: dict[str, Tensor], W: Tensor, who: str) -> None:
    A, B = params["A"], params["B"]
    if A.shape[-1] != W.shape[-1] or B.shape[-2] != W.shape[-2]:
        raise ValueError(
            f"{who}: A of shape {tuple(A.shape)} and B of shape {tuple(B.shape)} do not fit W of shape "
            f"{tuple(W.shape)} (A must be (r, {W.shape[-1]}), B ({W.shape[-2]}, r)); init the params from this W"
        )


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "vera.apply")
    _check_params(params, W, "vera.apply")
    h = torch.nn.functional.linear(lora.dropped(params, x, noise), params["A"]) * params["lambda_d"]  # (..., r)
    # λ_b scales the d_out-wide product (as peft): its gradient is then elementwise, not a (d_out, r) GEMM
    return torch.addcmul(torch.nn.functional.linear(x, W, b), torch.nn.functional.linear(h, params["B"]), params["lambda_b"])


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W + diag(λ_b) B diag(λ_d) A, b): apply's layer (without dropout: eval) as one dense weight."""
    _check_params(params, W, "vera.merged")
    return W + (params["lambda_b"].unsqueeze(-1) * params["B"] * params["lambda_d"]) @ params["A"], b


def apply_runs(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    """K adapters on K equal runs of rows at once (a routed call's fast path): every leaf has a leading axis
    K, x is (K, m..., d_in) -> (K, m..., d_out); equal to ``vmap(apply)`` over that axis. One GEMM for the
    base over all rows, one batched GEMM for x Aᵀ, the K products with λ_b ⊙ B accumulated into the base
    output. No dropout (the runtime vmaps ``apply`` when a key is given)."""
    _check_params(params, W, "vera.apply_runs")
    K = x.shape[0]
    h = torch.bmm(x.reshape(K, -1, x.shape[-1]), params["A"].mT) * params["lambda_d"].unsqueeze(-2)  # (K, rows, r)
    M = params["lambda_b"].unsqueeze(-1) * params["B"]  # (K, d_out, r)
    return linalg.add_product(torch.nn.functional.linear(x, W, b), h.view(*x.shape[:-1], -1), M)


# ----------------------------------------------------------------------------- peft: the VERA type
# Per targeted module: vera_lambda_b (d_out,), vera_lambda_d (r,). Once per file, at model level (keys
# "base_model.vera_A" / "base_model.vera_B", no module path): the shared vera_A (r, D_in) and vera_B (D_out, r),
# unless save_projection is false — then peft redraws them from projection_prng_key at the largest (d_out, d_in)
# over the targeted modules. peft's VeRA has one r and one pair of projections per adapter.

_LAYER_TENSORS = ("vera_lambda_b", "vera_lambda_d")
_SHARED = ("vera_A", "vera_B")


def _saves_projection(cfg: PeftConfig) -> bool:
    return cfg.get("save_projection", True) is not False


def _peft_tensors(cfg: PeftConfig, layer: PeftLayer) -> tuple[str, ...]:
    return _LAYER_TENSORS + (_SHARED if _saves_projection(cfg) else ())


def _peft_projections(cfg: PeftConfig, layer: PeftLayer, r: int) -> tuple[Tensor, Tensor]:
    """The layer's slices A (r, d_in), B (d_out, r) of the file's vera_A / vera_B, or of the pair peft redraws
    when the file does not store them (from projection_prng_key, at the largest (d_out, d_in) over the targets)."""
    d_out, d_in = layer.W.shape
    if not _saves_projection(cfg):
        key = cfg.get("projection_prng_key", 0)
        if isinstance(key, bool) or not isinstance(key, int):
            raise ValueError(f"{cfg.where} sets projection_prng_key={key!r}; expected an int seed")
        dims = cfg.dims  # (d_out, d_in) of every targeted module
        largest = (max(d for d, _ in dims.values()), max(d for _, d in dims.values()))
        return _sliced(key, r, largest, d_out, d_in)
    A, B = layer.tensors["vera_A"], layer.tensors["vera_B"]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r or A.shape[1] < d_in or B.shape[0] < d_out:
        raise ValueError(
            f"{cfg.file!r}: vera_A has shape {tuple(A.shape)} and vera_B {tuple(B.shape)}, which do not cover "
            f"{layer.path!r} of shape ({d_out}, {d_in}) at r={r} (expected (r, ≥{d_in}) and (≥{d_out}, r))"
        )
    return A[:, :d_in], B[:d_out]


def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    d_out, d_in = layer.W.shape
    lam_b, lam_d = layer.tensors["vera_lambda_b"], layer.tensors["vera_lambda_d"]
    if lam_d.ndim != 1 or lam_b.shape != (d_out,):
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.vera_lambda_d has shape {tuple(lam_d.shape)} and vera_lambda_b "
            f"{tuple(lam_b.shape)}; expected (r,) and ({d_out},) for a layer of shape ({d_out}, {d_in})"
        )
    r = cfg.rank(layer.path, lam_d.shape[0], "vera_lambda_d")
    A, B = _peft_projections(cfg, layer, r)
    return {"A": A, "B": B, "lambda_d": lam_d, "lambda_b": lam_b}


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    tensors = {"vera_lambda_b": leaves["lambda_b"].detach(), "vera_lambda_d": leaves["lambda_d"].detach()}
    return tensors, {"r": leaves["lambda_d"].shape[0], "A": leaves["A"].detach(), "B": leaves["B"].detach()}


def _peft_shared(layers: list[PeftLayer], facts: list[dict]) -> dict[str, Tensor]:
    """vera_A / vera_B of a save: the widest A and the tallest B of the layers, which every other layer's
    must be a slice of (peft stores one pair and slices it per layer)."""
    A = max((f["A"] for f in facts), key=lambda t: t.shape[1])
    B = max((f["B"] for f in facts), key=lambda t: t.shape[0])
    for layer, f in zip(layers, facts):
        a, b = f["A"], f["B"]
        if not (torch.equal(a.to(A.dtype), A[:, : a.shape[1]]) and torch.equal(b.to(B.dtype), B[: b.shape[0]])):
            raise ValueError(
                f"save_peft: the VeRA projections A, B at {layer.path!r} are not slices of those of the other layers; "
                f"peft's VeRA stores one shared pair per adapter. Init all layers in one lf.init with one VeRAConfig "
                f"(its projection_shape covering every target) to save them together"
            )
    return {"vera_A": A, "vera_B": B}


def _peft_config(layers: list[PeftLayer], facts: list[dict], writer: PeftWriter) -> dict:
    ranks = {layer.path: f["r"] for layer, f in zip(layers, facts)}
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f"save_peft: peft's VeRA has one r per adapter (its projections are shared), but the layers have ranks "
            f"{ranks}; save the layers of each rank apart"
        )
    return {
        "r": next(iter(ranks.values())),
        "projection_prng_key": 0,  # the projections themselves are in the file
        "save_projection": True,
        "vera_dropout": 0.0,
        "d_initial": 0.1,
        "fan_in_fan_out": any(layer.kind == "Conv1D" for layer in layers),
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


PEFT_VERA = PeftFormat(
    peft_type="VERA",
    suffixes=_LAYER_TENSORS,
    fields=frozenset(
        {
            "r",
            "target_modules",
            "layers_to_transform",
            "layers_pattern",
            "projection_prng_key",
            "save_projection",
            "bias",
            "fan_in_fan_out",  # peft sets it per layer from the layer type (Conv1D is fan-in-fan-out)
        }
    ),
    # the initial values the file overrides, and dropout (training only)
    ignores=frozenset({"d_initial", "init_weights", "vera_dropout"}),
    config=_peft_config,
    shared=_SHARED,
    shared_tensors=_peft_shared,
)

PEFT = PeftCodec(format=PEFT_VERA, claims=lambda cfg, path: True, tensors=_peft_tensors, read=_peft_read, write=_peft_write)
