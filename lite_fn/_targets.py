"""Which modules of a model a ``targets`` pattern selects (what ``lf.target_paths`` answers)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from . import _layers, _plan

# Output heads and embedding-like names never targeted by default.
HEADS_AND_EMBEDDINGS = re.compile(r"(^|\.)(lm_head|embed_out|embed_tokens|wte|wpe|score|classifier|pooler(\.dense)?|cls\..*)$")


def select(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """The module (or parameter) paths ``targets`` selects, each checked to be something lite_fn can adapt
    (see ``lf.target_paths``)."""
    modules = dict(model.named_modules())
    if targets is None:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        usable = {p: m for p, m in modules.items() if m is not head and not HEADS_AND_EMBEDDINGS.search(p)}
        paths = [p for p, m in usable.items() if _layers.is_linear(m)]
        if not paths:  # a model without linear layers (a ConvNet): its convolutions
            paths = [p for p, m in usable.items() if _layers.is_conv(m)]
        if not paths:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear / Conv1D / convolution layers to adapt; pass `targets` explicitly"
            )
    else:
        paths = _matching_paths(model, modules, targets)
    for p in paths:
        _plan.resolve(model, p)  # TypeError naming anything lite_fn cannot adapt
    return paths


def _matching_paths(model, modules, targets) -> list[str]:
    patterns = [targets] if isinstance(targets, str) else list(targets)
    try:
        compiled = [re.compile(t) for t in patterns]
    except (re.error, TypeError) as e:
        raise ValueError(f"targets={targets!r} is not a regex or a list of regexes: {e}") from e
    paths = [p for p in modules if p and any(c.search(p) for c in compiled)]
    # parameter paths (MoE experts' fused gate_up_proj, or a weight the model uses outside its layer's call): those
    # whose module is not itself selected
    chosen = set(paths)
    paths += [p for p, _ in model.named_parameters() if any(c.search(p) for c in compiled) and p.rpartition(".")[0] not in chosen]
    if not paths:
        linear = [p for p, m in modules.items() if _layers.is_adaptable(m)][:8]
        raise ValueError(
            f"targets={targets!r} matches no module or parameter of {type(model).__name__}; layers look like {linear}"
        )
    return paths
