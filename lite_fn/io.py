"""Checkpoints: safetensors files (never pickle) with lite_fn metadata, checksummed, written atomically.

Files are written and parsed by the ``safetensors`` package (``safetensors.torch.save`` /
``load``), so any safetensors reader can open them. Tensor keys are
``f"{module_path}.{variant}.{leaf}"``. The string metadata holds:

* ``format``: ``"lite_fn/1"``; ``lite_fn_version``: the writer's version;
* ``layers``: JSON ``{module_path: {"variant": name, "config": {"class", "fields"} or null}}``;
* ``keys``: JSON ``{key: [module_path, variant, leaf, trainable]}``;
* ``sha256``: hex SHA-256 over every other metadata entry (sorted by name) and, per tensor in
  sorted key order, its key, dtype code (``F32``, …), shape and little-endian raw bytes; each
  field is fed as an 8-byte little-endian length followed by its bytes (see ``_checksum``).

Writing: ``safetensors.torch.save`` to bytes, then ``_fs.replace_file`` (temp file next to the resolved
target, fsync, ``os.replace``; a symlink is followed and kept; the new file gets the old file's mode, or
``0o666 & ~umask`` when new; temp files of killed writers are removed first — see ``lite_fn/_fs.py``).

Loading refuses anything but a regular file before opening it, parses with ``safetensors``,
checks the header layout (no overlapping, missing or trailing bytes), the metadata and the
checksum (an integrity check, not a signature), and raises ValueError naming the file on any
damage it finds: a single-bit flip anywhere in the header, or any change to names, dtypes, shapes,
bytes or metadata that the checksum sees, never loads as different params. With ``model=``, every path, layer type, leaf shape and dtype is checked against
the model (``check_against``) and all problems are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import stat
import sys
import warnings

import torch

from . import _checks, _fs, _layers, _plan, trees, variants

_FORMAT = "lite_fn/1"
_CHECKSUM = "sha256"
_REQUIRED = ("format", "lite_fn_version", "layers", "keys", _CHECKSUM)

# safetensors dtype codes of the dtypes lite_fn stores (the checksum names dtypes by these codes)
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM = {v: k for k, v in _DTYPES.items()}


class _Damaged(ValueError):
    """A checkpoint that cannot be trusted; the message already names the file."""


# ----------------------------------------------------------------------------- config metadata
def _config_json(cfg) -> dict:
    return {"class": type(cfg).__name__, "fields": dataclasses.asdict(cfg)}


def _configs_by_path(params, config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return {p: _config_json(c) for p, c in config.items() if c is not None}
    cfgs = list(config) if isinstance(config, (list, tuple)) else [config]
    cfgs_by_name: dict[str, list] = {}
    for c in cfgs:
        cfgs_by_name.setdefault(variants.module_for(c).NAME, []).append(c)
    out = {}
    for path, by_variant in params.items():
        for name in by_variant:
            found = cfgs_by_name.get(name, [])
            if len(found) > 1:
                raise ValueError(
                    f"config has {len(found)} {name} configs; pass config as a dict {{module_path: cfg}} to say which is which"
                )
            if found:
                out[path] = _config_json(found[0])
    return out


# ----------------------------------------------------------------------------- checksum
def _le_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes in little-endian order (the safetensors on-disk order), as uint8."""
    flat = t.reshape(-1).view(torch.uint8)
    size = t.element_size()
    if sys.byteorder == "big" and size > 1:
        flat = flat.reshape(-1, size).flip(1).reshape(-1)
    return flat.contiguous()


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every metadata entry but the checksum itself and every tensor's key, dtype,
    shape and bytes; each field is length-prefixed so no two different contents hash alike."""
    h = hashlib.sha256(b"lite_fn checkpoint checksum 1\n")

    def put(b) -> None:
        b = memoryview(b).cast("B")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for name in sorted(meta):
        if name != _CHECKSUM:
            put(name.encode())
            put(meta[name].encode())
    for key in sorted(tensors):
        t = tensors[key]
        put(key.encode())
        put(_DTYPES[t.dtype].encode())
        put(json.dumps(list(t.shape)).encode())
        put(_le_bytes(t).numpy() if t.numel() else b"")
    return h.hexdigest()


def _flatten(params) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors by key, keys metadata, layers variant names) of a params tree, validated."""
    if not isinstance(params, dict):
        raise TypeError(
            f"params must be the dict returned by lf.init ({{path: {{variant: {{leaf: Tensor}}}}}}), got {type(params).__name__}"
        )
    tensors, entries, names = {}, {}, {}
    for mpath, by_variant in params.items():
        if not isinstance(mpath, str):
            raise TypeError(
                f"params key {mpath!r} is a {type(mpath).__name__}; module paths are strings like 'model.layers.0.self_attn.q_proj'"
            )
        if not isinstance(by_variant, dict) or len(by_variant) != 1:
            raise ValueError(
                f"params[{mpath!r}] must hold exactly one variant, got {list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}"
            )
        ((name, leaves),) = by_variant.items()
        variants.get(name)  # KeyError naming the known variants
        if not isinstance(leaves, dict):
            raise TypeError(f"params[{mpath!r}][{name!r}] must be a dict {{leaf: Tensor}}, got {type(leaves).__name__}")
        names[mpath] = name
        for leaf, t in leaves.items():
            where = f"params[{mpath!r}][{name!r}][{leaf!r}]"
            if not isinstance(leaf, str):
                raise TypeError(f"{where}: leaf names are strings, got a {type(leaf).__name__}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} is a {type(t).__name__}, not a tensor")
            if t.dtype not in _DTYPES:
                raise TypeError(
                    f"{where} has dtype {t.dtype}, which lite_fn checkpoints cannot store; use one of "
                    f"{sorted(str(d).removeprefix('torch.') for d in _DTYPES)}"
                )
            if t.layout != torch.strided:
                raise TypeError(f"{where} is a {t.layout} tensor; save dense tensors (t.to_dense())")
            key = f"{mpath}.{name}.{leaf}"
            if key in tensors:
                raise ValueError(f"{where} and another leaf both map to the checkpoint key {key!r}; rename one of them")
            # own, contiguous CPU copies: safetensors refuses tensors that share memory
            tensors[key] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            entries[key] = [mpath, name, leaf, bool(t.requires_grad)]
    return tensors, entries, names


