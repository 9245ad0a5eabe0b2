"""Base weights for a forward: detached (so no gradient reaches them) or handed in (``base=``).

``swap_map`` returns ``{id(model tensor): tensor to use}``, which the injection (``_inject``)
substitutes wherever a model tensor reaches a torch function; nothing is assigned to the model.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from torch import Tensor, nn


def swap_map(model: nn.Module, base, freeze: bool) -> tuple[dict[int, Tensor], dict[int, list[str]]]:
    """(swap, aliases): ``swap`` maps id(model tensor) -> the tensor a forward should use (the
    detached weight when ``freeze``, or ``base[name]`` for a stateless model); ``aliases`` maps
    id(parameter) -> every name it has, at least for tied weights (which have several)."""
    if base is None:
        return _own_weights(model, freeze)
    aliases: dict[int, list[str]] = {}
    owners: dict[int, Tensor] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    if base is not None:
        named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        aliases.setdefault(id(t), []).append(name)
        owners[id(t)] = t
    swap: dict[int, Tensor] = {}
    if not isinstance(base, Mapping):
        raise TypeError(
            f"base must be a dict {{parameter or buffer name: Tensor}} (as torch.func.functional_call takes), got {type(base).__name__}"
        )
    known = {n for names in aliases.values() for n in names}
    extra = sorted(set(base) - known)
    if extra:
        hints = {n: difflib.get_close_matches(str(n), known, n=1) for n in extra[:5]}
        raise ValueError(
            f"base has names that are not parameters or buffers of {type(model).__name__}: "
            + ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
        )
    missing = []
    for i, names in aliases.items():
        t = owners[i]
        given = [n for n in names if n in base]
        if not given:
            if t.is_meta:
                missing.append(names[0])
            elif freeze and t.requires_grad:
                swap[i] = t.detach()
            continue
        value = base[given[0]]
        for n in given[1:]:
            if base[n] is not value:
                raise ValueError(
                    f"base[{given[0]!r}] and base[{n!r}] are different tensors, but the model ties them (one "
                    f"parameter); pass one of the two names"
                )
        if not isinstance(value, Tensor):
            raise TypeError(f"base[{given[0]!r}] is a {type(value).__name__}; pass a Tensor")
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(
                f"base[{given[0]!r}] has shape {tuple(value.shape)} but the model's {given[0]!r} has shape {tuple(t.shape)}"
            )
        swap[i] = value.detach() if freeze else value
    if missing:
        raise ValueError(
            f"base is missing {len(missing)} tensors that the model holds on the meta device: {missing[:6]}"
            f"{' …' if len(missing) > 6 else ''}. Non-persistent buffers (e.g. rotary inv_freq) are not in a state_dict: add "
            f"them, e.g. from a real model's named_buffers(). A tied weight (e.g. lm_head.weight) is missing when "
            f"the skeleton lost its ties: `.to('meta')` unties them; call skeleton.tie_weights() or build the "
            f"skeleton under `with torch.device('meta'):`"
        )
    return swap, aliases


def _own_weights(model: nn.Module, freeze: bool) -> tuple[dict[int, Tensor], dict[int, list[str]]]:
    """``swap_map`` without ``base=``: one walk over the modules' own parameter dicts (no names built);
    ``aliases`` only for parameters that have several names (ties), which is all its readers need."""
    params: list[Tensor] = []
    stack = [model]
    while stack:
        m = stack.pop()
        params.extend(t for t in m._parameters.values() if t is not None)
        stack.extend(c for c in m._modules.values() if c is not None)
    seen: dict[int, Tensor] = {}
    tied = False
    for t in params:
        tied = tied or id(t) in seen
        seen[id(t)] = t
    swap = {i: t.detach() for i, t in seen.items() if t.requires_grad and not t.is_meta} if freeze else {}
    aliases: dict[int, list[str]] = {}
    if tied:
        for name, t in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(t), []).append(name)
        aliases = {i: names for i, names in aliases.items() if len(names) > 1}
    return swap, aliases
