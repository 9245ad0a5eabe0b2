"""peft interop: read and write peft adapter directories with json + safetensors only.

    params = lf.load_peft("out/my_lora", model=model)          # what PeftModel.from_pretrained(model, …) computes
    lf.save_peft("out/exported", params, model=model)           # a directory PeftModel.from_pretrained loads

peft is never imported: this module reads and writes the on-disk format that peft's
``save_pretrained`` writes and ``from_pretrained`` reads (taken from peft 0.21's sources and tested
against it):

* ``adapter_config.json``: the config's fields (``peft_type``, ``target_modules``, ``r``, …);
* ``adapter_model.safetensors``: tensors keyed ``"base_model.model." + module_path + suffix``:

  ==============  ========================================================  =========================================
  peft_type       tensors per targeted module (W is d_out × d_in)           lite_fn leaves
  ==============  ========================================================  =========================================
  LORA            ``lora_A.weight`` (r, d_in), ``lora_B.weight`` (d_out, r)  lora: A, B, scale = alpha/r (alpha/√r rsLoRA)
  LORA use_dora   + ``lora_magnitude_vector`` (d_out,)                      dora: A, B, scale, m
  IA3             ``ia3_l``: (d_out, 1), or (1, d_in) in feedforward_modules  ia3: g (d_out,) · ia3_ff: g (d_in,)
  HRA             ``hra_u`` (d_in, r): the Householder vectors as columns    hra: U = hra_uᵀ
  DELORA          ``delora_A``, ``delora_B``, ``delora_lambda`` (1,),        delora: A, B, lam (), wnorm
                  ``delora_w_norm`` (d_in,)
  ROAD            ``road_theta``, ``road_alpha``: flat, in peft's order      road: theta, alpha reshaped
  ==============  ========================================================  =========================================

Which modules an adapter targets is what peft's matcher selects from the config (``target_modules``
as a list, a regex string or ``"all-linear"``; ``exclude_modules``; ``layers_to_transform`` /
``layers_pattern``; reproduced here) and must be exactly the modules the weights file holds.
Per-layer rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` (peft's ``get_pattern_key``).

LoRA initialisations (``init_lora_weights``) are plain LoRA on disk, but two of them change the base
model inside ``PeftModel.from_pretrained``: "pissa" and "olora" re-run their init on the model they
are given and subtract s·B₀A₀ from its weights. load_peft reproduces that without touching the
model: such a layer loads as lite_fn's ``pissa`` variant, with the frozen A0/B0 computed from the
model's weights the way peft computes them. So, exactly like peft, load a PiSSA/OLoRA adapter onto
the *original* base model (never onto the saved residual model, which would subtract twice), or
convert it with peft's ``save_pretrained(path_initial_model_for_weight_conversion=…)``, which writes
a plain rank-2r LoRA (``init_lora_weights: true``) for the original base. EVA, LoRA-GA, MiCA,
orthogonal and gaussian inits leave the base alone at load: plain LoRA. (LoRA-GA did rewrite the
base during training; like peft, load_peft applies the adapter to the model you pass.)

Refused, each with an error naming the field and its value: anything peft can express that lite_fn
cannot — ``modules_to_save`` matching a module, ``bias`` other than "none", ``lora_bias``, trainable
tokens, embedding / Conv2d targets, ``layer_replication``, aLoRA, QALoRA, Arrow, KaSA, VeLoRA,
MonteCLoRA, BD-LoRA, target_parameters, HRA's ``apply_GS``, ``use_dora`` with PiSSA/OLoRA, the
randomised "pissa_niter_K" (peft itself redraws its random sketch at every load), "corda"
(peft cannot load it without ``preprocess_corda``) and "loftq" (quantises the base), peft types
lite_fn lacks — and any field this reader does not know that is set to a non-default value (a newer
peft). Ignored because they act only in training: ``lora_dropout``, DeLoRA's ``module_dropout``
(``PeftModel.from_pretrained`` returns an eval-mode model; ``lf.call`` without a dropout key applies
none), initial values that the file overrides (``delora_lambda``, ``lambda_pattern``, ``init_weights``,
``init_ia3_weights``), the configs of data-driven inits (``eva_config``, ``corda_config``, …; the init
itself is judged by ``init_lora_weights``), and ``fan_in_fan_out`` (peft sets it per layer from the
layer type: Conv1D is fan-in-fan-out).

A ``.bin`` adapter (pickle) is refused: unpickling runs code from the file. Leaves are cast to each
layer's weight dtype and device (peft keeps fp32 adapters on a bf16 model by default, so bf16
outputs differ from peft's by bf16 rounding).

Writing (``save_peft``): LoRA / rsLoRA / EVA as LORA (per-layer ranks and alphas in
``rank_pattern`` / ``alpha_pattern``), DoRA as LORA with ``use_dora``, IA3 + IA3-FF as IA3 with
``feedforward_modules``, HRA, DeLoRA and RoAd as their own types. PiSSA is written as the plain LoRA
of rank 2r that equals it on the *unmodified* base: s·(BA − B₀A₀) = s·[B, −B₀]·[A; A₀]. AntiPaSTO
(not in peft) is written as the LoRA that equals it exactly at its current alpha:
U'S'V'ᵀ − USVᵀ, rank r when only one side rotates (U·(S'V'ᵀ − SVᵀ) or (U'S' − US)·Vᵀ), else 2r
([U'S' − US, US]·[V', V' − V]ᵀ), computed in float64 from differences that are exactly 0 at alpha = 0. The directory is written to a temp directory next to
the target and renamed into place (an existing adapter directory is swapped atomically with
renameat2(RENAME_EXCHANGE) on Linux). Stacked params are refused (save ``lf.unstack`` entries one
by one).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _checks, _layers, io, trees, variants
from .linalg import block_rotate
from .variants import antipasto as antipasto_variant
from .variants import pissa as pissa_variant

__all__ = ["load_peft", "save_peft"]

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."
_TYPES = ("LORA", "IA3", "HRA", "DELORA", "ROAD")

# Fields that say nothing about what the loaded adapter computes in eval mode.
_META = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
# Per peft type: fields read below, and fields safe to ignore (training-only or overridden by the file).
_HANDLED = {
    "LORA": {
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
        "lora_bias",
        "modules_to_save",
        "fan_in_fan_out",
    },
    "IA3": {"target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "fan_in_fan_out"},
    "HRA": {
        "r",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "apply_GS",
        "modules_to_save",
    },
    "DELORA": {
        "r",
        "rank_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    },
    "ROAD": {"variant", "group_size", "target_modules", "modules_to_save"},
}
_IGNORED = {
    "LORA": {
        "lora_dropout",
        "megatron_core",
        "qalora_group_size",
        "eva_config",
        "corda_config",
        "loftq_config",
        "lora_ga_config",
        "ensure_weight_tying",
        "runtime_config",
    },
    "IA3": {"init_ia3_weights"},
    "HRA": {"init_weights"},
    "DELORA": {"init_weights", "delora_lambda", "lambda_pattern", "module_dropout"},
    "ROAD": {"init_weights"},
}
# Why a set field cannot be reproduced (fields not listed get a generic reason).
_WHY = {
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
}
# init_lora_weights values, compared as peft's LoraLayer.update_layer compares them (some case-insensitively)
_PLAIN_INITS = (True, False, "orthogonal", "eva", "lora_ga")  # base untouched at load
_PLAIN_INITS_ANY_CASE = ("gaussian", "mica")
_RESIDUAL_INITS = ("pissa", "olora")  # from_pretrained subtracts s·B0A0 from the base: lite_fn's pissa variant


def _unset(v) -> bool:
    return v is None or v is False or (isinstance(v, (dict, list, tuple, set, str)) and len(v) == 0)


# ----------------------------------------------------------------------------- peft's matcher
def _conv1d_or_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _layers._is_conv1d(module)


def _all_linear(model: nn.Module, cfg: dict) -> list[str]:
    """peft's "all-linear": every nn.Linear / Conv1D but the output head (the output embeddings, or for
    task_type SEQ_CLS without them, the first of ``score`` / ``classifier``)."""
    named = list(model.named_modules())
    names = [n for n, m in named if n and _conv1d_or_linear(m)]
    head = getattr(model, "get_output_embeddings", lambda: None)()
    exclude = set()
    if isinstance(head, nn.Module):
        exclude |= {n for n, m in named if m is head}
    elif cfg.get("task_type") == "SEQ_CLS":
        for attr in ("score", "classifier"):
            h = getattr(model, attr, None)
            if isinstance(h, nn.Module):
                exclude |= {n for n, m in named if m is h}
                break
    return [n for n in names if n not in exclude]


def _in_layers(cfg: dict, key: str) -> bool:
    """peft's layers_to_transform / layers_pattern filter (the first numbered segment is the layer index)."""
    idx = cfg.get("layers_to_transform")
    if idx is None or (isinstance(idx, list) and len(idx) == 0):
        return True
    pattern = cfg.get("layers_pattern")
    m = None
    if pattern is None or len(pattern) == 0:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    if m is None:
        return False
    layer = int(m.group("idx"))
    return layer == idx if isinstance(idx, int) else layer in idx


