"""LoRA / rsLoRA: parity with peft's LoraConfig on copied tensors, init distributions, errors."""

import peft
import pytest
import torch
from helpers import assert_config_refused, assert_matches_reference, make_layer, peft_linear

import lite_fn as lf
from lite_fn.variants import lora

D_OUT, D_IN = 20, 12
CFGS = [lf.LoRAConfig(r=4, alpha=8), lf.LoRAConfig(r=3, alpha=5, use_rslora=True), lf.LoRAConfig(r=4, alpha=8, init="gaussian")]


def _peft_layer(cfg, W, b):
    init = "gaussian" if cfg.init == "gaussian" else True
    return peft_linear(
        W, b, peft.LoraConfig, r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora, init_lora_weights=init, lora_dropout=0.0
    )


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_peft_parity_outputs_and_grads(cfg):
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(cfg, W, b)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-trivial: B ≠ 0
        A.copy_(torch.randn(A.shape, generator=g) * 0.3)
        B.copy_(torch.randn(B.shape, generator=g) * 0.3)
    p = {**lora.init(0, W, cfg), "A": A.detach().clone().requires_grad_(True), "B": B.detach().clone().requires_grad_(True)}
    assert float(p["scale"]) == pytest.approx(layer.scaling["default"], rel=1e-7)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    leaves = [("A", p["A"], A), ("B", p["B"], B)]
    assert_matches_reference(layer, lambda h: lora.apply(p, W, h, b), x, leaves, cotangent=6)


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_init_like_peft(cfg):
    """Shapes, trainability, B = 0 and A's distribution (kaiming bound 1/√d_in, or std 1/r) as peft draws them."""
    W, _ = make_layer(256, 512, seed=1)
    p = lora.init(0, W, cfg)
    assert [k for k, v in p.items() if v.requires_grad] == ["A", "B"] and not p["scale"].requires_grad
    assert p["A"].shape == (cfg.r, 512) and torch.equal(p["B"], torch.zeros(256, cfg.r))
    ref = _peft_layer(cfg, W, torch.zeros(256)).lora_A["default"].weight.detach()
    if cfg.init == "gaussian":
        assert p["A"].std().item() == pytest.approx(1 / cfg.r, rel=0.1) == ref.std().item()
    else:
        assert p["A"].abs().max() <= 512**-0.5 and ref.abs().max() <= 512**-0.5
        assert p["A"].std().item() == pytest.approx(ref.std().item(), rel=0.1)  # U(±b): std b/√3 on both sides


def test_bad_config():
    assert_config_refused(lf.LoRAConfig, dict(init="xavier"), "init='xavier' is not one of")
    assert_config_refused(lf.LoRAConfig, dict(alpha=float("inf")), "alpha=inf must be a finite number")
