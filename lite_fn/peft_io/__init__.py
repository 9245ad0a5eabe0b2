"""peft interop: read and write peft adapter directories with json + safetensors only.

    params = lf.load_peft("out/my_lora", model=model)          # what PeftModel.from_pretrained(model, …) computes
    lf.save_peft("out/exported", params, model=model)           # a directory PeftModel.from_pretrained loads

peft is never imported: this package reads and writes the on-disk format that peft's
``save_pretrained`` writes and ``from_pretrained`` reads (taken from peft 0.21's sources and tested
against it). It knows no variant by name: each variant that peft can express carries its own mapping
(``PEFT = PeftCodec(...)`` in its file under ``lite_fn/variants/``: peft type, tensor suffixes, config
fields read, ignored or refused, tensors -> leaves and back), and this package loops over the
registry. Its rooms (see README.md here):

* ``_files``: the directory (``adapter_config.json`` + ``adapter_model.safetensors``, subfolders for
  named adapters), read and written atomically;
* ``_matcher``: peft's target selection (``target_modules`` as a list, a regex string or
  ``"all-linear"``; ``exclude_modules``; ``layers_to_transform`` / ``layers_pattern``) and its
  ``*_pattern`` lookups, reproduced;
* here: the generic loop — which codec reads each targeted layer, which fields may be ignored, and
  which variants one file can hold together.

Loading checks that the modules the config targets are exactly those the weights file holds, that
every config field is read by the type's codecs, ignored for a stated reason, or unset (anything
else — e.g. a field a newer peft added — is refused by name), and casts each leaf to its layer
weight's dtype and device (peft keeps fp32 adapters on a bf16 model by default, so bf16 outputs
differ from peft's by bf16 rounding). Refused for every type: trained model biases (``bias`` other
than "none"), ``modules_to_save`` matching a module, trainable tokens, LoRA on embeddings or
``nn.MultiheadAttention``, base-model weights in the file, a ``.bin`` (pickle) adapter.

Writing groups the params' variants by the peft type (and group) their codecs write — variants of
different groups cannot share one peft directory, and saying which to save apart is an error — then
each codec writes its layers' tensors and the type's format writes its config fields. Stacked params
are refused (save ``lf.unstack`` entries one by one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _checks, _layers, _plan, io, trees, variants
from .._contract import PeftCodec, PeftFormat, PeftLayer
from . import _files, _matcher

__all__ = ["load_peft", "save_peft"]

# Fields that say nothing about what the loaded adapter computes in eval mode.
_METADATA_FIELDS = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
# Fields every peft type has, judged here: modules_to_save (refused when it matches a module).
_ROOM_FIELDS = frozenset({"modules_to_save"})
# The key prefix of a format's model-level (``shared``) tensors: "base_model.vera_A".
_MODEL_PREFIX = "base_model."


def _unset(v) -> bool:
    return v is None or v is False or (isinstance(v, (dict, list, tuple, set, str)) and len(v) == 0)


def _codecs() -> list[tuple[str, PeftCodec]]:
    """(variant name, codec) of every registered variant with a peft mapping, in registry order."""
    return [(name, spec.PEFT) for name, spec in variants.REGISTRY.items() if spec.PEFT is not None]


def _readable_formats() -> dict[str, PeftFormat]:
    """peft type -> format, for the types some registered codec reads."""
    return {c.format.peft_type: c.format for _, c in _codecs() if c.read is not None}


class _FileConfig:
    """A peft config read from a file, as codecs see it (``lite_fn._contract.PeftConfig``)."""

    def __init__(self, fields: Mapping[str, Any], where: str, file: str):
        self.fields, self.where, self.file = fields, where, file
        self.dims: Mapping[str, tuple[int, int]] = {}  # set once the targeted modules are known

    def get(self, field: str, default: Any = None) -> Any:
        return self.fields.get(field, default)

    def per_path(self, pattern: str, field: str, default: Any, path: str) -> Any:
        return _matcher.pattern_value(self.fields.get(pattern) or {}, self.fields.get(field, default), path)

    def rank(self, path: str, found: int, what: str) -> int:
        r = self.per_path("rank_pattern", "r", 8, path)
        if found != r:
            raise ValueError(
                f"{self.file!r}: {path}.{what} has rank {found} but {self.where} gives r={r} for it "
                f"(rank_pattern / r); the files do not belong together"
            )
        return r


class _Writer:
    """What a format's ``config`` uses when writing (``lite_fn._contract.PeftWriter``)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def pattern(self, wanted: Mapping[str, Any], default: Any) -> dict[str, Any]:
        return _matcher.pattern_keys(wanted, default, self.paths)

    def number(self, x: float) -> float | int:
        y = float(f"{x:.7g}")
        return int(y) if y.is_integer() and abs(y) < 2**53 else y


