"""Adapter dropout with explicit keys (LoRA, DoRA, PiSSA, EVA): no key, no dropout; masks are a pure
function of (key, layer path, position); inverted dropout; peft parity with the mask fixed."""

import pytest
import torch
from helpers import make_layer, peft_linear, perturb, rel_err
from models import tiny, tokens
from torch import nn
from torch.func import vmap

import lite_fn as lf
from lite_fn.variants import dora, lora


def dropping(cfg_cls=lf.LoRAConfig, p=0.3, **kw):
    model = tiny("llama")
    params = lf.init(0, model, cfg_cls(r=4, dropout=p, **kw), targets=r"(q_proj|v_proj)$")
    return model, {k: {n: perturb(lv, i) for n, lv in bv.items()} for i, (k, bv) in enumerate(params.items())}


def without_dropout(params):
    return {k: {n: {leaf: v for leaf, v in lv.items() if leaf != "dropout"} for n, lv in bv.items()} for k, bv in params.items()}


def test_no_key_no_dropout_bit_for_bit_and_keys_are_reproducible():
    model, p = dropping()
    x = tokens()
    plain = lf.call(model, without_dropout(p), x).logits
    assert torch.equal(lf.call(model, p, x).logits, plain)  # no key: exactly dropout=0
    a, b, c = (lf.call(model, p, x, key=k).logits for k in (1, 1, 2))
    assert torch.equal(a, b)  # same key, same masks
    assert not torch.allclose(a, c) and not torch.allclose(a, plain)


def test_vmap_and_grad_with_a_key():
    model, p = dropping()
    q = {k: {n: perturb(lv, 10 + i) for n, lv in bv.items()} for i, (k, bv) in enumerate(p.items())}
    x = tokens()
    stacked = lf.stack([p, q])
    batched = vmap(lambda s: lf.call(model, s, x, key=3).logits)(stacked)  # default randomness="error"
    loop = torch.stack([lf.call(model, s, x, key=3).logits for s in (p, q)])
    assert (batched - loop).abs().max() <= 1e-5
    train, frozen = lf.partition(p)
    g1 = torch.func.grad(lambda t: lf.call(model, lf.combine(t, frozen), x, key=4).logits.sum())(train)
    g2 = torch.func.grad(lambda t: lf.call(model, lf.combine(t, frozen), x, key=4).logits.sum())(train)
    path = "model.layers.0.self_attn.q_proj"
    assert torch.equal(g1[path]["lora"]["A"], g2[path]["lora"]["A"])
    routed = lf.call(model, stacked, x, route=torch.tensor([1, 0]), key=3).logits
    # a row sees the same positions of the noise as in the full-batch call with its adapter
    assert (routed[0] - loop[1, 0]).abs().max() <= 1e-5 and (routed[1] - loop[0, 1]).abs().max() <= 1e-5


def test_compiled_call_with_a_key_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    p = lf.init(0, model, lf.LoRAConfig(r=2, dropout=0.5))
    p = {k: {n: perturb(lv, i) for n, lv in bv.items()} for i, (k, bv) in enumerate(p.items())}
    x = torch.randn(5, 8)
    f = torch.compile(lambda p, x: lf.call(model, p, x, key=7), fullgraph=True)
    assert torch.allclose(f(p, x), lf.call(model, p, x, key=7), atol=1e-6)


def test_mean_over_keys_is_the_undropped_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    p = lf.init(0, model, lf.LoRAConfig(r=4, dropout=0.4))
    p = {k: {n: perturb(lv, 1, scale=1.0) for n, lv in bv.items()} for k, bv in p.items()}
    x = torch.randn(3, 16)
    with torch.no_grad():
        outs = torch.stack([lf.call(model, p, x, key=k) for k in range(4000)])
        exact = lf.call(model, p, x)
    sem = outs.std(0) / 4000**0.5
    assert ((outs.mean(0) - exact).abs() <= 5 * sem + 1e-6).all()
    drop = (outs != exact).float().mean()
    assert drop > 0.5  # the masks really vary


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_parity_with_the_mask_fixed(use_dora):
    import peft

    W, b = make_layer(12, 10)
    cfg = (lf.DoRAConfig if use_dora else lf.LoRAConfig)(r=4, alpha=8, dropout=0.3)
    variant = dora if use_dora else lora
    params = perturb(variant.init(0, W, cfg), 3)
    x = torch.randn(6, 10, requires_grad=True)
    noise = lf.linalg.hash_uniform(11, x.shape)
    xd = lora.dropped(params, x, noise)

    class Fixed(nn.Module):
        def forward(self, inp):
            assert inp is x
            return xd

    layer = peft_linear(W, b, peft.LoraConfig, r=4, lora_alpha=8, lora_dropout=0.3, use_dora=use_dora)
    layer.lora_dropout["default"] = Fixed()
    layer.train()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(params["A"])
        layer.lora_B["default"].weight.copy_(params["B"])
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(params["m"])
    ours = variant.apply(params, W, x, b, noise)
    ref = layer(x)
    assert rel_err(ours, ref) <= 1e-5
    g_ours = torch.autograd.grad(ours.square().sum(), [params["A"], params["B"], x])
    g_ref = torch.autograd.grad(ref.square().sum(), [layer.lora_A["default"].weight, layer.lora_B["default"].weight, x])
    for a, r in zip(g_ours, g_ref):
        assert rel_err(a, r) <= 1e-4


@pytest.mark.parametrize("cfg_cls", [lf.LoRAConfig, lf.DoRAConfig, lf.PiSSAConfig])
def test_every_lora_family_config_drops(cfg_cls):
    model, p = dropping(cfg_cls)
    x = tokens()
    assert not torch.allclose(lf.call(model, p, x, key=1).logits, lf.call(model, p, x).logits)


def test_eva_drops_too():
    model = tiny("llama")
    p = lf.init(0, model, lf.EVAConfig(r=2, dropout=0.2), targets=r"q_proj$", calibration=[tokens(2, 8)], progress=False)
    p = {k: {n: perturb(lv, 1) for n, lv in bv.items()} for k, bv in p.items()}
    assert not torch.allclose(lf.call(model, p, tokens(), key=1).logits, lf.call(model, p, tokens()).logits)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.1"])
def test_bad_dropout_rates(bad):
    with pytest.raises(ValueError, match="dropout"):
        lf.LoRAConfig(r=4, dropout=bad)


def test_key_without_dropout_is_an_error():
    model = tiny("llama")
    p = lf.init(0, model, lf.LoRAConfig(r=4), targets=r"q_proj$")
    with pytest.raises(ValueError, match=r"no layer of params has a dropout rate"):
        lf.call(model, p, tokens(), key=1)
