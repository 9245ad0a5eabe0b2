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
differ from peft's by bf16 rounding). Beside any type's adapters it reads ``target_parameters`` (raw
parameters, e.g. MoE experts, keyed by their paths), ``modules_to_save`` (full copies: the full variant) and
trained biases (``bias="all"`` / ``"<type>_only"``: an adapted layer's in its codec, if it has a leaf for it,
any other layer's as a full copy of its bias); see "parameters, full copies, biases" below. Refused for
every type: a trained tensor no leaf holds (a norm's bias), trainable tokens, LoRA on ``nn.MultiheadAttention``,
base-model weights in the file, a ``.bin`` (pickle) adapter.

Writing groups the params' variants by the peft type (and group) their codecs write — variants of
different groups cannot share one peft directory, and saying which to save apart is an error — then
each codec writes its layers' tensors and the type's format writes its config fields; full copies go beside
them into any type's file (``modules_to_save``, ``bias="all"``). Stacked params are refused (save
``lf.unstack`` entries one by one).
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
    return {c.format.peft_type: c.format for _, c in _codecs() if c.read is not None and c.format.peft_type}


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
    if not (bias in ("none", "all") or (isinstance(bias, str) and bias.endswith("_only"))):
        raise ValueError(f"{where} sets bias={bias!r}; peft's values are 'none', 'all' and '<type>_only' (e.g. 'lora_only')")
    to_save = cfg.get("modules_to_save")
    if to_save:
        names = [to_save] if isinstance(to_save, str) else list(to_save)
        hit = [p for p, _ in model.named_modules() if p and any(p.endswith(m) for m in names)]
        if hit and _aside() is None:
            raise ValueError(
                f"{where} sets modules_to_save={to_save!r}, which matches {hit[:4]} of "
                f"{type(model).__name__}: peft trained full copies of those modules, which lite_fn "
                f"adapters cannot hold (pass their saved weights with lf.call(..., base=...) if you need them)"
            )
    fmt.check(cfg)


def _refuse_foreign_tensors(tensors: dict[str, Tensor], file: str, fmt: PeftFormat) -> None:
    """The most telling refusals first: a LoRA on an embedding in a type that has none, on nn.MultiheadAttention."""
    prefix = _files.PREFIX
    emb = [k for k in tensors if ".lora_embedding_" in k and not k.endswith(tuple("." + s for s in fmt.suffixes))]
    if emb:
        target = emb[0].removeprefix(prefix).split(".lora_embedding_")[0]
        raise ValueError(
            f"{file!r}: tensor {emb[0]!r} is a LoRA on an embedding layer (target {target!r}), which a peft "
            f"{fmt.peft_type} adapter never holds"
        )
    base = [k for k in tensors if ".base_layer." in k]
    mha = [k for k in base if ".base_layer.out_proj.lora_" in k]
    if mha:  # peft's LoRA on nn.MultiheadAttention: its in_proj as <target>.lora_*, out_proj under base_layer
        target = mha[0].removeprefix(prefix).split(".base_layer.")[0]
        raise ValueError(
            f"{file!r}: tensor {mha[0]!r} is peft's LoRA on an nn.MultiheadAttention (target {target!r}: its fused "
            f"in_proj and its out_proj), which lite_fn cannot reproduce: peft 0.21 adds the out_proj update twice in "
            f"every forward and merge (W + 2·s·BA; huggingface/peft#3774), so which math a file means depends on the "
            f"peft version — load it with peft, or target the model's nn.Linear layers"
        )
    if base:
        raise ValueError(
            f"{file!r} holds base-model weights ({base[:3]}; peft's save_embedding_layers), which a lite_fn adapter cannot "
            f"hold; if they are the model's own (an embedding LoRA without a resized vocabulary), save the adapter with "
            f"save_pretrained(..., save_embedding_layers=False)"
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
        VeRA: themselves), a raw parameter of ``target_parameters`` under its path (one adapter per expert
        of a 3-D one), and the full copies of ``modules_to_save`` / ``bias="all"`` as ``full``; leaves
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

    module_targets = _matcher.target_paths(fields, model, where)
    parameters = _matcher.parameter_paths(fields, model, where)  # target_parameters: raw parameters (MoE experts)
    tensors = _unwrapped(tensors, parameters, model, fmt)
    aside, base_biases = _read_aside(tensors, cfg, model, weights_file, module_targets + parameters)
    _refuse_foreign_tensors(tensors, weights_file, fmt)
    by_path: dict[str, dict[str, Tensor]] = {}
    shared: dict[str, Tensor] = {}  # the format's model-level tensors, handed to every layer's codec
    for key, t in tensors.items():
        if key.removeprefix(_MODEL_PREFIX) in fmt.shared:
            shared[key.removeprefix(_MODEL_PREFIX)] = t
            continue
        mpath, suffix = _split_key(key, fmt, weights_file)
        by_path.setdefault(mpath, {})[suffix] = t

    targets = module_targets + parameters
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
        if mpath in base_biases:  # bias="all" / "<type>_only": the target's own bias, trained
            found[BASE_BIAS] = base_biases[mpath]
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
        if BASE_BIAS in found and BASE_BIAS not in need:  # a codec without a leaf for it: only an untrained one loads
            _untrained_bias(
                found.pop(BASE_BIAS), getattr(module, "bias", None), f"{where}: {mpath!r} (read as {name}) has a bias"
            )
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
    params.update(_aside_params(aside, cfg, model, params))
    io.check_against(model, params, source=f"peft adapter {folder!r}")
    return trees.declared(params)


def _layer(path: str, module: nn.Module, kind: _layers.LayerKind, W: Tensor, tensors: dict) -> PeftLayer:
    return PeftLayer(path, kind.name, W, tensors, module, tuple(_layers.weight_of(module, kind).shape))


# ----------------------------------------------------------------------------- parameters, full copies, biases
# peft's LoRA on raw parameters (target_parameters) keeps one ParamWrapper per parameter, nested when a module has
# several: the keys of all of them start with the module's path, the inner ones with "base_layer." once per wrapper
# around them (``_matcher.wrapper_depths``). Here they are keyed by the parameter path, as lite_fn's params are.
#
# Beside its type's adapters a peft file may hold full copies of modules (modules_to_save: "<module>.<key>" for every
# key of the module's state_dict, peft's ModulesToSaveWrapper) and trained biases (bias="all": every "<module>.bias"
# of the model, an adapted layer's as "<path>.base_layer.bias"; "<type>_only": the adapted layers' only). The room
# reads and writes them for the registered variant whose codec has no peft type of its own (its format's
# ``peft_type`` is "": lite_fn's full copy), by role: "weight" in the layer's dense (d_out, d_in) view, and "bias".
# An adapted layer's trained bias goes to its own codec as the tensor BASE_BIAS, if the codec lists it (LoRA's bias
# leaf holds it); a tensor no full copy holds (a norm's weight, a buffer) must be the model's own.
BASE_BIAS = "base_layer.bias"  # peft's key (after the layer path) of an adapted layer's own bias


def _aside() -> tuple[str, PeftCodec] | None:
    """(variant name, codec) of the registered variant written beside any type's adapter (full copies), if any."""
    return next(((n, c) for n, c in _codecs() if not c.format.peft_type), None)


def _stem(path: str, depths: dict[str, int]) -> str:
    """The key stem of a layer's tensors: its path, or for a parameter its module's path and peft's wrapper nesting."""
    if path not in depths:
        return path
    return path.rpartition(".")[0] + ".base_layer" * depths[path]


def _stored(t: Tensor) -> Tensor:
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _unwrapped(tensors: dict[str, Tensor], parameters: list[str], model: nn.Module, fmt: PeftFormat) -> dict[str, Tensor]:
    """``tensors`` with the keys of peft's nested ParamWrappers ("<module>.base_layer.lora_A.weight") keyed by their
    parameter paths ("<module>.<parameter>.lora_A.weight")."""
    prefix = _files.PREFIX
    for p, depth in _matcher.wrapper_depths(parameters, model).items():
        for s in fmt.suffixes:
            t = tensors.pop(f"{prefix}{_stem(p, {p: depth})}.{s}", None)
            if t is not None:
                tensors[f"{prefix}{p}.{s}"] = t
    return tensors


def _holder(model: nn.Module, key: str) -> tuple[str, str, _layers.LayerKind] | None:
    """(lite_fn path, role, layer kind) of the full copy that holds the model tensor ``key`` (a state_dict key), or
    None: a layer's weight or bias, or a 2-D / 3-D parameter of a module that is no layer kind, has one."""
    owner, _, name = key.rpartition(".")
    try:
        _, kind = _plan.resolve(model, owner)
    except (AttributeError, TypeError):  # no layer kind: the parameter by its path
        try:
            _, kind = _plan.resolve(model, key)
        except (AttributeError, TypeError):
            return None
        return key, "weight", kind
    if name == kind.param:
        return owner, "weight", kind
    if name == kind.bias_param:
        return owner, "bias", kind
    return None


def _untrained_bias(t: Tensor, own, what: str) -> None:
    """A tensor of the file that no leaf holds: it must equal the model's own value, bit for bit."""
    same = isinstance(own, Tensor) and not own.is_meta and own.shape == t.shape
    if not (same and torch.equal(t.to(own.dtype).cpu(), own.detach().cpu())):
        raise ValueError(
            f"{what} {tuple(t.shape)} that differs from the model's, which no lite_fn leaf holds there: full copies "
            f"(modules_to_save, bias='all') hold the weights and biases of layers lite_fn adapts ({_layers.KIND_NAMES}) "
            f"and 2-D / 3-D parameters (not 1-D ones such as a norm's bias), and an adapted layer's own bias is held by "
            f"LoRA only (its bias leaf); load it with peft, or train without it"
        )


def _read_aside(
    tensors: dict[str, Tensor], cfg: _FileConfig, model: nn.Module, file: str, targets: list[str]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Takes the full copies (modules_to_save) and trained biases out of ``tensors``: ({lite_fn path: {role: tensor}},
    {adapted layer path: its trained bias})."""
    prefix, bias = _files.PREFIX, cfg.get("bias", "none")
    roles: dict[str, dict[str, Tensor]] = {}

    def hold(key: str, t: Tensor, own, what: str) -> None:
        found = _holder(model, key)
        if found is None:
            owner = type(model.get_submodule(key.rpartition(".")[0])).__name__
            _untrained_bias(t, own, f"{file!r}: {what} {key!r} (of a {owner}) is a tensor")
            return
        path, role, kind = found
        roles.setdefault(path, {})[role] = kind.dense(t) if role == "weight" else t

    for m in _matcher.save_paths(cfg.fields, model, cfg.where):
        inside = [p for p in targets if p == m or p.startswith(m + ".")]
        if inside:
            raise ValueError(
                f"{cfg.where}: modules_to_save keeps a full copy of {m!r}, but the config also adapts {inside[:3]} in it; "
                f"one layer holds one lite_fn variant (peft itself never adapts a module inside its copies)"
            )
        for k, own in model.get_submodule(m).state_dict(keep_vars=True).items():
            key = f"{prefix}{m}.{k}"
            if key not in tensors:
                raise ValueError(
                    f"{file!r} lacks {key!r}: peft's modules_to_save copy of {m!r} holds its whole state_dict; the files "
                    f"do not belong together (or {type(model).__name__} is not the model the adapter was trained for)"
                )
            t = tensors.pop(key)
            hold(f"{m}.{k}", t, own, "the modules_to_save copy")
            if bias != "none":  # bias="all" also saved the copy's own biases inside peft's wrapper: the same values,
                tensors.pop(f"{prefix}{m}.original_module.{k}", None)  # and the original's (unused while it is on)
                twin = tensors.pop(f"{prefix}{m}.modules_to_save.{k}", None)
                if twin is not None and not torch.equal(twin, t):
                    raise ValueError(f"{file!r}: {key!r} and its copy inside peft's wrapper differ; the file is inconsistent")
    base: dict[str, Tensor] = {}
    if bias != "none":
        adapted = set(targets)
        for key in [k for k in tensors if k.startswith(prefix) and k.endswith(".bias")]:
            q = key[len(prefix) : -len(".bias")]
            if q.endswith(".base_layer") and q[: -len(".base_layer")] in adapted:
                base[q[: -len(".base_layer")]] = tensors.pop(key)
                continue
            if bias != "all" or not q or q in adapted:
                continue  # not peft's: the generic key check names it
            try:
                module = model.get_submodule(q)
            except AttributeError:
                continue
            hold(f"{q}.bias", tensors.pop(key), getattr(module, "bias", None), "the trained bias")
    return roles, base


def _aside_params(roles: dict[str, dict[str, Tensor]], cfg: _FileConfig, model: nn.Module, params: dict) -> dict:
    """The full copies' params: each path as the variant written beside any type, its leaves in the weight's dtype."""
    if not roles:
        return {}
    found = _aside()
    if found is None:  # pragma: no cover - the library's own full copy is registered
        raise ValueError(f"{cfg.where} holds full copies of {sorted(roles)[:3]}, but no registered variant holds them")
    name, codec = found
    out = {}
    for path, tensors in roles.items():
        module, kind = _plan.resolve(model, path)
        if path in params or kind.name not in codec.format.kinds:
            why = "it is adapted too" if path in params else f"lite_fn copies {sorted(codec.format.kinds)} only"
            raise ValueError(f"{cfg.where}: a full copy of {path!r} ({kind.name}) cannot load: {why}")
        W = _layers.values(_layers.weight_view(module, kind))
        assert codec.read is not None  # the full copy's codec reads
        leaves = codec.read(cfg, _layer(path, module, kind, W, tensors))
        out[path] = {name: {k: _leaf(v, W) for k, v in leaves.items()}}
    return out


def _write_aside(
    aside: list[tuple[str, PeftCodec, dict, PeftLayer]],
    adapted: list[PeftLayer],
    model: nn.Module,
    fmt: PeftFormat,
    cfg: dict,
    tensors: dict[str, Tensor],
) -> None:
    """The full copies beside the adapter: modules_to_save copies of their modules (a parameter's: its module's), and
    a layer's trained bias alone as bias="all" (where the type's config has the field and the layer's bias is peft's
    ``<module>.bias``); sets cfg's modules_to_save and bias and adds the tensors."""
    if not aside:
        return
    entries = []  # (path, kind, is a parameter path, roles)
    for name, codec, leaves, layer in aside:
        _, kind = _plan.resolve(model, layer.path)
        if layer.kind not in codec.format.kinds:
            raise ValueError(
                f"save_peft: {layer.path!r} holds a full copy ({name}) of a {layer.kind} layer; peft's modules_to_save "
                f"copies of it are written for {sorted(codec.format.kinds)} only"
            )
        roles, _ = codec.write(leaves, layer)
        entries.append((layer.path, kind, kind is _layers.raw_kind(kind.param), roles))
    alone = {p for p, kind, raw, roles in entries if set(roles) == {"bias"} and kind.bias_param == "bias" and not raw}
    if "bias" not in fmt.fields:
        alone = set()
    mods = sorted({p.rpartition(".")[0] if raw else p for p, kind, raw, roles in entries if p not in alone})
    mods = [m for m in mods if not any(m.startswith(q + ".") for q in mods)]

    def home(p: str) -> str | None:
        return next((m for m in mods if p == m or p.startswith(m + ".")), None)

    inside = [layer.path for layer in adapted if home(layer.path) is not None]
    if inside:
        raise ValueError(
            f"save_peft: {inside[:3]} are adapted ({fmt.peft_type}) inside {home(inside[0])!r}, which holds a full copy "
            f"(peft's modules_to_save copies the whole module and adapts nothing in it); save them apart"
        )
    states = {m: {k: v.detach() for k, v in model.get_submodule(m).state_dict(keep_vars=True).items()} for m in mods}
    for p, kind, raw, roles in entries:
        m = home(p)
        if m is None:  # a trained bias alone
            tensors[f"{_files.PREFIX}{p}.bias"] = _stored(roles["bias"])
            cfg["bias"] = "all"
            continue
        rel = p[len(m) + 1 :]
        names = {"weight": "" if raw else kind.param, "bias": None if raw else kind.bias_param}
        for role, t in roles.items():
            own = None if names[role] is None else states[m].get(".".join(filter(None, (rel, names[role]))))
            if own is None:
                raise ValueError(f"save_peft: {p!r} has a {role!r} leaf, but its module has no {role} to copy")
            states[m][".".join(filter(None, (rel, names[role])))] = kind.store(t, own) if role == "weight" else t
    for m, state in states.items():
        for k, t in state.items():
            tensors[f"{_files.PREFIX}{m}.{k}"] = _stored(t)
    if mods:
        cfg["modules_to_save"] = mods
        got = _matcher.save_paths(cfg, model, "save_peft")
        if got != [m for m in got if m in mods] or sorted(got) != mods:
            raise ValueError(
                f"save_peft: peft's modules_to_save matches module names by suffix (no dot), so {mods[:4]} would also "
                f"copy {sorted(set(got) - set(mods))[:4]}; give those a full copy too, or none of the ones they end like"
            )


# ----------------------------------------------------------------------------- writing
def _export(params: dict, model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json dict, safetensors tensors) for ``params``; every refusal happens here."""
    if not isinstance(params, dict) or not params:
        raise ValueError("save_peft: params must be a non-empty dict returned by lf.init / lf.load / lf.load_peft")
    io.check_against(model, params, source="save_peft params")
    layers: list[tuple[str, PeftCodec, dict, PeftLayer]] = []  # (variant, codec, leaves, layer)
    aside: list[tuple[str, PeftCodec, dict, PeftLayer]] = []  # the same, of variants written beside any type
    raw_paths: list[str] = []
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
        if not spec.PEFT.format.peft_type:  # no type of its own (full copies): written beside the adapter
            aside.append((name, spec.PEFT, leaves, _layer(path, module, lk, W, {})))
            continue
        layers.append((name, spec.PEFT, leaves, _layer(path, module, lk, W, {})))
        if lk is _layers.raw_kind(lk.param):  # a raw parameter: peft's target_parameters
            raw_paths.append(path)
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
    if not layers:
        raise ValueError(
            f"save_peft: params hold only full copies ({[layer.path for *_, layer in aside][:4]}); a peft adapter "
            f"needs at least one layer adapted by a peft type (e.g. LoRA) beside its modules_to_save"
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
    depths = _matcher.wrapper_depths(raw_paths, model)  # peft's nested ParamWrappers: the keys' base_layer prefixes
    for _, codec, leaves, layer in layers:
        written, fact = codec.write(leaves, layer)
        for suffix, t in written.items():
            tensors[f"{_files.PREFIX}{_stem(layer.path, depths)}.{suffix}"] = _stored(t)
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
    _write_aside(aside, [layer for *_, layer in layers], model, fmt, cfg, tensors)
    cfg["target_modules"] = _matcher.target_spec([p for p in paths if p not in depths], model, cfg)
    if depths:
        cfg["target_parameters"] = _matcher.parameter_spec(list(depths), model)
    got = _matcher.target_paths(cfg, model, "save_peft") + _matcher.parameter_paths(cfg, model, "save_peft")
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
            HRA, DeLoRA, RoAd, OFT, BOFT, LoHa, LoKr or VeRA (LoRA also on raw parameters, as
            ``target_parameters``), with any number of full copies (``lf.FullConfig``: written as
            ``modules_to_save`` of their modules, a bias alone as ``bias="all"``).
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
