"""peft's matcher, reproduced: which modules a peft config targets, and its ``*_pattern`` lookups.

One job: from a config read from JSON (``target_modules`` as a list, a regex string or
``"all-linear"``; ``exclude_modules``; ``layers_to_transform`` / ``layers_pattern``;
``modules_to_save``) to the module paths peft adapts, and back (``target_spec``: a
``target_modules`` value that selects exactly given paths); ``rank_pattern`` / ``alpha_pattern``
keys as peft's ``get_pattern_key`` resolves them (taken from peft 0.21's tuners_utils.py and tested
against it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from .. import _layers


def _all_linear(model: nn.Module, cfg: Mapping) -> list[str]:
    """peft's "all-linear": every nn.Linear / Conv1D but the output head (the output embeddings, or for
    task_type SEQ_CLS without them, the first of ``score`` / ``classifier``)."""
    named = list(model.named_modules())
    names = [n for n, m in named if n and (isinstance(m, nn.Linear) or _layers.is_conv1d(m))]
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


def _in_layers(cfg: Mapping, key: str) -> bool:
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


def _targeted(cfg: Mapping, targets, key: str) -> bool:
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


def target_paths(cfg: Mapping, model: nn.Module, where: str) -> list[str]:
    """The module paths of ``model`` that peft adapts under ``cfg``, in model order."""
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


def target_spec(paths: list[str], model: nn.Module, cfg: Mapping) -> list[str] | str:
    """target_modules naming exactly ``paths``: the list of paths if peft's matcher selects exactly them,
    else an anchored regex (re.fullmatch) of the escaped paths."""
    as_list = sorted(paths)
    if set(target_paths({**cfg, "target_modules": as_list}, model, "save_peft")) == set(paths):
        return as_list
    return "(" + "|".join(re.escape(p) for p in as_list) + ")"


def pattern_value(pattern: Mapping, default, path: str):
    """peft's get_pattern_key lookup: the value of the first key k with re.match(rf"(.*\\.)?({k})$", path),
    else ``default``."""
    for k in pattern or {}:
        try:
            if re.match(rf"(.*\.)?({k})$", path):
                return pattern[k]
        except re.error as e:
            raise ValueError(f"rank_pattern / alpha_pattern key {k!r} is not a valid regex ({e})") from None
    return default


def pattern_keys(wanted: Mapping[str, object], default, paths: list[str]) -> dict[str, object]:
    """A peft ``*_pattern`` giving ``wanted[path]`` for every path (``default`` elsewhere): module paths as
    keys (what peft writes) if peft's matcher resolves them exactly, else anchored regexes."""
    for anchored in (False, True):
        pattern = {("^" + re.escape(p) if anchored else p): v for p, v in wanted.items() if v != default}
        if all(pattern_value(pattern, default, p) == wanted[p] for p in paths):
            return pattern
    raise AssertionError("anchored pattern keys always resolve exactly")  # pragma: no cover
