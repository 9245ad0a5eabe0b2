"""Adapter arithmetic: peft's ``add_weighted_adapter`` as one pure function of params trees.

    merged = merge_adapters([p0, p1, p2], [0.7, -0.4, 1.3], method="cat")

n adapters, weights w = (w_1 … w_n). Each layer is merged over the adapters that target it; an adapter that
does not target a layer holds its identity there (a zero low-rank update, a gain of 1). The per-layer rule is
the one the layer's variant declares as its ``MERGE`` (a ``lite_fn._contract.MergeRule``; LoRA and EVA share the
low-rank rule, the two (IA)³ variants the gain rule); a variant without one is refused.

The methods (peft's combination types, ``METHODS``):

    cat                   exact: BA = Σ w_i ΔW_i (ΔW_i = s_i B_i A_i), rank Σ r_i, for weights of any sign
    linear                peft's: A = Σ a_i A_i, B = Σ b_i B_i, a_i b_i = w_i s_i (equal ranks; exact for one
                          adapter, otherwise with cross terms b_i a_j B_i A_j)
    ties, dare_linear, dare_ties, magnitude_prune
                          linear with TIES / DARE / magnitude pruning run on the A's and on the B's apart
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                          the best rank-k factors (truncated SVD) of the combined ΔW's
    gains ((IA)³)         g = Σ w_i g_i, "linear" only

Each formula, and the TIES / DARE combiners, is in ``lite_fn/variants/_arithmetic.py``'s docstring.

Transforms. Every method runs under ``torch.func.vmap`` over the weights (a sweep over S weight rows is one call:
trim, election and DARE masks depend on the adapters only, the svd methods batch their SVD) and is
differentiable with respect to the weights: linear-family methods except where some w_i s_i = 0 (√|·| there),
TIES / DARE / magnitude prune piecewise linear in w, the svd methods where the kept singular values of D are
distinct and apart from the first dropped one. The adapters' leaves are constants (detached, as in lf.stack).

Deviations from peft, each for a reason:
  * DARE's masks come from an explicit ``key`` (``keep_mask``: a counter-based hash of (key, layer, adapter,
    tensor), ``linalg.hash_uniform``), not from torch's global RNG — reproducible, and legal inside vmap;
  * use_rslora adapters: peft's merged adapter keeps use_rslora with lora_alpha = r, so it scales the merged
    factors by √r instead of 1; here s = 1, the update the factors were built for;
  * (IA)³ at a layer some adapters do not target: peft sums only the targeting adapters (zero for the others,
    shrinking that layer's output by the missing weights); here the others count with their identity g = 1;
  * ranks are checked per layer (peft compares the configs' r), "cat" gives rank Σ r_i of the adapters present at
    that layer (peft pads every layer with zero rows to the configs' Σ r), and svd_rank is capped at min(d_out, d_in)
    (truncating at the full rank loses nothing; peft breaks there); float16/bfloat16 SVDs run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _keys, linalg, trees, variants
from ._contract import MergeOptions, MergePresent, MergeRule
from .variants._arithmetic import COMBINERS, METHODS, keep_mask

__all__ = ["COMBINERS", "METHODS", "keep_mask", "merge_adapters"]
__test__ = {"keep_mask": keep_mask}  # its Example runs with this module's doctests

_SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")
_SIGN_METHODS = ("total", "frequency")
_WHO = "merge_adapters"


def merge_adapters(
    adapters: Sequence[trees.Params],
    weights: Sequence[float] | Tensor,
    method: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    key: _keys.Key | None = None,
    *,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> trees.Params:
    """One params tree equal to peft's ``add_weighted_adapter(adapters, weights, name, combination_type=method,
    svd_rank=…, svd_clamp=…, svd_full_matrices=…, svd_driver=…, density=…, majority_sign_method=…)``.

    Where lite_fn deviates from peft is in this module's docstring; the math of every method in
    ``lite_fn/variants/_arithmetic.py``'s.

    Args:
        adapters: n params trees ``{module_path: {variant: {leaf: Tensor}}}`` (unstacked), each layer of one
            variant across the adapters; their target sets may differ (the merge covers their union).
        weights: n finite numbers, or a 1-D floating tensor of n — also a vmapped or gradient-tracking one.
        method: one of ``METHODS`` for low-rank leaves (LoRA, EVA); "linear" for gains ((IA)³). With one
            adapter every method is "linear" (as in peft): exactly w·ΔW.
        density: the fraction kept by ties, dare_* and magnitude_prune* (required there), in (0, 1].
        majority_sign_method: TIES' sign election, "total" (sum of values) or "frequency" (sum of signs).
        svd_rank: the rank of the svd methods' result (default: the largest rank of any input layer).
        key: an int key (or 0-d integer tensor) for DARE's random masks; required by the dare_* methods.
        svd_clamp: a quantile q in [0, 1] at which the svd methods clamp the entries of A and B (peft's svd_clamp).
        svd_full_matrices: passed to ``torch.linalg.svd`` (the kept factors are the same either way).
        svd_driver: ``torch.linalg.svd``'s cuSOLVER driver ("gesvd", "gesvdj", "gesvda"), CUDA tensors only.

    Returns:
        The merged tree over the union of the adapters' layers, each layer's variant kept, leaves in the first
        adapter's dtype; trainability as each variant declares it when the weights are plain numbers (with
        tracked or vmapped weights the leaves are functions of them).

    Raises:
        ValueError / TypeError naming the bad value and a fix: an empty list, a weight count that is not n,
        non-finite weights, an unknown method or sign method, a density outside (0, 1] or missing, dare_* without
        a key, stacked trees, different variants or widths at one layer, different ranks for a linear-family
        method, a variant with no arithmetic (its name, and the methods that exist), a method its leaves lack.

    Example:
        >>> import torch, lite_fn as lf
        >>> from lite_fn.merging import merge_adapters
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> a = lf.init(0, model, lf.LoRAConfig(r=2))
        >>> b = {p: {n: {**lv, "B": torch.randn_like(lv["B"])} for n, lv in bv.items()} for p, bv in a.items()}
        >>> x = torch.randn(3, 8)
        >>> zero = merge_adapters([b, b], [1.0, -1.0], method="cat")  # a task vector minus itself
        >>> torch.allclose(lf.call(model, zero, x), model(x), atol=1e-6)
        True
        >>> sweep = torch.func.vmap(lambda w: lf.call(model, merge_adapters([a, b], w, method="svd"), x))
        >>> sweep(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])).shape  # three merges in one call
        torch.Size([3, 3, 4])
    """
    if method not in METHODS:
        raise ValueError(f"{_WHO}: method={method!r} is not one of {list(METHODS)}")
    adapters = _check_adapters(adapters)
    n = len(adapters)
    w, floor = _check_weights(weights, n)
    layers = _layers(adapters)
    opts = _options(method if n > 1 else "linear", density, majority_sign_method, svd_rank, key, layers, n, floor)
    opts = _svd_options(opts, svd_clamp, svd_full_matrices, svd_driver)
    out: trees.Params = {}
    for path, (name, rule, present) in layers.items():
        if opts.method not in rule.methods:
            raise ValueError(
                f"{_WHO}: method={opts.method!r} does not apply to layer {path!r} ({name}, {rule.what}); its methods "
                f"are {list(rule.methods)}"
            )
        out[path] = {name: rule.merge(path, present, w, opts)}
    if linalg.eager_values(w) and all(linalg.eager_values(v) for bv in out.values() for lv in bv.values() for v in lv.values()):
        trees.declared(out)  # fresh tensors: trainable as declared (tracked weights leave non-leaf results alone)
    return out


# ----------------------------------------------------------------------------- checks of the arguments
def _check_adapters(adapters) -> list[trees.Params]:
    if isinstance(adapters, dict):
        raise TypeError(f"{_WHO}: adapters must be a list of params trees, got one tree (a dict); pass [tree, ...]")
    if not isinstance(adapters, (list, tuple)):
        raise TypeError(
            f"{_WHO}: adapters must be a list of params trees (from lf.init / lf.load_peft), got {type(adapters).__name__}"
        )
    if not adapters:
        raise ValueError(f"{_WHO}: adapters is empty; pass at least one params tree")
    for i, tree in enumerate(adapters):
        if not isinstance(tree, dict) or not tree:
            raise TypeError(
                f"{_WHO}: adapters[{i}] must be a non-empty params tree {{module_path: {{variant: {{leaf: Tensor}}}}}}"
            )
        for path, by_variant in tree.items():
            if not isinstance(by_variant, dict) or len(by_variant) != 1:
                got = list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__
                raise ValueError(f"{_WHO}: adapters[{i}][{path!r}] must hold exactly one variant, got {got}")
            ((name, leaves),) = by_variant.items()
            variants.get(name)  # a KeyError naming the registered variants
            if not isinstance(leaves, dict) or not all(isinstance(v, Tensor) for v in leaves.values()):
                raise TypeError(f"{_WHO}: adapters[{i}][{path!r}][{name!r}] must be a dict {{leaf: Tensor}}")
    return list(adapters)


def _check_weights(weights, n: int) -> tuple[Tensor, torch.dtype]:
    """(w, floor): w as a 1-D tensor; the leaves' math runs in at least ``floor`` (float32 for plain numbers)."""
    if isinstance(weights, Tensor):
        if not weights.is_floating_point() or weights.ndim != 1:
            raise ValueError(
                f"{_WHO}: weights must be a 1-D floating tensor of {n} (one per adapter), got shape {tuple(weights.shape)} "
                f"dtype {weights.dtype}; sweep several weight rows with torch.func.vmap over a (S, {n}) tensor"
            )
        if weights.shape[0] != n:
            raise ValueError(f"{_WHO}: {weights.shape[0]} weights for {n} adapters; pass one weight per adapter")
        if linalg.eager_values(weights) and not bool(torch.isfinite(weights).all()):
            raise ValueError(f"{_WHO}: weights={weights.tolist()} are not all finite; pass finite merge weights")
        return weights, weights.dtype
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{_WHO}: weights must be a list of {n} numbers or a 1-D tensor, got {type(weights).__name__}")
    if len(weights) != n:
        raise ValueError(f"{_WHO}: {len(weights)} weights for {n} adapters; pass one weight per adapter")
    for i, x in enumerate(weights):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"{_WHO}: weights[{i}]={x!r} must be a finite number (e.g. 0.5, or -1.0 to subtract)")
    return torch.tensor([float(x) for x in weights], dtype=torch.float64), torch.float32