def _targeted(cfg: dict, targets, key: str) -> bool:
    """peft's check_target_module_exists (tuners_utils.py), on a config read from JSON."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    to_save = cfg.get("modules_to_save")
    if to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:  # peft: a module named in full is targeted regardless of layers_to_transform
        return True
    return any(key.endswith(f".{t}") for t in targets) and _in_layers(cfg, key)


def _target_paths(cfg: dict, model: nn.Module, where: str) -> list[str]:
    targets = cfg.get("target_modules")
    if targets is None:
        raise ValueError(
            f"{where}: target_modules is null; lite_fn does not guess peft's per-architecture defaults — "
            f"set target_modules in adapter_config.json to the adapted module names"
        )
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, cfg)
    elif not isinstance(targets, (str, list)):
        raise ValueError(f"{where}: target_modules={targets!r} must be a list of names or a regex string")
    try:
        return [p for p, _ in model.named_modules() if p and _targeted(cfg, targets, p)]
    except re.error as e:
        raise ValueError(
            f"{where}: a regex in target_modules / exclude_modules / layers_pattern / modules_to_save does not compile: {e}"
        ) from None


def _pattern_key(keys, path: str) -> str | None:
    """peft's get_pattern_key: the first pattern key k with re.match(rf"(.*\\.)?({k})$", path), else None."""
    for k in keys:
        try:
            if re.match(rf"(.*\.)?({k})$", path):
                return k
        except re.error as e:
            raise ValueError(f"rank_pattern / alpha_pattern key {k!r} is not a valid regex ({e})") from None
    return None


def _pattern_value(pattern: dict, default, path: str):
    k = _pattern_key(pattern, path) if pattern else None
    return default if k is None else pattern[k]


def _is_feedforward(cfg: dict, path: str) -> bool:
    """peft IA3's _check_target_module_feedforward (note: a plain endswith, no dot)."""
    ff = cfg.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(t) for t in ff)


# ----------------------------------------------------------------------------- reading
def _adapter_dir(path, adapter_name: str | None) -> str:
    """The directory holding the adapter: ``path`` itself (peft's "default") or ``path/adapter_name``."""
    shown = os.fsdecode(os.fspath(path))
    if not os.path.exists(shown):
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", shown) and not shown.startswith("."):
            hint = (
                f"; lite_fn reads local directories only — download a Hub adapter first, e.g. "
                f"huggingface_hub.snapshot_download({shown!r})"
            )
        raise FileNotFoundError(f"no peft adapter at {shown!r}: the path does not exist{hint}")
    if not os.path.isdir(shown):
        base = os.path.basename(shown)
        if base in (_CONFIG, _WEIGHTS, _PICKLE):
            raise ValueError(f"{shown!r} is a file; pass the adapter directory that holds it: {os.path.dirname(shown) or '.'!r}")
        raise ValueError(
            f"{shown!r} is not a directory; pass the directory peft's save_pretrained wrote (it holds {_CONFIG} and {_WEIGHTS})"
        )
    root = os.path.isfile(os.path.join(shown, _CONFIG))
    try:
        entries = sorted(os.listdir(shown))
    except OSError as e:
        raise ValueError(f"cannot list {shown!r}: {e}") from None
    subs = [d for d in entries if os.path.isfile(os.path.join(shown, d, _CONFIG))]
    available = (["default"] if root else []) + [s for s in subs if not (root and s == "default")]
    if adapter_name is None:
        if root:
            return shown  # what PeftModel.from_pretrained(model, path) loads
        if len(subs) == 1:
            return os.path.join(shown, subs[0])
        if subs:
            raise ValueError(
                f"{shown!r} holds {len(subs)} peft adapters in subfolders {subs} and none at its top; "
                f"pass adapter_name= one of {subs}"
            )
        raise FileNotFoundError(
            f"{shown!r} holds no {_CONFIG} (nor subfolders with one), so it is not a peft adapter "
            f"directory; it contains {entries[:10]}"
        )
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a string (e.g. 'default'), got {type(adapter_name).__name__}")
    if adapter_name == "default" and root:
        return shown
    if adapter_name in subs:
        return os.path.join(shown, adapter_name)
    raise ValueError(f"no adapter named {adapter_name!r} in {shown!r}; available: {available or 'none'}")