# ----------------------------------------------------------------------------- save
def save(path: str | os.PathLike, params: dict, *, config=None) -> None:
    """Write ``params`` to ``path``: a safetensors file (never pickle) with JSON metadata and a checksum.

    Atomic: the file is either the old one or the complete new one, also after a crash (temp file
    beside it, fsync, rename; temp files of killed writers are removed). A symlink at ``path`` is
    kept and its target rewritten; an existing file keeps its mode, a new one gets
    ``0o666 & ~umask``.

    Args:
        path: the file to write (its folder must exist).
        params: a params tree (stacked ones too).
        config: recorded in the metadata (see ``load_metadata``): a cfg, a list of cfgs (one per
            variant), or ``{module_path: cfg}``.
    Raises:
        TypeError / KeyError / ValueError naming a non-tensor leaf, an unknown variant, a dtype
        safetensors cannot store, or a directory, FIFO or device at ``path``.

    Example:
        >>> import os, tempfile, torch, lite_fn as lf
        >>> p = lf.init(0, torch.nn.Sequential(torch.nn.Linear(8, 8)), lf.LoRAConfig(r=2))
        >>> path = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
        >>> lf.save(path, p, config=lf.LoRAConfig(r=2))
        >>> torch.equal(lf.load(path)["0"]["lora"]["A"], p["0"]["lora"]["A"])
        True
    """
    from safetensors.torch import save as st_save

    from ._version import __version__

    tensors, entries, names = _flatten(params)
    cfgs = _configs_by_path(params, config)
    layers = {p: {"variant": n, "config": cfgs.get(p)} for p, n in names.items()}
    meta = {"format": _FORMAT, "lite_fn_version": __version__, "layers": json.dumps(layers), "keys": json.dumps(entries)}
    meta[_CHECKSUM] = _checksum(meta, tensors)
    blob = st_save(tensors, metadata=meta)
    del tensors

    shown = os.fspath(path)
    target = os.path.realpath(shown)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {shown!r}: directory {folder!r} does not exist; create it first (os.makedirs)")
    try:
        info = os.stat(target)
    except FileNotFoundError:
        mode = 0o666 & ~_fs.umask()
    else:
        if not stat.S_ISREG(info.st_mode):
            via = f" (the symlink's target {target!r})" if target != os.path.abspath(shown) else ""
            raise ValueError(
                f"cannot save to {shown!r}{via}: it is {_fs.file_kind(info.st_mode)}, not a regular file; "
                f"pass a file path such as {os.path.join(shown, 'adapter.safetensors')!r}"
            )
        mode = stat.S_IMODE(info.st_mode)
    _fs.replace_file(target, blob, mode)


