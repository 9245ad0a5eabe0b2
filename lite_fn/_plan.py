"""The layers a params tree adapts, checked against the model (one ``Entry`` each), and the plan
remembered per (model, params tree) that lets a later call on the very same objects skip those checks."""

from __future__ import annotations

import difflib
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _checks, _layers, variants
from ._contract import VariantSpec
from .trees import Params


class Entry(NamedTuple):
    path: str
    module: nn.Module
    kind: _layers.LayerKind
    variant: VariantSpec
    leaves: dict[str, Tensor]


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` through the registered children's dicts (the common case, a few
    dict lookups); anything else, and every error, goes through ``get_submodule`` itself."""
    m = model
    for part in path.split("."):
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if m is None:
            return model.get_submodule(path)
    return m


def checked_entries(
    model: nn.Module, params: Params, swap: dict[int, Tensor], aliases: dict[int, list[str]], batch_dims: int = 0
) -> tuple[list[Entry], int | None]:
    """Every layer of ``params``, checked against the model (paths, layer types, ties, exact leaves)."""
    if not isinstance(params, dict):
        raise TypeError(
            f"params must be the dict returned by lf.init ({{path: {{variant: {{leaf: Tensor}}}}}}), got {type(params).__name__}"
        )
    entries, Ks = [], {}
    for path, by_variant in params.items():
        try:
            module, kind = resolve(model, path)  # per path: no walk over the whole model each call
        except AttributeError:
            names = [p for p, _ in model.named_modules()] + [p for p, _ in model.named_parameters()]
            near = difflib.get_close_matches(path, names, n=3)
            raise KeyError(
                f"params path {path!r} is not a module or parameter of {type(model).__name__}"
                + (f"; similar paths: {near}" if near else "")
            ) from None
        if not isinstance(by_variant, dict) or len(by_variant) != 1:
            raise ValueError(
                f"params[{path!r}] must hold exactly one variant, got {list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}"
            )
        ((name, leaves),) = by_variant.items()
        own = _layers.weight_of(module, kind)
        tied = [n for n in aliases.get(id(own), []) if _confused(model, n, path, kind)]
        if tied:
            how = (
                "every use of it would see the merged weight"
                if kind.substitute
                else "an adapter on it cannot be told apart from one on the other layer"
            )
            raise ValueError(
                f"{path}.{kind.param} is tied to {tied} ({how}); untie them (give {path!r} its own weight) before adapting"
            )
        variant = variants.get(name)
        Ks[path] = _checks.check_leaves_once(
            f"params[{path!r}][{name!r}]", variant, leaves, _layers.weight_view(module, kind, swap), batch_dims
        )
        entries.append(Entry(path, module, kind, variant, leaves))
    K = None
    if batch_dims:
        if len(set(Ks.values())) > 1:
            raise ValueError(
                f"stacked params hold different numbers of adapters per layer: {Ks}; stack whole params trees with lf.stack"
            )
        K = next(iter(Ks.values()), None)
    return entries, K


def _confused(model: nn.Module, name: str, path: str, kind: _layers.LayerKind) -> bool:
    """Whether the tied name ``name`` (another place of the weight ``path`` adapts) makes the adapter ambiguous:
    a substitution kind changes every use of its weight; an op kind is recognised by its op on its weight, so only
    another layer computing the same op with it is confused with it (a tied embedding and output head are not)."""
    owner = name.rpartition(".")[0]
    if owner == path or (kind is _layers.raw_kind(kind.param) and name == path):
        return False
    if kind.substitute:
        return True
    other = model.get_submodule(owner)
    return _layers.is_adaptable(other) and _layers.kind_of(other, owner).op is kind.op


def resolve(model: nn.Module, path: str) -> tuple[nn.Module, _layers.LayerKind]:
    """(module, layer kind) of a params path: a module path (its kind), or the path of a 2-D / 3-D parameter of a
    module that is no layer kind (``….mlp.experts.gate_up_proj``: the owner and ``_layers.raw_kind``);
    AttributeError if it is neither, TypeError naming what cannot be adapted."""
    try:
        module = submodule(model, path)
    except AttributeError:
        owner_path, _, name = path.rpartition(".")
        owner = submodule(model, owner_path) if owner_path else model
        t = owner._parameters.get(name) if isinstance(owner, nn.Module) else None
        if t is None:
            raise
        return owner, raw_parameter_kind(owner, path, name, t)
    parent_path = path.rpartition(".")[0]
    parent = submodule(model, parent_path) if "." in path else model
    kind = _layers.kind_of(module, path, parent)
    if parametrize.is_parametrized(module, kind.param):
        raise TypeError(
            f"module {path!r} has a parametrized {kind.param} (torch.nn.utils.parametrize, e.g. weight_norm): it is "
            f"recomputed from its parametrization's tensors at every access, so lite_fn cannot recognise it in the "
            f"forward; exclude it from `targets`, or remove the parametrization first "
            f"(torch.nn.utils.parametrize.remove_parametrizations(module, {kind.param!r}))"
        )
    return module, kind


def raw_parameter_kind(owner: nn.Module, path: str, name: str, t: Tensor) -> _layers.LayerKind:
    """The kind of parameter ``name`` of ``owner`` targeted by its path, or a TypeError saying what to target."""
    if t.ndim not in (2, 3) or not t.is_floating_point():
        raise TypeError(
            f"parameter {path!r} has shape {tuple(t.shape)} ({t.dtype}); lite_fn adapts 2-D (d_out, d_in) and 3-D "
            f"(E, d_out, d_in) floating-point parameters only — narrow `targets` so it does not match it"
        )
    return _layers.raw_kind(name)


class _Plan(NamedTuple):
    """What ``checked_entries`` found for one params tree on one model, and what it read: weak references to
    each layer's module, weight and leaves with their metadata, so a later call can tell exactly
    whether anything it checked has changed (a leaf or module replaced, a weight cast or resized)."""

    rows: tuple  # (path, variant name, id(by-variant dict), id(leaves dict), module ref, kind, variant, weight ref, weight meta, leaf refs+meta)
    K: int | None


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], _Plan]] = weakref.WeakKeyDictionary()
_PLANS_PER_MODEL = 8


def _metadata(t: Tensor) -> tuple:
    return (t.shape, t.dtype, t.device)


def planned_entries(
    model: nn.Module, params: Params, swap: dict[int, Tensor], aliases: dict[int, list[str]], batch_dims: int = 0
) -> tuple[list[Entry], int | None]:
    """``checked_entries``, remembered per (model, params tree): a call whose params and model still hold the
    very objects (and metadata) the last check read skips the checks; anything else is checked anew.
    Tied weights (``aliases``) are always checked anew."""
    if not isinstance(params, dict) or aliases or torch.compiler.is_compiling():
        return checked_entries(model, params, swap, aliases, batch_dims)
    replayed = replayed_entries(model, params, batch_dims)
    if replayed is not None:
        return replayed
    entries, K = checked_entries(model, params, swap, aliases, batch_dims)
    rows = []
    for e in entries:
        by_variant = params[e.path]
        w = _layers.weight_of(e.module, e.kind)
        if not isinstance(w, Tensor):
            return entries, K
        leaves = tuple((k, weakref.ref(v), _metadata(v)) for k, v in e.leaves.items())
        rows.append(
            (
                e.path,
                e.variant.NAME,
                id(by_variant),
                id(e.leaves),
                weakref.ref(e.module),
                e.kind,
                e.variant,
                weakref.ref(w),
                _metadata(w),
                leaves,
            )
        )
    plans = _PLANS.setdefault(model, {})
    if len(plans) >= _PLANS_PER_MODEL:
        plans.clear()
    plans[(id(params), batch_dims)] = _Plan(tuple(rows), K)
    return entries, K


def replayed_entries(model: nn.Module, params: Params, batch_dims: int) -> tuple[list[Entry], int | None] | None:
    """The remembered entries of (model, params), if nothing they were checked on has changed."""
    plans = _PLANS.get(model) if isinstance(params, dict) and not torch.compiler.is_compiling() else None
    plan = None if plans is None else plans.get((id(params), batch_dims))
    if plan is None:
        return None
    entries = _replay(plan, model, params)
    return None if entries is None else (entries, plan.K)


def _replay(plan: _Plan, model: nn.Module, params: Params) -> list[Entry] | None:
    if len(params) != len(plan.rows):
        return None
    entries = []
    for (path, name, bv_id, leaves_id, module_ref, kind, variant, w_ref, w_meta, leaves), (p, by_variant) in zip(
        plan.rows, params.items()
    ):
        if p != path or id(by_variant) != bv_id or len(by_variant) != 1 or variants.REGISTRY.get(name) is not variant:
            return None
        ((n, current),) = by_variant.items()
        if n != name or id(current) != leaves_id or len(current) != len(leaves):
            return None
        for (k, ref, meta), (k2, v) in zip(leaves, current.items()):
            if k != k2 or ref() is not v or _metadata(v) != meta:
                return None
        try:
            if kind is _layers.raw_kind(kind.param):  # a parameter path: its owner holds it
                module = submodule(model, path.rpartition(".")[0]) if "." in path else model
            else:
                module = submodule(model, path)
        except AttributeError:  # gone: checked_entries names it
            return None
        w = getattr(module, kind.param, None)
        if module is not module_ref() or w is not w_ref() or _metadata(w) != w_meta:  # pyright: ignore[reportArgumentType]
            return None
        entries.append(Entry(path, module, kind, variant, current))
    return entries
