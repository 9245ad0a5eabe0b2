"""peft's matcher, reproduced: which modules a peft config targets, and its ``*_pattern`` lookups.

One job: from a config read from JSON (``target_modules`` as a list, a regex string or
``"all-linear"``; ``exclude_modules``; ``layers_to_transform`` / ``layers_pattern``;
``modules_to_save``) to the module paths peft adapts, and back (``target_spec``: a
``target_modules`` value that selects exactly given paths); ``target_parameters`` (raw parameters, e.g. MoE
experts) to parameter paths and the nesting of peft's wrappers, and back (``parameter_spec``);
``modules_to_save`` to the modules peft keeps full copies of (``save_paths``); ``rank_pattern`` / ``alpha_pattern``
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
    if targets is None and cfg.get("target_parameters"):  # peft: raw parameters only (no module targets)
        return []
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


def parameter_paths(cfg: Mapping, model: nn.Module, where: str) -> list[str]:
    """The parameter paths of ``model`` that peft's ``target_parameters`` selects (tuners_utils' _inject_parameters),
    in model order: a module's own parameter whose path is a listed name or ends with ``"." + name``
    (``"mlp.experts.gate_up_proj"`` selects every layer's)."""
    names = cfg.get("target_parameters")
    if not names:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{where}: target_parameters={names!r} must be a list of parameter names (e.g. ['mlp.experts.down_proj'])"
        )
    out = []
    for mpath, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{mpath}.{pname}"
            if key in names or any(key.endswith(f".{t}") for t in names):
                if not mpath:  # peft refuses these too (wrapping the top-level module would make it its own child)
                    raise ValueError(
                        f"{where}: target_parameters={names!r} selects {pname!r}, a parameter of the top-level "
                        f"{type(model).__name__}, which peft cannot target"
                    )
                out.append(key)
    return out


def wrapper_depths(paths: list[str], model: nn.Module) -> dict[str, int]:
    """For each targeted parameter path, how many of peft's ParamWrappers sit above its own, i.e. how many
    ``base_layer.`` its tensors' keys hold after the module path: peft wraps a module's targeted parameters in the
    order the module registered them, each wrapper around the previous one, so the first is innermost."""
    by_owner: dict[str, set[str]] = {}
    for p in paths:
        owner, _, name = p.rpartition(".")
        by_owner.setdefault(owner, set()).add(name)
    out = {}
    for owner, names in by_owner.items():
        order = [n for n, _ in model.get_submodule(owner).named_parameters(recurse=False) if n in names]
        out.update({f"{owner}.{n}": len(order) - 1 - i for i, n in enumerate(order)})
    return out


def parameter_spec(paths: list[str], model: nn.Module) -> list[str]:
    """target_parameters naming exactly ``paths`` (their full paths), or a ValueError when peft's suffix matching
    would select other parameters too."""
    spec = sorted(paths)
    got = parameter_paths({"target_parameters": spec}, model, "save_peft")
    if sorted(got) != spec:
        raise ValueError(
            f"save_peft: peft's target_parameters matches names by suffix, so the paths {spec[:4]} also select "
            f"{sorted(set(got) - set(spec))[:4]}; adapt those parameters too, or none of the ones they end like"
        )
    return spec


def save_paths(cfg: Mapping, model: nn.Module, where: str) -> list[str]:
    """The module paths of ``model`` whose full copies peft's ``modules_to_save`` keeps (other.py's _set_trainable:
    a plain ``endswith`` on the model's module names, no dot), in model order; a ValueError where peft's copies would
    not be one module each (nested or shared matches)."""
    names = cfg.get("modules_to_save")
    if not names:
        return []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: modules_to_save={names!r} must be a list of module names (e.g. ['classifier'])")
    hit = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if p and any(p.endswith(n) for n in names)]
    paths = [p for p, _ in hit]
    for p, m in hit:
        outer = next((q for q in paths if p.startswith(q + ".")), None)
        if outer is not None:
            raise ValueError(
                f"{where}: modules_to_save={names!r} selects both {outer!r} and {p!r} inside it; peft's copy of "
                f"{outer!r} already holds {p!r} — name only the outer module"
            )
        twin = next((q for q, n in hit if n is m and q != p), None)
        if twin is not None:
            raise ValueError(
                f"{where}: modules_to_save={names!r} selects one module under two names ({twin!r}, {p!r}), which "
                f"lite_fn cannot copy once for both"
            )
    return paths


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
