"""Checkpoints: safetensors files (never pickle) with JSON metadata, written atomically.

The safetensors layout is small enough to write here (8-byte little-endian header size, a
JSON header of {key: {dtype, shape, data_offsets}} plus "__metadata__", then raw bytes), so
saving needs no extra dependency; the files load with the ``safetensors`` package too.
Keys are ``f"{module_path}.{variant}.{leaf}"``; metadata records each key's parts, whether it
is trainable, the lite_fn version, and each path's variant and config when given.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile

import torch

from . import variants

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM = {v: k for k, v in _DTYPES.items()}
_FORMAT = "lite_fn/1"


def _config_json(cfg) -> dict:
    return {"class": type(cfg).__name__, "fields": dataclasses.asdict(cfg)}


def _configs_by_path(params, config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return {p: _config_json(c) for p, c in config.items() if c is not None}
    cfgs = list(config) if isinstance(config, (list, tuple)) else [config]
    by_variant = {}
    for c in cfgs:
        by_variant.setdefault(variants.module_for(c).NAME, []).append(c)
    out = {}
    for path, bv in params.items():
        for name in bv:
            found = by_variant.get(name, [])
            if len(found) > 1:
                raise ValueError(f"config has {len(found)} {name} configs; pass config as a dict {{module_path: cfg}} to say which is which")
            if found:
                out[path] = _config_json(found[0])
    return out


def save(path: str | os.PathLike, params: dict, *, config=None) -> None:
    """Write ``params`` to ``path`` (safetensors). ``config``: a cfg, a list of cfgs (one per
    variant), or ``{module_path: cfg}``, recorded in the metadata. Atomic: temp file + rename."""
    from . import __version__

    entries, header, offset, blobs = {}, {}, 0, []
    cfgs = _configs_by_path(params, config)
    layers = {}
    for mpath, bv in params.items():
        for name, leaves in bv.items():
            variants.get(name)
            layers[mpath] = {"variant": name, "config": cfgs.get(mpath)}
            for leaf, t in leaves.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"params[{mpath!r}][{name!r}][{leaf!r}] is a {type(t).__name__}, not a tensor")
                if t.dtype not in _DTYPES:
                    raise TypeError(f"params[{mpath!r}][{name!r}][{leaf!r}] has dtype {t.dtype}, which safetensors cannot store")
                key = f"{mpath}.{name}.{leaf}"
                data = t.detach().to("cpu").contiguous()
                raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
                header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
                entries[key] = [mpath, name, leaf, bool(t.requires_grad)]
                blobs.append(raw)
                offset += len(raw)
    header["__metadata__"] = {
        "format": _FORMAT, "lite_fn_version": __version__,
        "layers": json.dumps(layers), "keys": json.dumps(entries),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lite_fn-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for raw in blobs:
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path!r} is not a safetensors file (only {len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError(f"{path!r} is truncated: header claims {n} bytes, file has {len(blob) - 8}")
    try:
        header = json.loads(blob[8:8 + n])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} has a corrupt safetensors header: {e}") from e
    meta = header.pop("__metadata__", {}) or {}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path!r} is not a lite_fn checkpoint (metadata format {meta.get('format')!r}, expected {_FORMAT!r}); write it with lf.save")
    return blob[8 + n:], header, meta


def load_metadata(path) -> dict:
    """The checkpoint's metadata: lite_fn version and, per module path, its variant and config."""
    _, _, meta = _read(path)
    return {"lite_fn_version": meta["lite_fn_version"], "layers": json.loads(meta["layers"])}


def load(path, *, model=None, device=None) -> dict:
    """Params saved by ``save``, bit-identical, with trainability restored. With ``model``, every
    path and leaf shape is checked against it and all mismatches are reported together."""
    data, header, meta = _read(path)
    keys = json.loads(meta["keys"])
    if set(keys) != set(header):
        raise ValueError(f"{path!r}: tensors {sorted(set(header) ^ set(keys))} are not described by its metadata; the file is damaged")
    params: dict = {}
    for key, (mpath, name, leaf, trainable) in keys.items():
        info = header[key]
        if info["dtype"] not in _FROM:
            raise ValueError(f"{path!r}: tensor {key!r} has unsupported dtype {info['dtype']}")
        dtype = _FROM[info["dtype"]]
        start, end = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * torch.empty((), dtype=dtype).element_size() or end > len(data):
            raise ValueError(f"{path!r}: tensor {key!r} has {end - start} bytes for shape {shape} {info['dtype']}; the file is damaged")
        buf = bytearray(data[start:end])
        t = torch.frombuffer(buf, dtype=dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
        if device is not None:
            t = t.to(device)
        params.setdefault(mpath, {}).setdefault(name, {})[leaf] = t.requires_grad_(trainable) if t.is_floating_point() else t
    if model is not None:
        check_against(model, params, source=os.fspath(path))
    return params


def check_against(model, params, source="params") -> None:
    """Raise one ValueError naming every path missing from ``model`` and every layer whose
    params do not fit its weight (probed with one zero input row)."""
    from . import _layers

    modules = dict(model.named_modules())
    problems = []
    for mpath, bv in params.items():
        if mpath not in modules:
            problems.append(f"{mpath}: no such module in {type(model).__name__}")
            continue
        try:
            W, b = _layers.weight_bias(modules[mpath], mpath)
        except TypeError as e:
            problems.append(str(e))
            continue
        for name, leaves in bv.items():
            mod = variants.get(name)
            try:
                with torch.no_grad():
                    y = mod.apply(leaves, W.detach(), torch.zeros(1, W.shape[1], dtype=W.dtype, device=W.device), None if b is None else b.detach())
                if tuple(y.shape) != (1, W.shape[0]):
                    raise RuntimeError(f"output shape {tuple(y.shape)}, expected (1, {W.shape[0]})")
            except (RuntimeError, ValueError) as e:
                shapes = {k: tuple(v.shape) for k, v in leaves.items()}
                problems.append(f"{mpath}: {name} leaves {shapes} do not fit weight {tuple(W.shape)} ({str(e).splitlines()[0]})")
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}:\n  " + "\n  ".join(problems))
