"""peft's adapter directory on disk: finding it, reading its two files, writing a new one atomically.

One job: bytes in and out. A directory written by peft's ``save_pretrained`` holds
``adapter_config.json`` (the config's fields) and ``adapter_model.safetensors`` (tensors keyed
``"base_model.model." + module_path + "." + suffix``); non-default adapters sit in subfolders named
after them. A ``.bin`` (pickle) weights file is refused: unpickling runs code from the file.
Writing goes through ``lite_fn._fs.replace_dir`` (temp directory, fsync, atomic rename or exchange).
"""

from __future__ import annotations

import json
import os
import re
import stat

from torch import Tensor

from .. import _fs

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
_ADAPTER_FILES = frozenset({CONFIG, WEIGHTS, PICKLE, "README.md"})  # what a peft adapter directory holds


def adapter_dir(path, adapter_name: str | None) -> str:
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
        if base in (CONFIG, WEIGHTS, PICKLE):
            raise ValueError(f"{shown!r} is a file; pass the adapter directory that holds it: {os.path.dirname(shown) or '.'!r}")
        raise ValueError(
            f"{shown!r} is not a directory; pass the directory peft's save_pretrained wrote (it holds {CONFIG} and {WEIGHTS})"
        )
    root = os.path.isfile(os.path.join(shown, CONFIG))
    try:
        entries = sorted(os.listdir(shown))
    except OSError as e:
        raise ValueError(f"cannot list {shown!r}: {e}") from None
    subs = [d for d in entries if os.path.isfile(os.path.join(shown, d, CONFIG))]
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
            f"{shown!r} holds no {CONFIG} (nor subfolders with one), so it is not a peft adapter "
            f"directory; it contains {entries[:10]}"
        )
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a string (e.g. 'default'), got {type(adapter_name).__name__}")
    if adapter_name == "default" and root:
        return shown
    if adapter_name in subs:
        return os.path.join(shown, adapter_name)
    raise ValueError(f"no adapter named {adapter_name!r} in {shown!r}; available: {available or 'none'}")


def _read(file: str) -> bytes:
    try:
        return _fs.read_regular(file)
    except _fs.NotAFile as e:
        raise ValueError(f"{file!r} is {e.kind}, not a file") from None
    except OSError as e:
        raise FileNotFoundError(f"cannot read {file!r}: {e.strerror}") from None


def read_config(folder: str) -> tuple[str, dict]:
    """(file, the config's fields) of ``folder``'s adapter_config.json."""
    file = os.path.join(folder, CONFIG)
    raw = _read(file)
    try:
        cfg = _fs.strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{file!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file!r} holds a JSON {type(cfg).__name__}, expected an object of peft config fields")
    return file, cfg


def read_weights(folder: str) -> tuple[str, dict[str, Tensor]]:
    """(file, tensors by key) of ``folder``'s adapter_model.safetensors; a pickle file is refused."""
    from safetensors.torch import load as st_load

    file = os.path.join(folder, WEIGHTS)
    if not os.path.exists(file):
        pickle = os.path.join(folder, PICKLE)
        if os.path.exists(pickle):
            raise ValueError(
                f"{pickle!r} is a pickle file, which lite_fn does not open: unpickling executes code stored in the file. "
                f"If you trust it, convert it once to safetensors:\n"
                f"    import torch; from safetensors.torch import save_file\n"
                f"    sd = torch.load({pickle!r}, map_location='cpu', weights_only=True)\n"
                f"    save_file({{k: v.contiguous() for k, v in sd.items()}}, {file!r})"
            )
        raise FileNotFoundError(f"{folder!r} has {CONFIG} but no {WEIGHTS}; it contains {sorted(os.listdir(folder))[:10]}")
    blob = _read(file)
    try:
        tensors = st_load(blob)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{file!r} is not a readable safetensors file ({type(e).__name__}: {first})") from None
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{file!r}: tensor {k!r} has dtype {t.dtype}; peft adapter tensors are floating point")
    return file, tensors


def write_dir(path, cfg: dict, tensors: dict[str, Tensor]) -> None:
    """Write ``cfg`` and ``tensors`` as the adapter directory ``path``, replacing an existing adapter
    directory atomically; a directory holding anything but adapter files is never replaced."""
    from safetensors.torch import save as st_save

    from .._version import __version__

    blob = st_save(tensors, metadata={"format": "pt", "written_by": f"lite_fn {__version__}"})
    text = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    shown = os.fsdecode(os.fspath(path))
    target = os.path.realpath(shown)
    folder, base = os.path.split(target)
    if not base:
        raise ValueError(f"save_peft: {shown!r} names no directory to write")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"cannot save to {shown!r}: its parent directory {folder!r} does not exist; create it first (os.makedirs)"
        )
    umask = _fs.umask()
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(
                f"cannot save to {shown!r}: it is {_fs.file_kind(info.st_mode)}, not a directory; pass a new "
                f"or existing adapter directory"
            )
        others = sorted(set(os.listdir(target)) - _ADAPTER_FILES)
        if others:
            raise ValueError(
                f"cannot save to {shown!r}: the directory holds {others[:6]} besides peft adapter files; "
                f"save_peft replaces the whole directory and will not delete them — use a new directory"
            )
    _fs.replace_dir(
        target,
        {WEIGHTS: blob, CONFIG: text},
        file_mode=0o666 & ~umask,
        dir_mode=stat.S_IMODE(info.st_mode) if info is not None else 0o777 & ~umask,
        exists=info is not None,
    )
