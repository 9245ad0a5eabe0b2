"""Stateless models: a meta-device skeleton plus base weights handed in as an argument (base=)."""

import copy

import pytest
import torch
from helpers import moved
from models import logits, tied_llama, tiny, tokens
from safetensors.torch import load_file, save_file
from torch.func import vmap

import lite_fn as lf

TARGETS = r"(q_proj|v_proj|down_proj)$"


def skeleton_and_weights(kind="llama"):
    model = tiny(kind)
    skeleton = copy.deepcopy(model).to("meta")
    skeleton.tie_weights()  # `.to("meta")` unties tied weights (GPT-2's lm_head); the model's ties are the truth
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return model, skeleton, {k: v.detach() for k, v in weights.items()}


def assert_weightless(skeleton):
    assert all(t.device.type == "meta" for t in [*skeleton.parameters(), *skeleton.buffers()])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_skeleton_plus_weights_is_the_model_bit_for_bit(kind):
    model, skeleton, weights = skeleton_and_weights(kind)
    x = tokens()
    for cfg in (lf.LoRAConfig(r=4), lf.DoRAConfig(r=4), lf.AntiPaSTOConfig(r=8, block_size=4)):
        p_real = lf.init(0, model, cfg)
        p_skel = lf.init(0, skeleton, cfg, base=weights)
        assert all(torch.equal(a, b) for a, b in zip(lf.trainable(p_real), lf.trainable(p_skel)))  # same key, same params
        p = moved(p_real, 3)
        assert torch.equal(logits(lf.call(skeleton, p, x, base=weights)), logits(lf.call(model, p, x)))
        merged_real, merged_skel = lf.merge(model, p), lf.merge(skeleton, p, base=weights)
        assert merged_real.keys() == merged_skel.keys()
        assert all(torch.equal(merged_real[k], merged_skel[k]) for k in merged_real)
    assert_weightless(skeleton)


def test_calibration_on_a_skeleton():
    model, skeleton, weights = skeleton_and_weights()
    data = [tokens(2, 8, seed=s) for s in range(3)]
    for cfg in (lf.EVAConfig(r=2), lf.AntiPaSTOConfig(r=8, block_size=4, select="data")):
        real = lf.init(0, model, cfg, targets=TARGETS, calibration=data, progress=False)
        skel = lf.init(0, skeleton, cfg, targets=TARGETS, calibration=data, progress=False, base=weights)
        assert real.keys() == skel.keys()
        for p in real:
            for name in real[p]:
                assert all(torch.equal(real[p][name][k], skel[p][name][k]) for k in real[p][name])
    assert_weightless(skeleton)


def test_weights_from_a_safetensors_file(tmp_path):
    model, skeleton, _ = skeleton_and_weights()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    weights = {**load_file(tmp_path / "model.safetensors"), **dict(model.named_buffers())}
    p = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS), 1)
    assert torch.equal(logits(lf.call(skeleton, p, tokens(), base=weights)), logits(lf.call(model, p, tokens())))


def test_vmap_over_checkpoints_and_adapters_equals_loop():
    model, skeleton, weights = skeleton_and_weights()
    buffers = dict(model.named_buffers())
    params_only = {k: v for k, v in weights.items() if k not in buffers}
    checkpoints = [{k: v + 0.02 * torch.randn_like(v) for k, v in params_only.items()} for _ in range(3)]
    stacked_w = {k: torch.stack([c[k] for c in checkpoints]) for k in params_only}
    adapters = [moved(lf.init(s, model, lf.LoRAConfig(r=4), targets=TARGETS), s) for s in range(3)]
    x = tokens()
    one = adapters[0]
    loop = torch.stack([logits(lf.call(skeleton, one, x, base={**c, **buffers})) for c in checkpoints])
    batched = vmap(lambda w: logits(lf.call(skeleton, one, x, base={**w, **buffers})))(stacked_w)
    assert (batched - loop).abs().max() <= 1e-5
    loop = torch.stack([logits(lf.call(skeleton, a, x, base={**c, **buffers})) for a, c in zip(adapters, checkpoints)])
    batched = vmap(lambda w, p: logits(lf.call(skeleton, p, x, base={**w, **buffers})))(stacked_w, lf.stack(adapters))
    assert (batched - loop).abs().max() <= 1e-5
    assert (loop[0] - loop[1]).abs().max() > 1e-3  # the checkpoints differ
    assert_weightless(skeleton)


def test_gradients_reach_base_weights_only_when_asked():
    model, skeleton, weights = skeleton_and_weights()
    p = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS), 1)
    w = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in weights.items()}
    logits(lf.call(skeleton, p, tokens(), base=w)).sum().backward()
    assert all(v.grad is None for v in w.values())
    logits(lf.call(skeleton, p, tokens(), base=w, freeze_base=False)).sum().backward()
    assert w["model.layers.0.self_attn.q_proj.weight"].grad is not None


def test_tied_weights_follow_the_model():
    model = tied_llama()
    skeleton = tied_llama(device="meta")  # built on meta: the ties are the model's
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # as save_pretrained writes it
    weights = {**state, **dict(model.named_buffers())}
    p = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS), 1)
    assert torch.equal(logits(lf.call(skeleton, p, tokens(), base=weights)), logits(lf.call(model, p, tokens())))
    both = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}
    with pytest.raises(ValueError, match=r"the model ties them"):
        lf.call(skeleton, p, tokens(), base=both)


def test_bad_base_names_shapes_and_types():
    model, skeleton, weights = skeleton_and_weights()
    p = lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS)
    missing = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"base is missing 1 tensors .*'model\.norm\.weight'"):
        lf.call(skeleton, p, tokens(), base=missing)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.0\.self_attn\.q_proj\.weigth' \(did you mean 'model\.layers\.0\.self_attn\.q_proj\.weight'\?\)",
    ):
        lf.call(skeleton, p, tokens(), base={**weights, "model.layers.0.self_attn.q_proj.weigth": torch.ones(1)})
    with pytest.raises(
        ValueError,
        match=r"base\['model\.norm\.weight'\] has shape \(31,\) but the model's 'model\.norm\.weight' has shape \(32,\)",
    ):
        lf.call(skeleton, p, tokens(), base={**weights, "model.norm.weight": torch.ones(31)})
    with pytest.raises(TypeError, match=r"base must be a dict"):
        lf.call(skeleton, p, tokens(), base=[1, 2])
    with pytest.raises(ValueError, match=r"on the meta device .*pass the weights with base="):
        lf.init(0, skeleton, lf.LoRAConfig(r=4), targets=TARGETS)
