"""Operations on params trees: stacking, steering, and the trainable/frozen split.

A params tree is ``{module_path: {variant_name: {leaf: Tensor}}}``. Which leaves are trained is
declared once by each variant (``TRAINABLE``); ``trainable``, ``partition``, ``stack`` and
``unstack`` derive from that declaration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from . import linalg, variants
from .variants import _padding

Params = dict[str, dict[str, dict[str, Tensor]]]


def tree_map(fn, tree, *rests) -> Any:
    """optree.tree_map over params trees (typed loosely: a params tree is a nested dict of tensors)."""
    return optree.tree_map(fn, tree, *rests)  # pyright: ignore[reportArgumentType]


def stack(params_list: Sequence[Params], pad: bool = False) -> Params:
    """K param trees -> one tree with a leading axis K on every leaf (for ``vmap`` or ``route=``).

    Args:
        params_list: K params trees. Without ``pad`` they must have equal structure and leaf shapes.
        pad: also stack adapters of different ranks and different target sets, padded so that every
            adapter computes exactly what it computed alone:

            * rank: zero rank rows/columns — LoRA, EVA, DoRA (its norm ‖W + s·BA‖ is unchanged), PiSSA
              (A, B, A0, B0); DeLoRA with λ rescaled to λ·r'/r (its λ/r factor counts rows); AntiPaSTO
              with zero singular directions and identity blocks (equal block sizes only);
            * a layer an adapter does not target gets that variant's identity: LoRA-family zeros (the
              scale, DeLoRA's λ and norms taken from another adapter at that layer), IA3/IA3-FF g = 1,
              RoAd θ = 0, α = 1, AntiPaSTO another adapter's frozen U, S, V with δs = 0 and no rotation
              (the identity at any alpha, which stays the adapter's own);
            * RoAd layers of the same group size but different forms are lifted exactly to the larger
              form (road_1 → road_2 → road_4), and a missing AntiPaSTO rotation side is a zero rotation.

            Refused, naming the variant: HRA with different ranks or target sets (a reflection of a
            zero vector is undefined, and a pair of equal reflections is the identity only up to
            rounding), a DoRA layer missing from an adapter (its identity needs m = ‖W‖_row, the
            model's weights), different variants at one layer, and anything else that cannot be made
            equal exactly. Padded leaves keep trainability from each variant's ``TRAINABLE``.

    Returns:
        The stacked tree: every leaf of shape (K, ...), in the (union of) layers of the inputs. A frozen
        leaf equal in all K adapters is held once (a stride-0 view of one copy: K VeRA, PiSSA or
        AntiPaSTO adapters share their frozen projections and factors instead of holding K copies);
        do not write into stacked leaves in place (``lf.unstack`` gives owned copies).

    Raises:
        ValueError: trees that differ in structure or shapes (without ``pad``), or cannot be padded exactly.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> a = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^0$")
        >>> b = lf.init(1, model, lf.LoRAConfig(r=4), targets=r"^(0|2)$")
        >>> stacked = lf.stack([a, b], pad=True)  # ranks 2 and 4, different layers
        >>> tuple(stacked["0"]["lora"]["A"].shape), tuple(stacked["2"]["lora"]["B"].shape)
        ((2, 4, 8), (2, 4, 4))
        >>> lf.call(model, stacked, torch.randn(2, 8), route=torch.tensor([1, 0])).shape
        torch.Size([2, 4])
    """
    if not params_list:
        raise ValueError("lf.stack needs at least one params tree")
    if pad:
        params_list = _padded(list(params_list))
    first = params_list[0]
    spec = optree.tree_structure(first)  # pyright: ignore[reportArgumentType]
    for i, p in enumerate(params_list[1:], 1):
        other = optree.tree_structure(p)  # pyright: ignore[reportArgumentType]
        if other != spec:
            raise ValueError(
                f"params #{i} has a different structure than params #0 (paths/variants/leaves must match): {other} vs {spec}"
            )

    out: Params = {}
    for path, by_variant in first.items():
        out[path] = {}
        for name, leaves in by_variant.items():
            frozen = leaves.keys() - variants.get(name).TRAINABLE
            out[path][name] = {
                leaf: _stacked_leaf([p[path][name][leaf] for p in params_list], shared=leaf in frozen) for leaf in leaves
            }
    return declared(out)


def _stacked_leaf(xs: list[Tensor], shared: bool) -> Tensor:
    """The K leaves on a leading axis. A frozen leaf equal in every adapter (VeRA's random projections,
    PiSSA's exact-SVD factors, AntiPaSTO's U, S, V) is held once: a stride-0 view of one private copy
    (K adapters then cost one copy of it; vmap and route= read it like any stacked leaf)."""
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ValueError(
            f"cannot stack leaves of shapes {sorted(shapes)}; all adapters must have equal shapes (same r, same targets)"
        )
    first = xs[0].detach()
    if shared and all(x is xs[0] or (x.dtype == first.dtype and torch.equal(x.detach(), first)) for x in xs[1:]):
        return first.clone().unsqueeze(0).expand(len(xs), *first.shape)
    return torch.stack([x.detach() for x in xs])


def _padded(params_list: list[Params]) -> list[Params]:
    """The K trees made equal in structure and shapes, each computing exactly what it did (see ``stack``)."""
    K = len(params_list)
    paths: dict[str, None] = {}
    for i, p in enumerate(params_list):
        if not isinstance(p, dict):
            raise TypeError(f"lf.stack: params #{i} is a {type(p).__name__}, not a params dict")
        for path, by_variant in p.items():
            if not isinstance(by_variant, dict) or len(by_variant) != 1:
                raise ValueError(
                    f"params #{i}[{path!r}] must hold exactly one variant, got "
                    f"{list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}"
                )
            paths.setdefault(path)

    def own(k: int, name: str, leaf: str):
        for by_variant in params_list[k].values():
            if name in by_variant and leaf in by_variant[name]:
                return by_variant[name][leaf]
        return None

    out: list[Params] = [{} for _ in range(K)]
    for path in paths:
        present = {k: p[path] for k, p in enumerate(params_list) if path in p}
        names = {k: next(iter(by_variant)) for k, by_variant in present.items()}
        if len(set(names.values())) > 1:
            raise ValueError(
                f"lf.stack(pad=True): layer {path!r} holds different variants across adapters "
                f"({ {k: n for k, n in names.items()} }); padding keeps one variant per layer — stack "
                f"adapters of one method per layer"
            )
        name = next(iter(names.values()))
        leaves = {k: by_variant[name] for k, by_variant in present.items()}
        shapes = {k: {leaf: tuple(v.shape) for leaf, v in lv.items()} for k, lv in leaves.items()}
        if len(present) == K and all(s == shapes[0] for s in shapes.values()):
            padded = leaves
        elif (pad_hook := variants.get(name).pad) is not None:
            padded = pad_hook(path, leaves, K, lambda k, leaf, name=name: own(k, name, leaf))
        else:
            _padding.refuse(
                name,
                path,
                f"the variant has no pad hook, and the adapters differ there (shapes {shapes}, "
                f"present in adapters {sorted(present)} of {K})",
            )
        after = {k: {leaf: tuple(v.shape) for leaf, v in padded[k].items()} for k in range(K)}
        if any(s != after[0] for s in after.values()):
            _padding.refuse(name, path, f"its leaves differ in more than the rank: {after}")
        for k in range(K):
            out[k][path] = {name: padded[k]}
    return out


def unstack(stacked: Params) -> list[Params]:
    """Inverse of ``stack``: K params trees, each leaf a copy (contiguous, trainability as declared).

    Args:
        stacked: a tree whose every leaf has the same leading axis K.
    Returns:
        The K trees.
    Raises:
        ValueError: leaves with different leading sizes (not a stacked tree).

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> ps = [lf.init(k, model, lf.LoRAConfig(r=2)) for k in range(3)]
        >>> back = lf.unstack(lf.stack(ps))
        >>> len(back), torch.equal(back[2]["0"]["lora"]["A"], ps[2]["0"]["lora"]["A"])
        (3, True)
    """
    leaves: list[Tensor] = optree.tree_leaves(stacked)  # pyright: ignore[reportArgumentType]
    if not leaves:
        raise ValueError("lf.unstack: the params tree has no leaves")
    sizes = {tuple(v.shape[:1]) for v in leaves}
    if len(sizes) != 1 or () in sizes:
        raise ValueError(
            f"lf.unstack: leaves have leading sizes {sorted(sizes)}; a stacked tree (lf.stack) has one "
            f"leading adapter axis K on every leaf"
        )
    K = leaves[0].shape[0]
    return [declared(tree_map(lambda v: v[k].detach().clone(), stacked)) for k in range(K)]


def with_alpha(params: Params, alpha: float | Tensor) -> Params:
    """A copy of ``params`` with every steering leaf (AntiPaSTO's alpha) set to ``alpha``.

    Args:
        params: a params tree holding at least one steerable variant (stacked or not).
        alpha: a finite number or a 0-d floating tensor — also a vmapped one:
            ``vmap(lambda a: lf.call(model, lf.with_alpha(p, a), x))(alphas)`` sweeps in one call.
    Returns:
        A tree new at every level (the caller's dicts are never shared); leaves other than alpha
        are the same tensors. Stacked params keep their leading axis.
    Raises:
        ValueError: a non-finite, non-numeric, boolean or non-scalar alpha, or no steerable variant.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> p = lf.init(0, model, lf.AntiPaSTOConfig(r=4, block_size=2))
        >>> x = torch.randn(3, 8)
        >>> torch.equal(lf.call(model, lf.with_alpha(p, 0.0), x), model(x))  # alpha = 0: the base, bit for bit
        True
    """
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point() or alpha.ndim != 0:
            raise ValueError(
                f"with_alpha: alpha must be a finite number or a 0-d floating tensor, got a tensor of shape "
                f"{tuple(alpha.shape)} dtype {alpha.dtype}; sweep several values with vmap over a 1-D tensor"
            )
        if linalg.eager_values(alpha) and not bool(torch.isfinite(alpha)):
            raise ValueError(f"with_alpha: alpha={alpha.item()} is not finite; pass a finite steering coefficient (e.g. 1.0)")
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"with_alpha: alpha={alpha!r} must be a finite number (e.g. 0.5) or a 0-d floating tensor")
    if not isinstance(params, dict):
        raise TypeError(f"with_alpha: params must be the dict returned by lf.init, got {type(params).__name__}")
    out, found = {}, False
    for path, by_variant in params.items():
        out[path] = {}
        for name, leaves in by_variant.items():
            leaves = dict(leaves)
            leaf = variants.get(name).STEERING_LEAF
            if leaf is not None and leaf in leaves:
                found = True
                old = leaves[leaf]
                a = alpha.to(old.dtype) if isinstance(alpha, Tensor) else torch.tensor(float(alpha), dtype=old.dtype)
                leaves[leaf] = torch.ones_like(old) * a
            out[path][name] = leaves
    if not found:
        raise ValueError("with_alpha: params contain no steerable variant (e.g. AntiPaSTO); nothing to set")
    return out


def is_trainable(variant_name: str, leaf: str) -> bool:
    """Whether ``leaf`` of a variant is trained: the variant's ``TRAINABLE`` declaration says so."""
    return leaf in variants.get(variant_name).TRAINABLE


def declared(params: Params) -> Params:
    """``params`` with ``requires_grad`` set on each leaf from its variant's declaration (in place)."""
    for by_variant in params.values():
        for name, leaves in by_variant.items():
            for leaf, v in leaves.items():
                if v.is_floating_point() and v.is_leaf:
                    v.requires_grad_(is_trainable(name, leaf))
    return params


def trainable(params: Params) -> list[Tensor]:
    """The leaves an optimizer should see: those each variant declares trainable (``TRAINABLE``).

    Args:
        params: a params tree (stacked or not).
    Returns:
        The trainable leaves, in tree order (frozen ones — scales, SVD bases, PiSSA's A0/B0 — never).

    Example:
        >>> import torch, lite_fn as lf
        >>> p = lf.init(0, torch.nn.Sequential(torch.nn.Linear(8, 8)), lf.LoRAConfig(r=2))
        >>> opt = torch.optim.AdamW(lf.trainable(p), lr=1e-3)
        >>> [tuple(t.shape) for t in lf.trainable(p)]
        [(2, 8), (8, 2)]
    """
    return [
        v
        for by_variant in params.values()
        for name, leaves in by_variant.items()
        for leaf, v in leaves.items()
        if is_trainable(name, leaf)
    ]


def partition(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two trees with the same paths, each holding its half of the leaves.

    For ``torch.func.grad``: differentiate with respect to the trainable half only, and put the
    halves back together with ``combine`` inside the loss.

    Args:
        params: a params tree.
    Returns:
        (trainable, frozen), split by each variant's ``TRAINABLE`` declaration.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 2))
        >>> train, frozen = lf.partition(lf.init(0, model, lf.LoRAConfig(r=2)))
        >>> sorted(train["0"]["lora"]), sorted(frozen["0"]["lora"])
        (['A', 'B'], ['scale'])
        >>> x = torch.randn(4, 8)
        >>> grads = torch.func.grad(lambda t: lf.call(model, lf.combine(t, frozen), x).sum())(train)
        >>> tuple(grads["0"]["lora"]["B"].shape)
        (2, 2)
    """

    def split(keep):
        return {
            path: {
                name: {leaf: v for leaf, v in leaves.items() if is_trainable(name, leaf) == keep}
                for name, leaves in by_variant.items()
            }
            for path, by_variant in params.items()
        }

    return split(True), split(False)


def combine(trainable_part: Params, frozen_part: Params) -> Params:
    """Inverse of ``partition`` (works on the gradient-tracking tensors torch.func.grad passes).

    Args:
        trainable_part, frozen_part: the two halves (any paths present in either).
    Returns:
        One params tree with the leaves of both.

    Example:
        >>> import torch, lite_fn as lf
        >>> p = lf.init(0, torch.nn.Sequential(torch.nn.Linear(8, 2)), lf.LoRAConfig(r=2))
        >>> sorted(lf.combine(*lf.partition(p))["0"]["lora"])
        ['A', 'B', 'scale']
    """
    out = {}
    for p in frozen_part.keys() | trainable_part.keys():
        out[p] = {}
        for n in frozen_part.get(p, {}).keys() | trainable_part.get(p, {}).keys():
            out[p][n] = {**frozen_part.get(p, {}).get(n, {}), **trainable_part.get(p, {}).get(n, {})}
    return out
