"""Explicit, JAX-style random keys.

A key is an int seed (or a 0-d integer tensor holding one). Nothing here touches torch's
global RNG: every draw goes through a private ``torch.Generator`` seeded from the key.

    root = 0
    k = fold_in(root, "model.layers.0.self_attn.q_proj")   # per-layer key, independent of
                                                            # which other layers are targeted
    k1, k2 = split(k, 2)
"""

from __future__ import annotations

import hashlib

import torch

Key = int | torch.Tensor

_MASK = (1 << 63) - 1


def as_seed(key: Key) -> int:
    """Return the int seed a key stands for; reject anything that is not an integer key."""
    if isinstance(key, bool):
        raise TypeError(f"key={key!r} is a bool; pass an int seed such as key=0")
    if isinstance(key, int):
        return key & _MASK
    if isinstance(key, torch.Tensor) and key.ndim == 0 and not key.is_floating_point() and not key.is_complex():
        return int(key.item()) & _MASK
    raise TypeError(f"key={key!r} is not a key; pass an int seed (e.g. key=0) or a 0-d integer tensor")


@torch.compiler.assume_constant_result  # a pure function of constants: torch.compile runs it once while tracing
def fold_in(key: Key, data: str | int) -> int:
    """Derive a new key from ``key`` and ``data`` (a module path or an int); a pure hash."""
    digest = hashlib.blake2b(f"{as_seed(key)}|{data}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def split(key: Key, n: int = 2) -> list[int]:
    """``n`` independent keys from one."""
    if n < 1:
        raise ValueError(f"split(key, n={n}): n must be >= 1")
    return [fold_in(key, f"split:{i}") for i in range(n)]


def generator(key: Key) -> torch.Generator:
    """A fresh CPU generator seeded from ``key`` (draw on CPU, then move: same params on any device)."""
    return torch.Generator(device="cpu").manual_seed(as_seed(key))