def _options(method, density, sign, svd_rank, key, layers, n: int, floor: torch.dtype) -> MergeOptions:
    if sign not in _SIGN_METHODS:
        raise ValueError(f"{_WHO}: majority_sign_method={sign!r} is not one of {list(_SIGN_METHODS)}")
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0):
        raise ValueError(f"{_WHO}: density={density!r} must be a number in (0, 1] (the fraction of entries kept, e.g. 0.5)")
    svd = method == "svd" or method.endswith("_svd")
    combiner = "" if method == "cat" else "linear" if method == "svd" else method.removesuffix("_svd")
    if combiner in ("ties", "dare_linear", "dare_ties", "magnitude_prune") and density is None:
        raise ValueError(f"{_WHO}: method={method!r} needs density= (the fraction of entries kept, in (0, 1], e.g. 0.5)")
    if combiner.startswith("dare"):
        if key is None:
            raise ValueError(
                f"{_WHO}: method={method!r} drops entries at random and needs key= (an int seed, e.g. key=0); "
                f"the same key gives the same masks"
            )
        key = _keys.as_seed(key)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(
            f"{_WHO}: svd_rank={svd_rank!r} must be a positive int (e.g. svd_rank=8) or None (the largest input rank)"
        )
    ranks = [rule.rank(lv) for _, rule, present in layers.values() if rule.rank is not None for _, lv in present]
    rank = svd_rank or max(ranks, default=1)
    return MergeOptions(method, combiner, svd, density, sign, rank, None, True, None, key, n, floor)


