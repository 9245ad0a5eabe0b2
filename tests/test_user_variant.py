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


def test_user_variant_speed_hooks_prepare_and_apply_runs():
    """The optional hooks: prepare (per-call derived leaves for all layers) and apply_runs (routed runs)."""
    variant, Config = make_gain_variant("gain_hooks")
    calls = {"prepare": 0, "runs": 0}

    def prepare(layers):
        calls["prepare"] += 1
        return {path: {**leaves, "gain": 1.0 + leaves["c"]} for path, leaves in layers.items()}

    def apply(params, W, x, b=None):
        gain = params["gain"] if "gain" in params else 1.0 + params["c"]
        return torch.nn.functional.linear(x, W, b) * gain

    def apply_runs(params, W, x, b=None):  # leaves (K, d_out), x (K, m..., d_in)
        calls["runs"] += 1
        gain = (1.0 + params["c"]).reshape(x.shape[0], *[1] * (x.ndim - 2), -1)
        return torch.nn.functional.linear(x, W, b) * gain

    variant.prepare, variant.apply, variant.apply_runs = prepare, apply, apply_runs
    lf.register_variant(variant)
    try:
        model, x = tiny("llama"), tokens(4, 5)
        p = lf.init(0, model, Config(), targets=r"(q_proj|v_proj)$")
        ps = [{k: {n: {"c": lv["c"] + 0.1 * (i + 1)} for n, lv in bv.items()} for k, bv in p.items()} for i in range(2)]
        want = [logits(lf.call(model, q, x)) for q in ps]
        assert calls["prepare"] == 2 and (want[0] - want[1]).abs().max() > 1e-3  # once per call, all layers
        routed = logits(lf.call(model, lf.stack(ps), x, route=torch.tensor([0, 0, 1, 1])))
        assert calls["runs"] > 0
        assert (routed[:2] - want[0][:2]).abs().max() <= 1e-5 and (routed[2:] - want[1][2:]).abs().max() <= 1e-5
        variant.prepare = lambda layers: {}  # a hook that loses layers is an error naming the variant, never a skip
        lf.register_variant(variant, replace=True)
        with pytest.raises(ValueError, match=r"'gain_hooks': prepare\(\) must return"):
            lf.call(model, p, x)
    finally:
        lf.REGISTRY.pop("gain_hooks", None)
