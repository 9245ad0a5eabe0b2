"""(IA)³, input side — Liu et al. 2022, arXiv 2205.05638 (peft: tuners/ia3, is_feedforward=True).

    y = (x ⊙ g) Wᵀ + b

    g (d_in,) = 1;  trainable

peft uses this form for the layers listed in ``feedforward_modules`` (the FFN down-projection):
the input is scaled, the bias passes through unscaled (peft's merge leaves it alone too).
Identity at init: g = 1.

On a convolution the layer's (d_out, d_in) view is the flattened kernel (out, in/groups · ∏k), so ``lf.init``'s g
has one gain per (input channel, kernel position) of that view, shared by the groups. peft's IA3 on an nn.Conv2d /
nn.Conv3d scales the input channels instead (x ⊙ ia3_l, ia3_l of shape (1, in, 1, 1[, 1])): one gain per input
channel. That parameterization is kept as its own leaf, so that training a loaded peft adapter trains peft's
parameters (not ∏k independent copies of each):

    g_channel (groups, in/groups);  trainable  (instead of g; from lf.load_peft, or by hand:
                                                torch.ones(conv.groups, conv.in_channels // conv.groups))
    W'[o, (c, p)] = W[o, (c, p)] · g_channel[j(o), c],   b' = b
        (c: input channel within the group, p: kernel position, j(o): the group of output channel o)

which is x ⊙ g on the layer's input for any stride, padding (mode), dilation and groups, as peft computes it.
load_peft reads peft's conv vectors as g_channel. save_peft writes g_channel, and a g on a convolution whose gains
are equal over each channel's kernel positions (e.g. at init: it repeats them over the groups); any other g on a
convolution is refused (peft has one gain per input channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys
from .._contract import MergeOptions, MergePresent, MergeRule, PeftCodec, PeftConfig, PeftLayer, never_random
from . import _arithmetic, _padding
from .ia3 import PEFT_IA3, conv_dims, conv_vector, is_feedforward, ones_gain, peft_gain

# the variant contract; other names are shared helpers
__all__ = [
    "MERGE",
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "IA3FFConfig",
    "apply",
    "apply_input",
    "init",
    "merged",
    "pad",
    "random_init",
    "shapes",
]
NAME = "ia3_ff"
TRAINABLE = frozenset({"g", "g_channel"})  # leaves an optimizer updates (g_channel: peft's per-channel conv form)

random_init = never_random  # init draws no random numbers


@dataclass(frozen=True)
class IA3FFConfig:
    variant_name: ClassVar[str] = NAME


Config = IA3FFConfig


def init(key: _keys.Key, W: Tensor, cfg: IA3FFConfig, statistic=None) -> dict[str, Tensor]:
    return ones_gain(W, "in", "ia3_ff.init")


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in): one gain per input feature (g), or the per-channel form
    g_channel (groups, channels), whose groups divide d_out and channels d_in."""
    if "g_channel" not in leaves or "g" in leaves:
        return {"g": (d_in,)}
    shape = tuple(leaves["g_channel"])
    if len(shape) != 2:
        return {"g_channel": (1, d_in)}  # one group, one kernel position per channel: the nearest fitting form
    G, C = shape
    if G < 1 or C < 1 or d_out % G or d_in % C:
        raise ValueError(
            f"ia3_ff: g_channel of shape {shape} does not fit W of shape ({d_out}, {d_in}): it is (groups, input channels "
            f"per group), so {G} must divide d_out={d_out} and {C} must divide d_in={d_in} (a convolution's "
            f"in_channels/groups · ∏kernel)"
        )
    return {"g_channel": shape}