# ----------------------------------------------------------------------------- load
def _read_bytes(path) -> tuple[str, bytes]:
    """(path as given, file contents); refuses non-regular files before opening them."""
    shown = os.fspath(path)
    if isinstance(shown, bytes):
        shown = os.fsdecode(shown)
    try:
        return shown, _fs.read_regular(shown)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no checkpoint at {shown!r}; save one with lf.save(path, params)") from None
    except _fs.NotAFile as e:
        raise ValueError(
            f"{shown!r} is {e.kind}, not a checkpoint file; pass the path of a .safetensors file written by lf.save"
        ) from None


def _header(shown: str, blob: bytes) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) from the safetensors header: 8-byte little-endian length + JSON."""
    if len(blob) < 8:
        what = "empty" if not blob else f"only {len(blob)} bytes long"
        raise _Damaged(
            f"{shown!r} is not a safetensors file: it is {what} (a safetensors file starts with an 8-byte "
            f"header length); save checkpoints with lf.save"
        )
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise _Damaged(
            f"{shown!r} is truncated or corrupt: its header length field says {n} bytes but only "
            f"{len(blob) - 8} bytes follow; the file is damaged — save it again with lf.save"
        )
    try:
        text = blob[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Damaged(f"{shown!r} has a corrupt safetensors header: not UTF-8 ({e}); the file is damaged") from None
    try:
        header = _fs.strict_json(text)
    except (ValueError, RecursionError) as e:
        raise _Damaged(f"{shown!r} has a corrupt safetensors header: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(header, dict):
        raise _Damaged(
            f"{shown!r} has a corrupt safetensors header: a JSON {type(header).__name__}, expected an object "
            f"{{tensor name: {{dtype, shape, data_offsets}}}}; the file is damaged"
        )
    meta = header.pop("__metadata__", None)
    if meta is None:
        raise _Damaged(
            f"{shown!r} is a safetensors file without lite_fn metadata, not a lite_fn checkpoint; lf.load reads "
            f"files written by lf.save (read other safetensors files with safetensors.torch.load_file)"
        )
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _Damaged(f"{shown!r} has corrupt metadata: safetensors metadata must map strings to strings; the file is damaged")
    if meta.get("format") != _FORMAT:
        raise _Damaged(
            f"{shown!r} is not a lite_fn checkpoint (metadata format {meta.get('format')!r}, expected "
            f"{_FORMAT!r}); write it with lf.save"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise _Damaged(
            f"{shown!r} is damaged or was not written by this lite_fn: its metadata lacks {missing} "
            f"(has {sorted(meta)}); save it again with lf.save"
        )
    return header, meta


def _check_layout(shown: str, blob: bytes, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor has its own bytes: intervals sorted by offset tile the data region exactly
    (no overlap, no gap, no trailing bytes), each as long as its dtype and shape need."""
    if header.keys() != tensors.keys():
        raise _Damaged(
            f"{shown!r} is damaged: header tensors {sorted(header.keys() ^ tensors.keys())} disagree with what safetensors read"
        )
    data_len = len(blob) - 8 - int.from_bytes(blob[:8], "little")
    spans = []
    for key, info in header.items():
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise _Damaged(
                f"{shown!r} is damaged: tensor {key!r} has data_offsets {offs!r}, expected [start, end] within "
                f"the {data_len} data bytes"
            )
        t = tensors[key]
        if info.get("shape") != list(t.shape) or offs[1] - offs[0] != t.numel() * t.element_size():
            raise _Damaged(
                f"{shown!r} is damaged: tensor {key!r} spans {offs[1] - offs[0]} bytes for shape "
                f"{info.get('shape')!r} {info.get('dtype')!r}"
            )
        spans.append((offs[0], offs[1], key))
    at = 0
    for start, end, key in sorted(spans):
        if start != at:
            what = "overlaps the previous tensor" if start < at else f"leaves a gap of {start - at} bytes"
            raise _Damaged(
                f"{shown!r} is damaged: tensor {key!r} at bytes [{start}, {end}) {what}; each tensor must have its own bytes"
            )
        at = end
    if at != data_len:
        raise _Damaged(f"{shown!r} is damaged: {data_len - at} trailing bytes after the last tensor")


