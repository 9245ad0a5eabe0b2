"""Which convolutions peft's HRA and BOFT files can describe exactly (their codecs read and write only those).

peft 0.21's HRAConv2d and BOFT's Conv2d adapt an nn.Conv2d by computing the merged kernel W' and then calling
``F.conv2d(x, W', bias, padding=padding[0], stride=stride[0])`` themselves: dilation, padding_mode, groups and the
second axis' stride and padding are dropped, and the kernel is flattened as in · k · k with k = kernel_size[0].
lite_fn keeps the layer's own convolution (every use of its weight sees W'), so the two agree exactly on the
layers where peft's call is the layer's own: one of each listed below, else the codec refuses the layer.
"""

from __future__ import annotations

from .._contract import PeftLayer


def check_plain_conv2d(layer: PeftLayer, who: str, method: str) -> None:
    """Nothing for a non-convolution layer; for a convolution, a ValueError naming what peft's ``method`` (e.g.
    "HRA") computes differently, unless it is an nn.Conv2d with a square kernel, groups=1, dilation 1, zero
    padding mode, and equal stride and numeric padding along both axes."""
    if layer.kind != "Conv":
        return
    conv, path = layer.module, layer.path
    if len(layer.stored) != 4:
        raise ValueError(
            f"{who}: {path!r} is an nn.Conv{len(layer.stored) - 2}d, but peft's {method} adapts nn.Linear and "
            f"nn.Conv2d only (peft refuses to adapt it); leave it out of the adapter"
        )
    kh, kw = conv.kernel_size
    if kh != kw:
        raise ValueError(
            f"{who}: {path!r} has kernel_size={(kh, kw)}, but peft's {method} flattens a Conv2d kernel as "
            f"in_channels · k · k with k = kernel_size[0] (it fails on a non-square kernel); leave it out of the adapter"
        )
    if conv.groups != 1:
        raise ValueError(
            f"{who}: {path!r} has groups={conv.groups}, which peft's {method} refuses (NotImplementedError: "
            f"'groups > 1'); leave it out of the adapter"
        )
    dropped = []
    if isinstance(conv.padding, str):
        dropped.append(f"padding={conv.padding!r}")
    elif conv.padding[0] != conv.padding[1]:
        dropped.append(f"padding={tuple(conv.padding)}")
    if conv.stride[0] != conv.stride[1]:
        dropped.append(f"stride={tuple(conv.stride)}")
    if tuple(conv.dilation) != (1, 1):
        dropped.append(f"dilation={tuple(conv.dilation)}")
    if conv.padding_mode != "zeros":
        dropped.append(f"padding_mode={conv.padding_mode!r}")
    if dropped:
        raise ValueError(
            f"{who}: {path!r} is an nn.Conv2d with {', '.join(dropped)}: peft's {method} forward calls "
            f"F.conv2d(x, W', bias, stride=stride[0], padding=padding[0]) itself and drops that, so peft computes "
            f"another function than the layer lite_fn adapts; leave it out of the adapter, or keep the adapter in "
            f"lite_fn's format (lf.save)"
        )