def _svd_options(opts: MergeOptions, clamp, full_matrices, driver) -> MergeOptions:
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0.0 <= clamp <= 1.0):
        raise ValueError(f"{_WHO}: svd_clamp={clamp!r} must be a quantile in [0, 1] (e.g. 0.99) or None (no clamping)")
    if not isinstance(full_matrices, bool):
        raise TypeError(f"{_WHO}: svd_full_matrices={full_matrices!r} must be True or False (peft's default: True)")
    if driver is not None and driver not in _SVD_DRIVERS:
        raise ValueError(
            f"{_WHO}: svd_driver={driver!r} is not one of {[None, *_SVD_DRIVERS]} (torch.linalg.svd's cuSOLVER drivers)"
        )
    return dataclasses.replace(opts, clamp=None if clamp is None else float(clamp), full_matrices=full_matrices, driver=driver)


# ----------------------------------------------------------------------------- layers and their rules
def _layers(adapters: list[trees.Params]) -> dict[str, tuple[str, MergeRule, MergePresent]]:
    """{path: (variant name, its MERGE rule, present)} over the union of the adapters' layers, checked."""
    out = {}
    for path in dict.fromkeys(p for tree in adapters for p in tree):
        present = [(i, tree[path]) for i, tree in enumerate(adapters) if path in tree]
        names = {i: next(iter(bv)) for i, bv in present}
        if len(set(names.values())) > 1:
            raise ValueError(
                f"{_WHO}: layer {path!r} holds different variants across the adapters ({names}); merge adapters "
                f"of one variant per layer"
            )
        name = names[present[0][0]]
        leaves = [(i, {k: v.detach() for k, v in bv[name].items()}) for i, bv in present]
        rule = variants.get(name).MERGE
        if rule is None:
            raise _no_arithmetic(path, name, leaves)
        rule.check(path, name, leaves)
        out[path] = (name, rule, leaves)
    return out


def _no_arithmetic(path: str, name: str, present: MergePresent) -> ValueError:
    """The refusal of a variant without a MERGE rule, listing the registered variants that have one."""
    rules: dict[int, tuple[MergeRule, list[str]]] = {}
    for spec in variants.REGISTRY.values():
        if spec.MERGE is not None:
            rules.setdefault(id(spec.MERGE), (spec.MERGE, []))[1].append(spec.NAME)
    kinds = "; ".join(f"{', '.join(sorted(ns))} ({r.what}): methods {list(r.methods)}" for r, ns in rules.values())
    i, first = present[0]
    return ValueError(
        f"{_WHO}: layer {path!r} of adapters[{i}] holds variant {name!r} with leaves {sorted(first)}, for which "
        f"no adapter arithmetic exists (the variant declares no MERGE rule; peft's add_weighted_adapter exists for "
        f"LoRA and (IA)³ only, and a magnitude, a frozen factor or a rotation does not combine linearly). Arithmetic "
        f"exists for {kinds or 'no registered variant'}; to combine other adapters, merge them into the weights one "
        f"after another with lf.merge"
    )