# ----------------------------------------------------------------------------- reading
def _check_fields(cfg: _FileConfig, fmt: PeftFormat, model: nn.Module) -> None:
    """Every field is read, ignored for a stated reason, or unset; anything else is refused by name."""
    where = cfg.where
    for name, value in cfg.fields.items():
        if name in _METADATA_FIELDS or name in _ROOM_FIELDS or name in fmt.fields or name in fmt.ignores or _unset(value):
            continue
        why = fmt.refuses.get(name, "this reader does not know the field (a newer peft?) and will not ignore it")
        raise ValueError(f"{where} sets {name}={value!r}, which lite_fn cannot reproduce: {why}")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{where} sets bias={bias!r}: peft trained (and saved) the biases of the model, which lite_fn "
            f"adapters cannot hold; only bias='none' loads"
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
    fmt.check(cfg)


def _refuse_foreign_tensors(tensors: dict[str, Tensor], file: str) -> None:
    """The most telling refusals first: a LoRA on an embedding (whose base weights peft saves too)."""
    prefix = _files.PREFIX
    emb = [k for k in tensors if ".lora_embedding_" in k]
    if emb:
        target = emb[0].removeprefix(prefix).split(".lora_embedding_")[0]
        raise ValueError(
            f"{file!r}: tensor {emb[0]!r} is a LoRA on an embedding layer (target {target!r}); lite_fn adapts "
            f"nn.Linear and Conv1D layers only"
        )
    base = [k for k in tensors if ".base_layer." in k]
    mha = [k for k in base if ".base_layer.out_proj.lora_" in k]
    if mha:  # peft's LoRA on nn.MultiheadAttention: its in_proj as <target>.lora_*, out_proj under base_layer
        target = mha[0].removeprefix(prefix).split(".base_layer.")[0]
        raise ValueError(
            f"{file!r}: tensor {mha[0]!r} is peft's LoRA on an nn.MultiheadAttention (target {target!r}: its fused "
            f"in_proj and its out_proj); lite_fn does not adapt nn.MultiheadAttention — load it with peft, or target "
            f"the model's nn.Linear layers"
        )
    if base:
        raise ValueError(
            f"{file!r} holds base-model weights ({base[:3]}; peft's save_embedding_layers), which a lite_fn adapter cannot hold"
        )


def _split_key(key: str, fmt: PeftFormat, file: str) -> tuple[str, str]:
    """(module path, suffix) of a stored tensor's key."""
    prefix, kind = _files.PREFIX, fmt.peft_type
    if not key.startswith(prefix):
        raise ValueError(
            f"{file!r}: tensor {key!r} does not start with {prefix!r}; it is not a peft {kind} adapter "
            f"tensor (prompt-learning methods are not supported)"
        )
    rest = key[len(prefix) :]
    for s in fmt.suffixes:
        if rest.endswith("." + s):
            return rest[: -len(s) - 1], fmt.aliases.get(s, s)
    if "trainable_tokens" in rest or "token_adapter" in rest:
        raise ValueError(
            f"{file!r}: tensor {key!r} holds trainable tokens (trainable_token_indices), which lite_fn cannot reproduce"
        )
    raise ValueError(
        f"{file!r}: tensor {key!r} is not a peft {kind} adapter tensor lite_fn knows "
        f"(expected names ending in {list(fmt.suffixes)}); it may be a modules_to_save copy or a newer format"
    )


def _reader(cfg: _FileConfig, fmt: PeftFormat, path: str) -> tuple[str, PeftCodec]:
    """The one registered variant whose codec claims ``path`` in this file."""
    claims = [(n, c) for n, c in _codecs() if c.format is fmt and c.claims is not None and c.claims(cfg, path)]
    if len(claims) != 1:
        raise ValueError(
            f"{cfg.where}: {len(claims)} registered variants claim {path!r} of this {fmt.peft_type} adapter "
            f"({[n for n, _ in claims]}); exactly one variant's PEFT codec must read each layer"
        )
    return claims[0]