def _read_regular(file: str) -> bytes:
    try:
        info = os.stat(file)
    except OSError as e:
        raise FileNotFoundError(f"cannot read {file!r}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{file!r} is {io._file_kind(info.st_mode)}, not a file")
    with open(file, "rb") as f:
        return f.read()


def _read_config(folder: str) -> tuple[str, dict]:
    file = os.path.join(folder, _CONFIG)
    raw = _read_regular(file)
    try:
        cfg = io._json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{file!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file!r} holds a JSON {type(cfg).__name__}, expected an object of peft config fields")
    return file, cfg


def _read_weights(folder: str) -> tuple[str, dict[str, Tensor]]:
    from safetensors.torch import load as st_load

    file = os.path.join(folder, _WEIGHTS)
    if not os.path.exists(file):
        pickle = os.path.join(folder, _PICKLE)
        if os.path.exists(pickle):
            raise ValueError(
                f"{pickle!r} is a pickle file, which lite_fn does not open: unpickling executes code stored in the file. "
                f"If you trust it, convert it once to safetensors:\n"
                f"    import torch; from safetensors.torch import save_file\n"
                f"    sd = torch.load({pickle!r}, map_location='cpu', weights_only=True)\n"
                f"    save_file({{k: v.contiguous() for k, v in sd.items()}}, {file!r})"
            )
        raise FileNotFoundError(f"{folder!r} has {_CONFIG} but no {_WEIGHTS}; it contains {sorted(os.listdir(folder))[:10]}")
    blob = _read_regular(file)
    try:
        tensors = st_load(blob)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{file!r} is not a readable safetensors file ({type(e).__name__}: {first})") from None
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{file!r}: tensor {k!r} has dtype {t.dtype}; peft adapter tensors are floating point")
    return file, tensors


def _check_fields(cfg: dict, kind: str, where: str, model: nn.Module) -> None:
    """Every field is read, ignored for a stated reason, or unset; anything else is refused by name."""
    for name, value in cfg.items():
        if name in _META or name in _HANDLED[kind] or name in _IGNORED[kind] or _unset(value):
            continue
        why = _WHY.get(name, "this reader does not know the field (a newer peft?) and will not ignore it")
        raise ValueError(f"{where} sets {name}={value!r}, which lite_fn cannot reproduce: {why}")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{where} sets bias={bias!r}: peft trained (and saved) the biases of the model, which lite_fn "
            f"adapters cannot hold; only bias='none' loads"
        )
    if cfg.get("lora_bias"):
        raise ValueError(
            f"{where} sets lora_bias={cfg['lora_bias']!r}: a bias on lora_B has no lite_fn leaf; only lora_bias=false loads"
        )
    if cfg.get("apply_GS"):
        raise ValueError(
            f"{where} sets apply_GS={cfg['apply_GS']!r}: lite_fn's HRA has no Gram-Schmidt form; only apply_GS=false loads"
        )
    to_save = cfg.get("modules_to_save")
    if to_save:
        names = [to_save] if isinstance(to_save, str) else list(to_save)
        hit = [p for p, _ in model.named_modules() if p and any(p.endswith(m) for m in names)]
        if hit:
            raise ValueError(
                f"{where} sets modules_to_save={to_save!r}, which matches {hit[:4]} of "
                f"{type(model).__name__}: peft trained full copies of those modules, which lite_fn "
                f"adapters cannot hold (pass their saved weights with lf.call(..., base=...) if you need them)"
            )


def _split_key(key: str, suffixes: tuple[str, ...], file: str, kind: str) -> tuple[str, str]:
    if not key.startswith(_PREFIX):
        raise ValueError(
            f"{file!r}: tensor {key!r} does not start with {_PREFIX!r}; it is not a peft {kind} adapter "
            f"tensor (prompt-learning methods are not supported)"
        )
    rest = key[len(_PREFIX) :]
    for s in suffixes:
        if rest.endswith("." + s):
            return rest[: -len(s) - 1], s
    if "trainable_tokens" in rest or "token_adapter" in rest:
        raise ValueError(
            f"{file!r}: tensor {key!r} holds trainable tokens (trainable_token_indices), which lite_fn cannot reproduce"
        )
    raise ValueError(
        f"{file!r}: tensor {key!r} is not a peft {kind} adapter tensor lite_fn knows "
        f"(expected names ending in {list(suffixes)}); it may be a modules_to_save copy or a newer format"
    )


_SUFFIXES = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight"),
    "IA3": ("ia3_l",),
    "HRA": ("hra_u",),
    "DELORA": ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    "ROAD": ("road_theta", "road_alpha"),
}
_NEEDED = {
    "LORA": ("lora_A.weight", "lora_B.weight"),
    "IA3": ("ia3_l",),
    "HRA": ("hra_u",),
    "DELORA": ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    "ROAD": ("road_theta", "road_alpha"),
}


