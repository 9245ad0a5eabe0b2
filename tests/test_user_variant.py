"""A variant that lives outside the package, registered with lf.register_variant, works end to end."""

import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from models import logits, tiny, tokens
from torch.func import vmap

import lite_fn as lf


def make_gain_variant(name="out_gain"):
    """y = (x Wᵀ + b) ⊙ (1 + c): a per-output gain around 1, c (d_out,) = 0 at init."""

    @dataclass(frozen=True)
    class GainConfig:
        variant_name: ClassVar[str] = name

    def init(key, W, cfg, stat=None):
        return {"c": torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).requires_grad_(True)}

    def apply(params, W, x, b=None):
        return torch.nn.functional.linear(x, W, b) * (1.0 + params["c"])

    def shapes(leaves, d_out, d_in):
        return {"c": (d_out,)}

    module = types.SimpleNamespace(
        NAME=name,
        TRAINABLE=frozenset({"c"}),
        Config=GainConfig,
        init=init,
        apply=apply,
        shapes=shapes,
        random_init=lambda cfg: False,
    )
    return module, GainConfig


def test_user_variant_init_call_vmap_route_save_load(tmp_path):
    variant, Config = make_gain_variant()
    spec = lf.register_variant(variant)
    try:
        assert isinstance(variant, lf.Variant) and spec.stat is None and spec.STEERING_LEAF is None
        model, x = tiny("llama"), tokens()
        p = lf.init(0, model, Config(), targets=r"(q_proj|v_proj)$")
        assert torch.equal(logits(lf.call(model, p, x)), logits(model(x)))  # identity at init
        moved = [
            {k: {n: {leaf: v + 0.1 * (i + 1) for leaf, v in lv.items()} for n, lv in bv.items()} for k, bv in p.items()}
            for i in range(3)
        ]
        stacked = lf.stack(moved)
        batched = vmap(lambda q: logits(lf.call(model, q, x)))(stacked)
        loop = torch.stack([logits(lf.call(model, q, x)) for q in moved])
        assert (batched - loop).abs().max() <= 1e-5 and (loop[0] - loop[1]).abs().max() > 1e-3
        routed = logits(lf.call(model, stacked, x, route=torch.tensor([2, 0])))
        assert (routed[0] - loop[2, 0]).abs().max() <= 1e-5
        assert lf.trainable(moved[0]) and all(t.requires_grad for t in lf.trainable(moved[0]))
        lf.save(tmp_path / "gain.safetensors", moved[1], config=Config())
        back = lf.load(tmp_path / "gain.safetensors", model=model)
        assert torch.equal(logits(lf.call(model, back, x)), loop[1])
        with pytest.raises(ValueError, match=r"\['c'\] has shape \(1,\)"):
            lf.call(model, {k: {n: {"c": torch.ones(1)} for n in bv} for k, bv in p.items()}, x)
    finally:
        lf.REGISTRY.pop("out_gain", None)


def test_registration_errors():
    variant, _ = make_gain_variant("lora")
    with pytest.raises(ValueError, match=r"'lora' is already registered"):
        lf.register_variant(variant)
    with pytest.raises(TypeError, match=r"lacks \['TRAINABLE', 'shapes'\]"):
        lf.register_variant(types.SimpleNamespace(NAME="x", Config=object, init=None, apply=None))
    bad, _ = make_gain_variant("other_name")
    bad.NAME = "mismatch"
    with pytest.raises(ValueError, match=r"Config.variant_name is 'other_name'"):
        lf.register_variant(bad)