def _leaf(t: Tensor, W: Tensor) -> Tensor:
    """A leaf in W's dtype and on W's device (a meta skeleton's leaves stay where they are), owning its memory."""
    device = t.device if W.is_meta else W.device
    return t.to(dtype=W.dtype, device=device).clone(memory_format=torch.contiguous_format)


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
        ``{module_path: {variant: {leaf: Tensor}}}``, each layer as the variant whose peft codec reads
        it (LoRA files: lora, dora or pissa; IA3: ia3 or ia3_ff; HRA, DeLoRA, RoAd, OFT, BOFT, LoHa, LoKr,
        VeRA: themselves); leaves
        in each layer weight's dtype and device, trainability as each variant declares it.

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
    folder = _files.adapter_dir(path, adapter_name)
    cfg_file, fields = _files.read_config(folder)
    where = f"peft config {cfg_file!r}"
    formats = _readable_formats()
    kind = fields.get("peft_type")
    if kind not in formats:
        readers = {t: [n for n, c in _codecs() if c.format.peft_type == t and c.read is not None] for t in sorted(formats)}
        raise ValueError(
            f"{where} has peft_type={kind!r}; lite_fn reads {sorted(formats)} ("
            + "; ".join(f"{t} as {', '.join(ns)}" for t, ns in readers.items())
            + ")"
        )
    fmt = formats[kind]
    cfg = _FileConfig(fields, where, os.path.join(folder, _files.WEIGHTS))
    _check_fields(cfg, fmt, model)
    weights_file, tensors = _files.read_weights(folder)

    _refuse_foreign_tensors(tensors, weights_file)
    by_path: dict[str, dict[str, Tensor]] = {}
    shared: dict[str, Tensor] = {}  # the format's model-level tensors, handed to every layer's codec
    for key, t in tensors.items():
        if key.removeprefix(_MODEL_PREFIX) in fmt.shared:
            shared[key.removeprefix(_MODEL_PREFIX)] = t
            continue
        mpath, suffix = _split_key(key, fmt, weights_file)
        by_path.setdefault(mpath, {})[suffix] = t

    targets = _matcher.target_paths(fields, model, where)
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

    kinds = {}
    for mpath in targets:
        try:
            kinds[mpath] = _plan.resolve(model, mpath)
        except TypeError as e:
            raise ValueError(f"{where} targets {mpath!r}: {e}") from None
    dims = {}  # every target's (d_out, d_in), for codecs of shared tensors (VeRA's projections)
    for p, (m, k) in kinds.items():
        d_out, d_in = _layers.weight_view(m, k).shape[-2:]
        dims[p] = (d_out, d_in)
    cfg.dims = dims
    params: dict = {}
    for mpath in targets:  # model order
        (module, layer_kind), found = kinds[mpath], {**by_path[mpath], **shared}
        if layer_kind.name not in fmt.kinds:
            raise ValueError(
                f"{where} targets {mpath!r}, a {type(module).__name__} (lite_fn layer kind {layer_kind.name!r}); "
                f"lite_fn reads peft's {fmt.peft_type} for {sorted(fmt.kinds)} layers only"
            )
        name, codec = _reader(cfg, fmt, mpath)
        W = _layers.values(_layers.weight_view(module, layer_kind))
        layer = _layer(mpath, module, layer_kind, W, found)
        need = codec.tensors(cfg, layer)
        absent = [s for s in need if s not in found]
        unexpected = sorted(s for s in found if s not in need)
        if absent or unexpected:
            raise ValueError(
                f"{weights_file!r}: module {mpath!r} (read as {name}) "
                + "; ".join(
                    ([f"lacks tensor(s) {absent}"] if absent else [])
                    + ([f"has tensor(s) {unexpected} that {name} does not use"] if unexpected else [])
                )
                + f" (under this config, {name} at this layer holds exactly {list(need)}; the files do not belong together)"
            )
        assert codec.read is not None  # claims is set only with read
        leaves = codec.read(cfg, layer)
        params[mpath] = {name: {k: _leaf(v, W) for k, v in leaves.items()}}
    io.check_against(model, params, source=f"peft adapter {folder!r}")
    return trees.declared(params)


def _layer(path: str, module: nn.Module, kind: _layers.LayerKind, W: Tensor, tensors: dict) -> PeftLayer:
    return PeftLayer(path, kind.name, W, tensors, module, tuple(_layers.weight_of(module, kind).shape))