def _init_kind(init, use_dora: bool, where: str) -> str:
    """'plain' or 'residual' (pissa/olora), or a ValueError naming init_lora_weights."""
    if any(init is v or (isinstance(init, str) and init == v) for v in _PLAIN_INITS) or (
        isinstance(init, str) and init.lower() in _PLAIN_INITS_ANY_CASE
    ):
        return "plain"
    if init == "pissa" or (isinstance(init, str) and init.lower() == "olora"):
        if use_dora:
            raise ValueError(
                f"{where} sets use_dora=True with init_lora_weights={init!r}: peft's DoRA then takes its norm "
                f"from the residual base weight, which lite_fn's DoRA (on the shared base) cannot; "
                f"only use_dora with a plain init loads"
            )
        return "residual"
    why = {
        "pissa_niter": "peft's randomized SVD redraws its random sketch at every load (from torch's global RNG), so "
        "even peft does not reproduce the trained model; convert the adapter with peft's "
        "save_pretrained(path_initial_model_for_weight_conversion=...) to a plain LoRA",
        "corda": "peft itself cannot load it without running preprocess_corda on data; convert the adapter with "
        "save_pretrained(path_initial_model_for_weight_conversion=...) to a plain LoRA",
        "loftq": "peft replaces the base weights by quantized ones at load; load the adapter onto the LoftQ base "
        "with init_lora_weights set to true instead",
    }
    key = next((k for k in why if isinstance(init, str) and init.lower().startswith(k)), None)
    reason = why[key] if key else f"lite_fn knows {list(_PLAIN_INITS + _PLAIN_INITS_ANY_CASE + _RESIDUAL_INITS)}"
    raise ValueError(f"{where} sets init_lora_weights={init!r}, which lite_fn cannot reproduce: {reason}")