def _keys_and_layers(shown: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    try:
        keys = _fs.strict_json(meta["keys"])
        layers = _fs.strict_json(meta["layers"])
    except (ValueError, RecursionError) as e:
        raise _Damaged(f"{shown!r} has corrupt metadata: 'keys'/'layers' is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(keys, dict) or not isinstance(layers, dict):
        raise _Damaged(f"{shown!r} has corrupt metadata: 'keys' and 'layers' must be JSON objects; the file is damaged")
    if keys.keys() != tensors.keys():
        odd = sorted(keys.keys() ^ tensors.keys())
        raise _Damaged(
            f"{shown!r} is damaged: tensors and the metadata's 'keys' disagree on {odd[:8]}"
            f"{' …' if len(odd) > 8 else ''}; save it again with lf.save"
        )
    for key, entry in keys.items():
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not all(isinstance(x, str) for x in entry[:3])
            or type(entry[3]) is not bool
        ):
            raise _Damaged(
                f"{shown!r} is damaged: metadata entry for {key!r} is {entry!r}, expected [module_path, variant, leaf, trainable]"
            )
        mpath, name, leaf, _ = entry
        if key != f"{mpath}.{name}.{leaf}":
            raise _Damaged(f"{shown!r} is damaged: key {key!r} does not join its parts {entry[:3]!r}")
        if name not in variants.REGISTRY:
            raise _Damaged(
                f"{shown!r} holds variant {name!r} (tensor {key!r}), which this lite_fn does not know; known "
                f"variants: {sorted(variants.REGISTRY)} (was it written by a newer lite_fn?)"
            )
        layer = layers.get(mpath)
        if not isinstance(layer, dict) or layer.get("variant") != name:
            raise _Damaged(
                f"{shown!r} is damaged: metadata 'layers' says {layer!r} for {mpath!r}, but tensor {key!r} is a {name} leaf"
            )
    for mpath, layer in layers.items():
        if (
            not isinstance(layer, dict)
            or not isinstance(layer.get("variant"), str)
            or not (layer.get("config") is None or isinstance(layer.get("config"), dict))
        ):
            raise _Damaged(
                f"{shown!r} is damaged: metadata 'layers' entry for {mpath!r} is {layer!r}, expected "
                f"{{'variant': name, 'config': {{...}} or null}}"
            )
    return keys, layers


def _read_checkpoint(path) -> tuple[str, dict[str, str], dict, dict, dict[str, torch.Tensor]]:
    """(path, metadata, keys, layers, tensors) of a verified checkpoint; ValueError naming the file otherwise."""
    from safetensors.torch import load as st_load

    shown, blob = _read_bytes(path)
    try:
        header, meta = _header(shown, blob)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # frombuffer on read-only bytes; we copy below
                raw = st_load(blob)
        except MemoryError:
            raise
        except Exception as e:
            raise _Damaged(
                f"{shown!r} is corrupt: safetensors cannot read it ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged"
            ) from None
        for key, t in raw.items():
            if t.dtype not in _FROM.values():
                raise _Damaged(
                    f"{shown!r}: tensor {key!r} has dtype {t.dtype}, which lite_fn checkpoints do not hold; "
                    f"the file is damaged or not written by lf.save"
                )
        _check_layout(shown, blob, header, raw)
        keys, layers = _keys_and_layers(shown, meta, raw)
        if _checksum(meta, raw) != meta[_CHECKSUM]:
            raise _Damaged(
                f"{shown!r} is damaged: checksum mismatch (its metadata records sha256 "
                f"{meta[_CHECKSUM][:16]!r}…, its contents hash differently); restore it from a good copy "
                f"or save it again"
            )
    except (_Damaged, MemoryError):
        raise
    except Exception as e:
        raise _Damaged(f"{shown!r} is damaged or not a lite_fn checkpoint ({type(e).__name__}: {e})") from None
    return shown, meta, keys, layers, raw


def load_metadata(path) -> dict:
    """The checkpoint's metadata: lite_fn version and, per module path, its variant and config.

    Args:
        path: a file written by ``save``.
    Returns:
        ``{"lite_fn_version": str, "layers": {module_path: {"variant": name, "config": {...} | None}}}``.
    Raises:
        FileNotFoundError / ValueError naming the file: the whole file is verified (checksum
        included) as in ``load``.

    Example:
        >>> import os, tempfile, torch, lite_fn as lf
        >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> lf.save(path, lf.init(0, torch.nn.Sequential(torch.nn.Linear(8, 8)), lf.IA3Config()), config=lf.IA3Config())
        >>> lf.load_metadata(path)["layers"]["0"]["variant"]
        'ia3'
    """
    _, meta, _, layers, _ = _read_checkpoint(path)
    return {"lite_fn_version": meta["lite_fn_version"], "layers": layers}


def load(path, *, model=None, device=None) -> dict:
    """Params saved by ``save``: bit-identical, contiguous tensors owning their memory.

    Args:
        path: a file written by ``save``; a non-regular file (FIFO, device, directory) is refused
            before it is opened.
        model: if given, the params are checked against it like ``check_against`` (every path, layer
            type, exact leaf shape, dtype and device; stacked checkpoints too), all problems at once.
        device: move the tensors there.
    Returns:
        The params tree, trainable leaves (the variant's ``TRAINABLE``) with ``requires_grad=True``.
    Raises:
        FileNotFoundError, or ValueError naming the file and what is wrong: not a lite_fn file, a
        damaged header or data (checksum), or params that do not fit ``model``.

    Example:
        >>> import os, tempfile, torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> lf.save(path, lf.init(0, model, lf.LoRAConfig(r=2)))
        >>> sorted(lf.load(path, model=model)["0"]["lora"])
        ['A', 'B', 'scale']
    """
    shown, _, keys, _, raw = _read_checkpoint(path)
    params: dict = {}
    for key, (mpath, name, leaf, _) in keys.items():  # trainability: the variant's declaration (TRAINABLE)
        t = raw[key].clone(memory_format=torch.contiguous_format)  # own memory, not a view of the file bytes
        if device is not None:
            t = t.to(device)
        if t.is_floating_point():
            t.requires_grad_(trees.is_trainable(name, leaf))
        params.setdefault(mpath, {}).setdefault(name, {})[leaf] = t
    if model is not None:
        check_against(model, params, source=f"checkpoint {shown!r}")
    return params


# ----------------------------------------------------------------------------- check_against
def _dtype_problems(where: str, leaves: dict, W: torch.Tensor) -> list[str]:
    return [
        f"{where}[{k!r}] has dtype {v.dtype} but the layer's weight is {W.dtype}; cast the params or the model to one dtype"
        for k, v in leaves.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != W.dtype
    ]


def _layer_problems(layers: list, batch_dims: int) -> list[str]:
    problems, Ks = [], {}
    for mpath, where, variant, leaves, W in layers:
        try:
            Ks[mpath] = _checks.check_leaves(where, variant, leaves, W, batch_dims)
        except TypeError as e:
            problems.append(str(e))
        except ValueError as e:
            problems.append(str(e))
            problems += _dtype_problems(where, leaves, W)  # check_leaves stops at the shape problem
    if batch_dims and len(set(Ks.values())) > 1:
        problems.append(
            f"stacked leaves hold different numbers of adapters per layer: {Ks}; stack whole params trees with lf.stack"
        )
    return problems


def check_against(model, params, source="params") -> None:
    """Raise one ValueError naming ``source`` and every problem of ``params`` for ``model``: paths
    that are not modules, modules lite_fn cannot adapt, unknown variants, and leaves that are not
    exactly (shape, floating dtype, device) what the variant needs for the layer's weight.

    Stacked params (``lf.stack``: one leading adapter axis K on every leaf) are recognised: the
    leaves are first checked as one adapter; if that fails and every leaf has at least one
    dimension, they are checked as stacked, and the reading with fewer problems is reported (one
    reading for the whole tree, never a mix)."""

    if not isinstance(params, dict):
        raise TypeError(
            f"params must be the dict returned by lf.init or lf.load ({{path: {{variant: {{leaf: Tensor}}}}}}), "
            f"got {type(params).__name__}"
        )
    modules = dict(model.named_modules())
    problems, layers = [], []
    for mpath, by_variant in params.items():
        try:
            module, kind = _plan.resolve(model, mpath) if isinstance(mpath, str) else (None, None)
        except AttributeError:
            module, kind = None, None
        except TypeError as e:
            problems.append(str(e))
            continue
        if module is None or kind is None:
            near = difflib.get_close_matches(str(mpath), list(modules), n=3)
            problems.append(f"{mpath}: no such module in {type(model).__name__}" + (f" (similar paths: {near})" if near else ""))
            continue
        if not isinstance(by_variant, dict) or len(by_variant) != 1:
            problems.append(
                f"params[{mpath!r}] must hold exactly one variant, got {list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}"
            )
            continue
        ((name, leaves),) = by_variant.items()
        if name not in variants.REGISTRY:
            problems.append(f"params[{mpath!r}]: unknown variant {name!r}; known variants: {sorted(variants.REGISTRY)}")
            continue
        W = _layers.weight_view(module, kind)
        layers.append((mpath, f"params[{mpath!r}][{name!r}]", variants.get(name), leaves, W))

    reading = _layer_problems(layers, 0)
    stacked = False
    if (
        reading
        and layers
        and all(
            isinstance(v, torch.Tensor) and v.ndim >= 1
            for *_, leaves, _ in layers
            if isinstance(leaves, dict)
            for v in leaves.values()
        )
    ):
        as_stacked = _layer_problems(layers, 1)
        if len(as_stacked) < len(reading):
            reading, stacked = as_stacked, True
    problems += reading
    if problems:
        how = " (read as stacked params with a leading adapter axis)" if stacked else ""
        raise ValueError(
            f"{source} does not match {type(model).__name__}{how}; {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