# ----------------------------------------------------------------------------- writing
def _export(params: dict, model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json dict, safetensors tensors) for ``params``; every refusal happens here."""
    if not isinstance(params, dict) or not params:
        raise ValueError("save_peft: params must be a non-empty dict returned by lf.init / lf.load / lf.load_peft")
    io.check_against(model, params, source="save_peft params")
    layers: list[tuple[str, PeftCodec, dict, PeftLayer]] = []  # (variant, codec, leaves, layer)
    stacked, groups = [], {}
    for path, by_variant in params.items():
        ((name, leaves),) = by_variant.items()
        spec = variants.get(name)
        module, lk = _plan.resolve(model, path)
        W = _layers.weight_view(module, lk)
        try:
            _checks.check_leaves(path, spec, leaves, W, 0)
        except ValueError:
            stacked.append(path)
        if spec.PEFT is None:
            raise ValueError(f"save_peft: variant {name!r} at {path!r} has no peft form (its file defines no PEFT codec)")
        layers.append((name, spec.PEFT, leaves, _layer(path, module, lk, W, {})))
        groups.setdefault((spec.PEFT.format.peft_type, spec.PEFT.label), []).append((name, path))
    if stacked:
        raise ValueError(
            f"save_peft: params are stacked (a leading adapter axis on every leaf, e.g. at {stacked[0]!r}); "
            f"a peft directory holds one adapter. Save each one: "
            f"for k, p in enumerate(lf.unstack(stacked)): lf.save_peft(f'{{path}}/{{k}}', p, model=model)"
        )
    if len(groups) > 1:
        desc = "; ".join(f"{label}: {sorted({n for n, _ in v})} (e.g. {v[0][1]!r})" for (_, label), v in groups.items())
        raise ValueError(
            f"save_peft: these params mix variants that one peft adapter cannot hold together — {desc}. "
            f"Save each group to its own directory (e.g. {{p: v for p, v in params.items() if "
            f"next(iter(v)) == 'ia3'}})"
        )
    fmt = layers[0][1].format
    odd = [(layer.path, layer.kind) for *_, layer in layers if layer.kind not in fmt.kinds]
    if odd:
        raise ValueError(
            f"save_peft: peft's {fmt.peft_type} is written by lite_fn for {sorted(fmt.kinds)} layers only, but "
            f"{odd[0][0]!r} is a {odd[0][1]} layer ({len(odd)} such); save the other layers, or keep this adapter in "
            f"lite_fn's own format (lf.save)"
        )
    for kind, why in fmt.refuses_kinds.items():
        hit = [layer.path for *_, layer in layers if layer.kind == kind]
        if hit:
            raise ValueError(f"save_peft: {why}, but {hit[:3]} are {kind} layers; peft could not load this adapter")
    tensors: dict[str, Tensor] = {}
    facts = []
    for _, codec, leaves, layer in layers:
        written, fact = codec.write(leaves, layer)
        for suffix, t in written.items():
            tensors[f"{_files.PREFIX}{layer.path}.{suffix}"] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        facts.append(fact)
    written_layers = [layer for *_, layer in layers]
    paths = [layer.path for layer in written_layers]
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    cfg = {
        "peft_type": fmt.peft_type,
        "task_type": None,
        "base_model_name_or_path": name or None,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "modules_to_save": None,
        **fmt.config(written_layers, facts, _Writer(paths)),
    }
    for name, t in fmt.shared_tensors(written_layers, facts).items():  # after fmt.config: it refuses first
        tensors[f"{_MODEL_PREFIX}{name}"] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    cfg["target_modules"] = _matcher.target_spec(paths, model, cfg)
    got = _matcher.target_paths(cfg, model, "save_peft")
    if sorted(got) != sorted(paths):  # never write a config that targets other modules than the tensors
        raise AssertionError(
            f"save_peft: target_modules {cfg['target_modules']!r} selects {got}, not {paths}"
        )  # pragma: no cover
    return cfg, tensors


def save_peft(path, params: dict, *, model: nn.Module) -> None:
    """Write ``params`` as a peft adapter directory that ``peft.PeftModel.from_pretrained(model, path)``
    loads and that reproduces ``lf.call(model, params, ...)``.

    Args:
        path: the adapter directory to write. Its parent must exist. An existing directory is replaced
            if it holds only peft adapter files (adapter_config.json, adapter_model.safetensors / .bin,
            README.md); anything else in it is never deleted (an error names it).
        params: one adapter (not stacked) of variants peft can hold together, as each variant's codec
            writes it: LoRA / rsLoRA / EVA / PiSSA / AntiPaSTO (written as LoRA), DoRA, IA3 + IA3-FF,
            HRA, DeLoRA, RoAd, OFT, BOFT, LoHa, LoKr or VeRA.
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_peft: model must be the base nn.Module, got {type(model).__name__}")
    cfg, tensors = _export(params, model)
    _files.write_dir(path, cfg, tensors)