def _leaf(leaves: dict) -> str:
    return "g_channel" if "g_channel" in leaves else "g"


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): an adapter that does not target the layer gets gains of 1 (of the present form)."""
    _padding.same_leaf_names(NAME, path, present)
    name = _leaf(present[min(present)])
    sizes = {k: tuple(v[name].shape) for k, v in present.items()}
    if len(set(sizes.values())) > 1:
        _padding.refuse(NAME, path, f"the adapters' {name} differ in shape there ({sizes}); stack adapters of one model")
    donor = present[min(present)][name]
    return {k: present[k] if k in present else {name: torch.ones_like(donor).detach()} for k in range(K)}


def _channel_scaled(W: Tensor, g: Tensor) -> Tensor:
    """W'[o, (c, p)] = W[o, (c, p)] · g[j(o), c] for g (G, C): W (d_out, d_in) seen as (G, d_out/G, C, d_in/C)."""
    G, C = g.shape
    Wg = W.unflatten(0, (G, -1)).unflatten(-1, (C, -1))  # (G, o/G, C, P)
    return (Wg * g[:, None, :, None]).reshape(W.shape)


def merged(params: dict[str, Tensor], W: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W diag(g), b): the dense layer ``apply`` computes (peft's merge scales W's input columns, not the bias);
    for g_channel each output group's columns by its channels' gains."""
    if "g_channel" in params:
        return _channel_scaled(W, params["g_channel"]), b
    return W * params["g"], b  # (o, i) ⊙ (i,)


def apply_input(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """x ⊙ g: all this variant does (the layer itself then computes (x ⊙ g) Wᵀ + b).

    Raises:
        ValueError: g_channel with more than one group: each output group sees its own input gains there (a
        grouped convolution's form), which no single transform of x expresses.
    """
    if "g" in params:
        return x * params["g"]  # (..., i) ⊙ (i,)
    g = params["g_channel"]  # (G, C)
    if g.shape[0] != 1:
        raise ValueError(
            f"ia3_ff: g_channel of shape {tuple(g.shape)} gives each of {g.shape[0]} output groups its own input gains "
            f"(peft's IA3 on a grouped convolution): that is no transform of the input alone; use it on the grouped "
            f"convolution it was loaded for"
        )
    return (x.unflatten(-1, (g.shape[1], -1)) * g[0, :, None]).flatten(-2)  # each channel's gain on its kernel inputs


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "ia3_ff.apply")
    if "g_channel" in params and params["g_channel"].shape[0] != 1:
        W_new, b = merged(params, W, b)
        return torch.nn.functional.linear(x, W_new, b)
    return torch.nn.functional.linear(apply_input(params, x), W, b)


# ----------------------------------------------------------------------------- adapter arithmetic
# _arithmetic.GAIN (g = Σ w_i g_i) on either form: g_channel is combined as its flattened gains, in its shape.
def _flat(present: MergePresent) -> MergePresent:
    return [(i, {"g": lv["g_channel"].flatten(-2) if "g_channel" in lv else lv["g"]}) for i, lv in present]


def _merge_check(path: str, name: str, present: MergePresent) -> None:
    forms = {i: _leaf(lv) for i, lv in present}
    if len(set(forms.values())) > 1:
        raise ValueError(
            f"merge_adapters: layer {path!r} has ia3_ff adapters in both forms ({forms}: g per input feature, "
            f"g_channel per input channel of a convolution); merge adapters of one form"
        )
    if "g_channel" in forms.values():
        for i, lv in present:
            if set(lv) != {"g_channel"} or lv["g_channel"].ndim != 2:
                raise ValueError(
                    f"merge_adapters: adapters[{i}][{path!r}][{name!r}] has leaves "
                    f"{ {k: tuple(v.shape) for k, v in lv.items()} }; the per-channel form is one leaf g_channel "
                    f"(groups, channels), unstacked (merge lf.unstack(stacked) entries)"
                )
        sizes = {i: tuple(lv["g_channel"].shape) for i, lv in present}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"merge_adapters: layer {path!r} has g_channel of shapes {sizes}; merge adapters of one model")
    _arithmetic.GAIN.check(path, name, _flat(present))


def _merge(path: str, present: MergePresent, w: Tensor, opts: MergeOptions) -> dict[str, Tensor]:
    g = _arithmetic.GAIN.merge(path, _flat(present), w, opts)["g"]
    first = present[0][1]
    if "g_channel" in first:
        return {"g_channel": g.reshape(first["g_channel"].shape)}
    return {"g": g}


MERGE = MergeRule(methods=_arithmetic.GAIN.methods, check=_merge_check, merge=_merge, what="gain leaves ['g'] or ['g_channel']")


# ----------------------------------------------------------------------------- peft: IA3, feed-forward side
# IA3 with the layer in feedforward_modules: ia3_l of shape (1, d_in); on an nn.Conv2d / nn.Conv3d
# (1, in_channels, 1, 1[, 1]), read as g_channel (groups, in_channels / groups).
def _peft_read(cfg: PeftConfig, layer: PeftLayer) -> dict[str, Tensor]:
    nd = conv_dims(layer, cfg.where)
    if not nd:
        return peft_gain(cfg, layer, feedforward=True)
    t, conv = layer.tensors["ia3_l"], layer.module
    want = (1, conv.in_channels, *([1] * nd))
    if tuple(t.shape) != want:
        raise ValueError(
            f"{cfg.file!r}: {layer.path}.ia3_l has shape {tuple(t.shape)}, but {layer.path!r} is in "
            f"feedforward_modules={cfg.get('feedforward_modules')!r} and has in_channels={conv.in_channels}, so peft "
            f"expects {want}"
        )
    return {"g_channel": t.reshape(conv.groups, conv.in_channels // conv.groups)}


def _conv_gains(leaves: dict[str, Tensor], layer: PeftLayer) -> Tensor:
    """peft's (in_channels,) gains of a convolution's leaves, or a ValueError when they have no such form."""
    conv = layer.module
    G, C = conv.groups, conv.in_channels // conv.groups
    if "g_channel" in leaves:
        g = leaves["g_channel"].detach()
        if tuple(g.shape) != (G, C):
            raise ValueError(
                f"save_peft: {layer.path!r} (groups={G}, in_channels={conv.in_channels}) has g_channel of shape "
                f"{tuple(g.shape)}; peft's per-channel gains there are ({G}, {C})"
            )
        return g.reshape(-1)
    gk = leaves["g"].detach().reshape(C, -1)  # (channel, kernel position)
    differ = (gk != gk[:, :1]).any(dim=1)
    if bool(differ.any()):
        c = int(differ.nonzero()[0])
        raise ValueError(
            f"save_peft: {layer.path!r} is a convolution whose ia3_ff gains g differ across the {gk.shape[1]} kernel "
            f"positions of input channel {c} ({[round(float(v), 6) for v in gk[c, :4]]}…): lf.init's IA3-FF on a "
            f"convolution trains one gain per (channel, kernel position), peft's IA3 one per input channel "
            f"(ia3_l (1, in_channels, 1, 1)), so peft cannot hold it. Train peft's form from leaf "
            f"g_channel = torch.ones({G}, {C}) (or an adapter read with lf.load_peft), or keep this one in lite_fn's "
            f"format (lf.save)"
        )
    return gk[:, 0].repeat(G)  # one gain per channel, the same for every group


def _peft_write(leaves: dict[str, Tensor], layer: PeftLayer) -> tuple[dict[str, Tensor], dict]:
    nd = conv_dims(layer, "save_peft")
    if nd:
        return {"ia3_l": conv_vector(_conv_gains(leaves, layer), nd)}, {"feedforward": True}
    if "g_channel" in leaves:
        g = leaves["g_channel"].detach()
        if g.shape[0] != 1 or g.shape[1] != layer.W.shape[1]:
            raise ValueError(
                f"save_peft: {layer.path!r} is not a convolution but has the per-channel form g_channel of shape "
                f"{tuple(g.shape)}; peft's IA3 stores one gain per input feature there ((1, {layer.W.shape[1]}))"
            )
        return {"ia3_l": g.reshape(1, -1)}, {"feedforward": True}
    return {"ia3_l": leaves["g"].detach().reshape(1, -1)}, {"feedforward": True}


PEFT = PeftCodec(
    format=PEFT_IA3,
    claims=is_feedforward,
    tensors=lambda cfg, layer: ("ia3_l",),
    read=_peft_read,
    write=_peft_write,
)