def _residual_factors(
    init: str, W: Tensor, r: int, alpha: float, use_rslora: bool, path: str, is_conv1d: bool, where: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(A0, B0, scale) of what peft's pissa_init / olora_init subtract from the base at load (fp32)."""
    if init == "pissa":
        if alpha <= 0:
            raise ValueError(f"{where}: PiSSA with lora_alpha={alpha!r} at {path!r} takes the square root of S/scale < 0")
        p = pissa_variant.init(0, W.detach(), pissa_variant.PiSSAConfig(r=r, alpha=alpha, use_rslora=use_rslora))
        return p["A0"], p["B0"], p["scale"]
    if is_conv1d:
        raise ValueError(
            f"{where} sets init_lora_weights='olora' on the Conv1D layer {path!r}: peft's olora_init takes "
            f"the QR of the stored (d_in, d_out) weight, which lite_fn does not reproduce"
        )
    Q, R = torch.linalg.qr(W.detach().to(torch.float32))  # peft olora_init: W = QR, B0 = Q[:, :r], A0 = R[:r]
    scale = torch.tensor(alpha / (math.sqrt(r) if use_rslora else r), dtype=W.dtype, device=W.device)
    return R[:r].contiguous().to(W.dtype), Q[:, :r].contiguous().to(W.dtype), scale


def load_peft(path, *, model: nn.Module, adapter_name: str | None = None) -> dict:
    """lite_fn params equal to ``peft.PeftModel.from_pretrained(model, path)`` on the same model.

    Args:
        path: a directory written by peft's ``save_pretrained`` (``adapter_config.json`` +
            ``adapter_model.safetensors``).
        model: the base model the adapter was trained for (the one you would hand to peft). It is
            read, never modified: paths, layer types and shapes are checked against it, and PiSSA /
            OLoRA factors are computed from its weights.
        adapter_name: for a directory holding several adapters (peft writes the non-default ones in
            subfolders named after them): which one. ``None``: the top-level adapter (what peft loads),
            or the only one.

    Returns:
        ``{module_path: {variant: {leaf: Tensor}}}`` with variants lora, dora, pissa (PiSSA/OLoRA
        inits), ia3, ia3_ff, hra, delora or road; leaves in each layer weight's dtype and device,
        trainability as each variant declares it.

    Raises:
        FileNotFoundError: naming the path, when it or its files do not exist.
        ValueError: naming the field and value (or tensor) that lite_fn cannot reproduce, a ``.bin``
            (pickle) weights file, a target set or shape that does not fit ``model``.

    Example (a directory written by ``lf.save_peft`` here; one from peft's ``save_pretrained`` reads the same):
        >>> import os, tempfile, torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> mine = lf.init(0, model, lf.LoRAConfig(r=2, alpha=4), targets=r"^0$")
        >>> folder = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> lf.save_peft(folder, mine, model=model)
        >>> params = lf.load_peft(folder, model=model)
        >>> torch.equal(params["0"]["lora"]["A"], mine["0"]["lora"]["A"])
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_peft: model must be the base nn.Module the adapter was trained for, got {type(model).__name__}")
    folder = _adapter_dir(path, adapter_name)
    cfg_file, cfg = _read_config(folder)
    where = f"peft config {cfg_file!r}"
    kind = cfg.get("peft_type")
    if kind not in _TYPES:
        raise ValueError(
            f"{where} has peft_type={kind!r}; lite_fn reads {list(_TYPES)} (LoRA incl. rsLoRA/DoRA/PiSSA/"
            f"OLoRA/EVA, IA3, HRA, DeLoRA, RoAd)"
        )
    _check_fields(cfg, kind, where, model)
    weights_file, tensors = _read_weights(folder)

    _refuse_foreign_tensors(tensors, weights_file)
    by_path: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        mpath, suffix = _split_key(key, _SUFFIXES[kind], weights_file, kind)
        by_path.setdefault(mpath, {})[suffix.removesuffix(".weight") if suffix.startswith("lora_magnitude") else suffix] = t

    targets = _target_paths(cfg, model, where)
    missing = [p for p in targets if p not in by_path]
    extra = [p for p in by_path if p not in set(targets)]
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"tensors for modules the config does not target in {type(model).__name__}: {extra[:6]}")
        if missing:
            parts.append(f"no tensors for targeted modules {missing[:6]}")
        raise ValueError(
            f"{weights_file!r} and {where} disagree for {type(model).__name__} (is this the model the adapter "
            f"was trained for?): {'; '.join(parts)}"
        )

    use_dora = bool(cfg.get("use_dora"))
    init = cfg.get("init_lora_weights", True)
    ctx = _Ctx(cfg, where, weights_file, _init_kind(init, use_dora, where) if kind == "LORA" else "plain", use_dora)
    modules = dict(model.named_modules())
    params: dict = {}
    for mpath in targets:  # model order
        module, found = modules[mpath], by_path[mpath]
        try:
            layer_kind = _layers.kind_of(module, mpath)
        except TypeError as e:
            raise ValueError(f"{where} targets {mpath!r}: {e}") from None
        need = _NEEDED[kind] + (("lora_magnitude_vector",) if use_dora else ())
        absent = [s for s in need if s not in found]
        unexpected = [s for s in found if s not in need]
        if absent or unexpected:
            raise ValueError(
                f"{weights_file!r}: module {mpath!r} "
                + "; ".join(
                    ([f"lacks tensor(s) {absent}"] if absent else [])
                    + ([f"has tensor(s) {unexpected} that use_dora={use_dora} does not use"] if unexpected else [])
                )
            )
        W = _layers.values(_layers.weight_view(module, layer_kind))
        params[mpath] = dict([_LEAVES[kind](ctx, mpath, found, W, layer_kind.name)])
    io.check_against(model, params, source=f"peft adapter {folder!r}")
    return trees._declared(params)


def _refuse_foreign_tensors(tensors: dict[str, Tensor], file: str) -> None:
    """The most telling refusals first: a LoRA on an embedding (whose base weights peft saves too)."""
    emb = [k for k in tensors if ".lora_embedding_" in k]
    if emb:
        target = emb[0].removeprefix(_PREFIX).split(".lora_embedding_")[0]
        raise ValueError(
            f"{file!r}: tensor {emb[0]!r} is a LoRA on an embedding layer (target {target!r}); lite_fn adapts "
            f"nn.Linear and Conv1D layers only"
        )
    base = [k for k in tensors if ".base_layer." in k]
    mha = [k for k in base if ".base_layer.out_proj.lora_" in k]
    if mha:  # peft's LoRA on nn.MultiheadAttention: its in_proj as <target>.lora_*, out_proj under base_layer
        target = mha[0].removeprefix(_PREFIX).split(".base_layer.")[0]
        raise ValueError(
            f"{file!r}: tensor {mha[0]!r} is peft's LoRA on an nn.MultiheadAttention (target {target!r}: its fused "
            f"in_proj and its out_proj); lite_fn does not adapt nn.MultiheadAttention — load it with peft, or target "
            f"the model's nn.Linear layers"
        )
    if base:
        raise ValueError(
            f"{file!r} holds base-model weights ({base[:3]}; peft's save_embedding_layers), which a lite_fn adapter cannot hold"
        )


class _Ctx(NamedTuple):
    cfg: dict
    where: str  # the config file, for messages
    file: str  # the weights file, for messages
    init_kind: str  # LoRA: "plain" or "residual" (PiSSA / OLoRA)
    use_dora: bool


def _leaf(t: Tensor, W: Tensor, shape=None) -> Tensor:
    """A leaf in W's dtype and on W's device (a meta skeleton's leaves stay where they are), owning its memory."""
    t = t if shape is None else t.reshape(shape)
    device = t.device if W.is_meta else W.device
    return t.to(dtype=W.dtype, device=device).clone(memory_format=torch.contiguous_format)


def _rank(ctx: _Ctx, path: str, r_file: int, what: str) -> int:
    """The file's rank, which must be the config's (rank_pattern, else r) for this path."""
    r = _pattern_value(ctx.cfg.get("rank_pattern") or {}, ctx.cfg.get("r", 8), path)
    if r_file != r:
        raise ValueError(
            f"{ctx.file!r}: {path}.{what} has rank {r_file} but {ctx.where} gives r={r} for it "
            f"(rank_pattern / r); the files do not belong together"
        )
    return r


def _lora_leaves(ctx: _Ctx, path: str, found: dict, W: Tensor, kind_name: str) -> tuple[str, dict]:
    A, B = found["lora_A.weight"], found["lora_B.weight"]
    if A.ndim != 2:
        raise ValueError(
            f"{ctx.file!r}: {path}.lora_A.weight has shape {tuple(A.shape)}; lite_fn adapts linear layers "
            f"only (a 4-D factor is a Conv2d LoRA)"
        )
    r = _rank(ctx, path, A.shape[0], "lora_A.weight")
    alpha = _pattern_value(ctx.cfg.get("alpha_pattern") or {}, ctx.cfg.get("lora_alpha", 8), path)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{ctx.where}: lora_alpha / alpha_pattern gives {alpha!r} for {path!r}; expected a number")
    rslora = bool(ctx.cfg.get("use_rslora"))
    leaves = {"A": _leaf(A, W), "B": _leaf(B, W)}
    leaves["scale"] = torch.tensor(alpha / (math.sqrt(r) if rslora else r), dtype=W.dtype, device=leaves["A"].device)
    if ctx.use_dora:
        return "dora", {**leaves, "m": _leaf(found["lora_magnitude_vector"], W)}
    if ctx.init_kind == "plain":
        return "lora", leaves
    init = str(ctx.cfg.get("init_lora_weights"))
    if W.is_meta:
        raise ValueError(
            f"{ctx.where} sets init_lora_weights={init!r}: its frozen factors come from the base weights, "
            f"but {path}.weight is on the meta device; load the model's weights first"
        )
    A0, B0, s = _residual_factors(init, W, r, alpha, rslora, path, kind_name == "Conv1D", ctx.where)
    return "pissa", {**leaves, "scale": s, "A0": A0, "B0": B0}


def _ia3_leaves(ctx: _Ctx, path: str, found: dict, W: Tensor, kind_name: str) -> tuple[str, dict]:
    g = found["ia3_l"]
    ff = _is_feedforward(ctx.cfg, path)
    want = (1, W.shape[1]) if ff else (W.shape[0], 1)
    if tuple(g.shape) != want:
        raise ValueError(
            f"{ctx.file!r}: {path}.ia3_l has shape {tuple(g.shape)}, but {path!r} is {'' if ff else 'not '}in "
            f"feedforward_modules={ctx.cfg.get('feedforward_modules')!r}, so peft expects {want}"
        )
    return ("ia3_ff" if ff else "ia3"), {"g": _leaf(g, W, (-1,))}


def _hra_leaves(ctx: _Ctx, path: str, found: dict, W: Tensor, kind_name: str) -> tuple[str, dict]:
    u = found["hra_u"]  # (d_in, r): peft's vectors are columns
    if u.ndim != 2:
        raise ValueError(f"{ctx.file!r}: {path}.hra_u has shape {tuple(u.shape)}, expected (d_in, r)")
    _rank(ctx, path, u.shape[1], "hra_u")
    return "hra", {"U": _leaf(u.T, W)}


def _delora_leaves(ctx: _Ctx, path: str, found: dict, W: Tensor, kind_name: str) -> tuple[str, dict]:
    A, lam = found["delora_A"], found["delora_lambda"]
    if A.ndim != 2:
        raise ValueError(f"{ctx.file!r}: {path}.delora_A has shape {tuple(A.shape)}, expected (r, d_in)")
    _rank(ctx, path, A.shape[0], "delora_A")
    if lam.numel() != 1:
        raise ValueError(f"{ctx.file!r}: {path}.delora_lambda has shape {tuple(lam.shape)}, expected (1,)")
    return "delora", {
        "A": _leaf(A, W),
        "B": _leaf(found["delora_B"], W),
        "lam": _leaf(lam, W, ()),
        "wnorm": _leaf(found["delora_w_norm"], W),
    }


def _road_leaves(ctx: _Ctx, path: str, found: dict, W: Tensor, kind_name: str) -> tuple[str, dict]:
    variant, gs, d_out = ctx.cfg.get("variant", "road_1"), ctx.cfg.get("group_size", 64), W.shape[0]
    if variant not in ("road_1", "road_2", "road_4"):
        raise ValueError(f"{ctx.where} sets variant={variant!r}; RoAd variants are road_1, road_2, road_4")
    if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 2 or d_out % gs:
        raise ValueError(f"{ctx.where} sets group_size={gs!r}, which does not split {path!r} (d_out={d_out}) into even groups")
    G, h = d_out // gs, gs // 2
    shape = {"road_1": (G, 1, h), "road_2": (G, 2, h), "road_4": (G, 2, 2, h)}[variant]  # peft's flat order, reshaped
    for k in ("road_theta", "road_alpha"):
        if found[k].numel() != math.prod(shape):
            raise ValueError(
                f"{ctx.file!r}: {path}.{k} has {found[k].numel()} entries, but {variant} with "
                f"group_size={gs} on d_out={d_out} has {math.prod(shape)}"
            )
    return "road", {"theta": _leaf(found["road_theta"], W, shape), "alpha": _leaf(found["road_alpha"], W, shape)}


_LEAVES = {"LORA": _lora_leaves, "IA3": _ia3_leaves, "HRA": _hra_leaves, "DELORA": _delora_leaves, "ROAD": _road_leaves}


# ----------------------------------------------------------------------------- writing: params -> peft tensors
def _nice(x: float) -> float | int:
    """x rounded to 7 significant digits (an int when integral): float32 leaves give alphas like 15.9999995."""
    y = float(f"{x:.7g}")
    return int(y) if y.is_integer() and abs(y) < 2**53 else y


def _antipasto_lowrank(leaves: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A', B') with B'A' = U'S'V'ᵀ − USVᵀ at the params' current alpha (float64, then cast)."""
    p = {k: v.detach().to(torch.float64) for k, v in leaves.items()}
    U, S, V, alpha = p["U"], p["S"], p["V"], p["alpha"]
    S2 = S + alpha * p["delta_s"]
    r = S.shape[-1]

    def rotated(M: Tensor, rot: str) -> Tensor:  # M · blockdiag(R), the variant's own rotation
        if rot not in p:
            return M
        R = antipasto_variant.rotation(p[rot], alpha, p["max_angle"], r // p[rot].shape[-2])
        return block_rotate(M, R)

    # Written with differences that are exactly 0 at alpha = 0 (R = I, S' = S bit for bit), so the export of an
    # unsteered adapter is exactly the base model, and no two large terms cancel near alpha = 0.
    V2, U2 = rotated(V, "rot_v"), rotated(U, "rot_u")
    if "rot_u" not in p:  # U' = U: ΔW = U (S'V'ᵀ − SVᵀ)
        B, A = U, S2[:, None] * V2.T - S[:, None] * V.T
    elif "rot_v" not in p:  # V' = V: ΔW = (U'S' − US) Vᵀ
        B, A = U2 * S2 - U * S, V.T
    else:  # ΔW = U'S'V'ᵀ − USVᵀ = (U'S' − US) V'ᵀ + US (V' − V)ᵀ = [U'S' − US, US] · [V'ᵀ; (V' − V)ᵀ]
        B, A = torch.cat([U2 * S2 - U * S, U * S], dim=1), torch.cat([V2.T, (V2 - V).T], dim=0)
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def _lowrank(name: str, leaves: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """(A, B, s) with s·BA the variant's weight update, for the variants written as peft LoRA."""
    if name in ("lora", "eva", "dora"):
        return leaves["A"].detach(), leaves["B"].detach(), float(leaves["scale"])
    if name == "pissa":  # s·(BA − B0A0) = s·[B, −B0]·[A; A0]
        A = torch.cat([leaves["A"].detach(), leaves["A0"].detach()], dim=0)
        B = torch.cat([leaves["B"].detach(), -leaves["B0"].detach()], dim=1)
        return A, B, float(leaves["scale"])
    A, B = _antipasto_lowrank(leaves, dtype)
    return A, B, 1.0


def _pattern_keys(wanted: Mapping[str, object], default, paths: list[str]) -> dict[str, object]:
    """A peft rank_pattern / alpha_pattern giving ``wanted[path]`` for every path (``default`` elsewhere):
    module paths as keys (what peft writes) if peft's matcher resolves them exactly, else anchored regexes."""
    for anchored in (False, True):
        pattern = {("^" + re.escape(p) if anchored else p): v for p, v in wanted.items() if v != default}
        if all(_pattern_value(pattern, default, p) == wanted[p] for p in paths):
            return pattern
    raise AssertionError("anchored pattern keys always resolve exactly")  # pragma: no cover


def _target_spec(paths: list[str], model: nn.Module, cfg: dict) -> list[str] | str:
    """target_modules naming exactly ``paths``: the list of paths if peft's matcher selects exactly them, else an
    anchored regex (re.fullmatch) of the escaped paths."""
    want = set(paths)
    as_list = sorted(paths)
    if set(_target_paths({**cfg, "target_modules": as_list}, model, "save_peft")) == want:
        return as_list
    return "(" + "|".join(re.escape(p) for p in as_list) + ")"


def _peft_config(kind: str, targets: list[str], model: nn.Module, **fields) -> dict:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    cfg = {
        "peft_type": kind,
        "task_type": None,
        "base_model_name_or_path": name or None,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "modules_to_save": None,
    }
    if kind != "ROAD":
        cfg["exclude_modules"] = None
    cfg.update(fields)
    cfg["target_modules"] = _target_spec(targets, model, cfg)
    return cfg


_GROUPS = {  # lite_fn variants that one peft adapter can hold together, and the peft type they become
    "lora": "LORA",
    "eva": "LORA",
    "pissa": "LORA",
    "antipasto": "LORA",
    "dora": "LORA (use_dora)",
    "ia3": "IA3",
    "ia3_ff": "IA3",
    "hra": "HRA",
    "delora": "DELORA",
    "road": "ROAD",
}


def _export(params: dict, model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json dict, safetensors tensors) for ``params``; every refusal happens here."""
    if not isinstance(params, dict) or not params:
        raise ValueError("save_peft: params must be a non-empty dict returned by lf.init / lf.load / lf.load_peft")
    io.check_against(model, params, source="save_peft params")
    modules = dict(model.named_modules())
    layers = []  # (path, variant name, leaves, W, kind name)
    stacked = []
    for path, by_variant in params.items():
        ((name, leaves),) = by_variant.items()
        module = modules[path]
        lk = _layers.kind_of(module, path)
        W = _layers.weight_view(module, lk)
        try:
            _checks.check_leaves(path, variants.get(name), leaves, W, 0)
        except ValueError:
            stacked.append(path)
        layers.append((path, name, leaves, W, lk.name))
    if stacked:
        raise ValueError(
            f"save_peft: params are stacked (a leading adapter axis on every leaf, e.g. at {stacked[0]!r}); "
            f"a peft directory holds one adapter. Save each one: "
            f"for k, p in enumerate(lf.unstack(stacked)): lf.save_peft(f'{{path}}/{{k}}', p, model=model)"
        )
    groups = {}
    for path, name, *_ in layers:
        if name not in _GROUPS:
            raise ValueError(f"save_peft: variant {name!r} at {path!r} has no peft form")
        groups.setdefault(_GROUPS[name], []).append((name, path))
    if len(groups) > 1:
        desc = "; ".join(f"{g}: {sorted({n for n, _ in v})} (e.g. {v[0][1]!r})" for g, v in groups.items())
        raise ValueError(
            f"save_peft: these params mix variants that one peft adapter cannot hold together — {desc}. "
            f"Save each group to its own directory (e.g. {{p: v for p, v in params.items() if "
            f"next(iter(v)) == 'ia3'}})"
        )
    group = next(iter(groups))
    paths = [p for p, *_ in layers]
    conv1d = [p for p, *_, k in layers if k == "Conv1D"]
    tensors: dict[str, Tensor] = {}

    def put(path: str, suffix: str, t: Tensor) -> None:
        tensors[f"{_PREFIX}{path}.{suffix}"] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)

    if group.startswith("LORA"):
        ranks, scales = {}, {}
        for path, name, leaves, W, _ in layers:
            A, B, s = _lowrank(name, leaves, W.dtype)
            if not math.isfinite(s):
                raise ValueError(f"save_peft: {path!r} has scale {s}; peft's LoRA needs a finite scale")
            put(path, "lora_A.weight", A)
            put(path, "lora_B.weight", B)
            if name == "dora":
                put(path, "lora_magnitude_vector", leaves["m"])
            ranks[path], scales[path] = A.shape[0], s
        # alpha = s·r, or s·√r with use_rslora: whichever needs fewer alpha_pattern entries
        plain = {p: _nice(scales[p] * ranks[p]) for p in paths}
        rs = {p: _nice(scales[p] * math.sqrt(ranks[p])) for p in paths}
        use_rslora = len(set(rs.values())) < len(set(plain.values()))
        alphas = rs if use_rslora else plain
        r = Counter(ranks[p] for p in paths).most_common(1)[0][0]
        alpha = Counter(alphas[p] for p in paths).most_common(1)[0][0]
        cfg = _peft_config(
            "LORA",
            paths,
            model,
            r=r,
            lora_alpha=alpha,
            use_rslora=use_rslora,
            use_dora=group.endswith("(use_dora)"),
            fan_in_fan_out=bool(conv1d),
            bias="none",
            lora_bias=False,
            lora_dropout=0.0,
            init_lora_weights=True,
            rank_pattern=_pattern_keys(ranks, r, paths),
            alpha_pattern=_pattern_keys(alphas, alpha, paths),
            layers_to_transform=None,
            layers_pattern=None,
        )
    elif group == "IA3":
        ff = []
        for path, name, leaves, _W, _ in layers:
            g = leaves["g"].detach()
            put(path, "ia3_l", g.reshape(1, -1) if name == "ia3_ff" else g.reshape(-1, 1))
            if name == "ia3_ff":
                ff.append(path)
        cfg = _peft_config("IA3", paths, model, fan_in_fan_out=bool(conv1d), feedforward_modules=sorted(ff))
        if sorted(p for p in paths if _is_feedforward(cfg, p)) != sorted(ff):
            cfg["feedforward_modules"] = "(" + "|".join(re.escape(p) for p in sorted(ff)) + ")" if ff else []
    else:
        if conv1d:
            raise ValueError(
                f"save_peft: peft's {group} adapts torch.nn.Linear only, but {conv1d[:3]} are Conv1D layers; "
                f"peft could not load this adapter"
            )
        if group == "HRA":
            rs = {p: leaves["U"].shape[0] for p, _, leaves, *_ in layers}
            if len(set(rs.values())) > 1:
                raise ValueError(
                    f"save_peft: peft's HRA has one r for all layers (no rank_pattern), but these HRA layers "
                    f"have ranks {sorted(set(rs.values()))} (e.g. {next(iter(rs.items()))})"
                )
            for path, _, leaves, *_ in layers:
                put(path, "hra_u", leaves["U"].detach().T)
            cfg = _peft_config(
                "HRA",
                paths,
                model,
                r=next(iter(rs.values())),
                apply_GS=False,
                bias="none",
                layers_to_transform=None,
                layers_pattern=None,
            )
        elif group == "DELORA":
            ranks, lams = {}, []
            for path, _, leaves, *_ in layers:
                put(path, "delora_A", leaves["A"])
                put(path, "delora_B", leaves["B"])
                put(path, "delora_lambda", leaves["lam"].detach().reshape(1))
                put(path, "delora_w_norm", leaves["wnorm"])
                ranks[path] = leaves["A"].shape[0]
                lams.append(_nice(float(leaves["lam"].detach())))
            r = Counter(ranks.values()).most_common(1)[0][0]
            cfg = _peft_config(
                "DELORA",
                paths,
                model,
                r=r,
                rank_pattern=_pattern_keys(ranks, r, paths),
                delora_lambda=Counter(lams).most_common(1)[0][0],
                lambda_pattern={},
                module_dropout=0.0,
                bias="none",
                layers_to_transform=None,
                layers_pattern=None,
            )
        else:  # ROAD: one variant and group size for the whole adapter
            forms = {}
            for path, _, leaves, *_ in layers:
                t = leaves["theta"]
                variant = {3: {1: "road_1", 2: "road_2"}, 4: {2: "road_4"}}[t.ndim][t.shape[1]]
                forms[path] = (variant, 2 * t.shape[-1])
                put(path, "road_theta", leaves["theta"].detach().reshape(-1))
                put(path, "road_alpha", leaves["alpha"].detach().reshape(-1))
            if len(set(forms.values())) > 1:
                seen = {f: p for p, f in forms.items()}
                raise ValueError(
                    "save_peft: peft's RoAd has one variant and group_size per adapter, but these layers use "
                    + ", ".join(f"{v} group_size={g} (e.g. {p!r})" for (v, g), p in seen.items())
                )
            variant, gs = next(iter(forms.values()))
            cfg = _peft_config("ROAD", paths, model, variant=variant, group_size=gs)
    got = _target_paths(cfg, model, "save_peft")
    if sorted(got) != sorted(paths):  # never write a config that targets other modules than the tensors
        raise AssertionError(
            f"save_peft: target_modules {cfg['target_modules']!r} selects {got}, not {paths}"
        )  # pragma: no cover
    return cfg, tensors


# ----------------------------------------------------------------------------- writing: the directory
_TMP_SUFFIX = ".lite_fn-tmp"
_OURS = frozenset({_CONFIG, _WEIGHTS, _PICKLE, "README.md"})  # what a peft adapter directory holds


def _write_file(file: str, data: bytes, mode: int) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a!r} and {b!r} failed: {os.strerror(err)}")


def _remove_stale(folder: str, base: str) -> None:
    """Temp directories of this target left by writers that are no longer alive (killed mid-save)."""
    for stale in io._dead_writers_temps(folder, base):
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)


def save_peft(path, params: dict, *, model: nn.Module) -> None:
    """Write ``params`` as a peft adapter directory that ``peft.PeftModel.from_pretrained(model, path)``
    loads and that reproduces ``lf.call(model, params, ...)``.

    Args:
        path: the adapter directory to write. Its parent must exist. An existing directory is replaced
            if it holds only peft adapter files (adapter_config.json, adapter_model.safetensors / .bin,
            README.md); anything else in it is never deleted (an error names it).
        params: one adapter (not stacked) of variants peft can hold together: LoRA / rsLoRA / EVA / PiSSA /
            AntiPaSTO (written as LoRA), DoRA, IA3 + IA3-FF, HRA, DeLoRA or RoAd.
        model: the base model; checks the params, gives ``fan_in_fan_out`` (Conv1D) and
            ``base_model_name_or_path``.

    Raises:
        ValueError: stacked params, variants that one peft adapter cannot hold together (named), a layer
            type peft's method does not adapt, params that do not fit ``model``, an unusable target path.

    Returns:
        None; ``path`` holds ``adapter_config.json`` and ``adapter_model.safetensors``.

    Example:
        >>> import json, os, tempfile, torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> folder = os.path.join(tempfile.mkdtemp(), "exported")
        >>> lf.save_peft(folder, lf.init(0, model, lf.DoRAConfig(r=2)), model=model)
        >>> cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
        >>> cfg["peft_type"], cfg["use_dora"], sorted(os.listdir(folder))
        ('LORA', True, ['adapter_config.json', 'adapter_model.safetensors'])
    """
    from safetensors.torch import save as st_save

    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_peft: model must be the base nn.Module, got {type(model).__name__}")
    cfg, tensors = _export(params, model)
    blob = st_save(tensors, metadata={"format": "pt", "written_by": f"lite_fn {__version__}"})
    text = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    del tensors

    shown = os.fsdecode(os.fspath(path))
    target = os.path.realpath(shown)
    folder, base = os.path.split(target)
    if not base:
        raise ValueError(f"save_peft: {shown!r} names no directory to write")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"cannot save to {shown!r}: its parent directory {folder!r} does not exist; create it first (os.makedirs)"
        )
    umask = io._umask()
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(
                f"cannot save to {shown!r}: it is {io._file_kind(info.st_mode)}, not a directory; pass a new "
                f"or existing adapter directory"
            )
        others = sorted(set(os.listdir(target)) - _OURS)
        if others:
            raise ValueError(
                f"cannot save to {shown!r}: the directory holds {others[:6]} besides peft adapter files; "
                f"save_peft replaces the whole directory and will not delete them — use a new directory"
            )
    dir_mode = stat.S_IMODE(info.st_mode) if info is not None else 0o777 & ~umask

    _remove_stale(folder, base)
    tmp = os.path.join(folder, f".{base[: io._TMP_NAME_MAX]}.{os.getpid()}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    os.mkdir(tmp, 0o700)
    try:
        _write_file(os.path.join(tmp, _WEIGHTS), blob, 0o666 & ~umask)
        _write_file(os.path.join(tmp, _CONFIG), text, 0o666 & ~umask)
        os.chmod(tmp, dir_mode)
        io._fsync_dir(tmp)
        if info is None:
            os.rename(tmp, target)  # atomic; fails if a non-empty directory appeared meanwhile
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old adapter
        else:  # no atomic exchange here: move the old one aside, then the new one in (a short window without either)
            old = os.path.join(folder, f".{base[: io._TMP_NAME_MAX]}.{os.getpid()}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    io._fsync_dir(folder)
