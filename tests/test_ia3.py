"""(IA)³ output side (ia3) and input side (ia3_ff): parity with peft's IA3 on copied, randomised vectors."""

import copy

import peft
import pytest
import torch
from helpers import assert_matches_reference, make_layer, rel_err
from torch import nn

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import ia3, ia3_ff


class Tiny(nn.Module):
    """k, v: output-side IA3 targets; ff: the feed-forward (input-side) target. All with bias."""

    def __init__(self):
        super().__init__()
        self.k, self.v, self.ff = nn.Linear(12, 16), nn.Linear(12, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.ff(torch.tanh(self.k(x)) * self.v(x))


def _ours(model, params, x):
    """Tiny.forward written with our functional apply; params: {name: (module, leaf dict)}."""

    def lin(name, h):
        mod, p = params[name]
        layer = getattr(model, name)
        return mod.apply(p, layer.weight, h, layer.bias)

    return lin("ff", torch.tanh(lin("k", x)) * lin("v", x))


def _peft_and_ours(seed=0):
    torch.manual_seed(seed)
    base = Tiny()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k", "v", "ff"], feedforward_modules=["ff"]))
    g = torch.Generator().manual_seed(seed + 1)
    params = {}
    for name, mod, cfg in (("k", ia3, lf.IA3Config()), ("v", ia3, lf.IA3Config()), ("ff", ia3_ff, lf.IA3FFConfig())):
        layer = ref.base_model.model.get_submodule(name)
        vec = layer.ia3_l["default"]
        with torch.no_grad():  # move peft's vectors off their identity init
            vec.copy_(1.0 + 0.5 * torch.randn(vec.shape, generator=g))
        p = mod.init(0, getattr(base, name).weight, cfg)
        assert p["g"].numel() == vec.numel()
        p = {"g": vec.detach().reshape(p["g"].shape).clone().requires_grad_(True)}
        params[name] = (mod, p)
    return base, ref, params


def test_peft_parity_outputs_and_grads():
    base, ref, params = _peft_and_ours()
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(9))
    leaves = [
        (name, params[name][1]["g"], ref.base_model.model.get_submodule(name).ia3_l["default"]) for name in ("k", "v", "ff")
    ]
    _, y_our = assert_matches_reference(
        ref,
        lambda h: _ours(base, params, h),
        x,
        leaves,
        cotangent=10,
        to_ours=lambda name, g: g.reshape(params[name][1]["g"].shape),
    )
    assert rel_err(y_our, base(x)) > 1e-2  # the randomised adapter does something


def test_merge_matches_peft_merge():
    """peft's merge scales W and b for output-side layers, only W for feed-forward ones."""
    base, ref, params = _peft_and_ours(seed=3)
    merged = ref.merge_and_unload()
    for name, (mod, p) in params.items():
        layer = getattr(base, name)
        W, b = variants.dense_weights(mod, p, layer.weight, layer.bias)
        assert rel_err(W, merged.get_submodule(name).weight) <= 1e-6, name
        assert rel_err(b, merged.get_submodule(name).bias) <= 1e-6, name


def test_bias_scaled_on_output_side_only():
    W, b = make_layer(6, 5)
    g_out = torch.linspace(0.5, 2.0, 6)
    g_in = torch.linspace(0.5, 2.0, 5)
    zero = torch.zeros(1, 5)
    assert torch.allclose(ia3.apply({"g": g_out}, W, zero, b)[0], b * g_out)
    assert torch.equal(ia3_ff.apply({"g": g_in}, W, zero, b)[0], b)


def test_float64_formula():
    W, b = make_layer(6, 5, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    g_out, g_in = torch.rand(6, dtype=torch.float64) + 0.5, torch.rand(5, dtype=torch.float64) + 0.5
    want_out = torch.stack([(W @ xi + b) * g_out for xi in x])
    want_in = torch.stack([W @ (xi * g_in) + b for xi in x])
    assert rel_err(ia3.apply({"g": g_out}, W, x, b), want_out) <= 1e-12
    assert rel_err(ia3_ff.apply({"g": g_in}, W, x, b), want_in) <= 1e-12


@pytest.mark.parametrize("mod,cfg,size", [(ia3, lf.IA3Config(), 6), (ia3_ff, lf.IA3FFConfig(), 5)])
def test_leaf_shape_and_init(mod, cfg, size):
    W, _ = make_layer(6, 5)
    p = mod.init(0, W, cfg)
    assert list(p) == ["g"] and p["g"].shape == (size,) and p["g"].requires_grad
    assert torch.equal(p["g"], torch.ones(size))
    assert type(cfg).variant_name == mod.NAME
