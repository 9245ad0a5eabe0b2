"""Layers adapted by weight substitution (convolutions, embeddings, MultiheadAttention, Linear subclasses with their
own forward, raw 2-D/3-D parameters such as MoE experts): every use of the weight during the forward sees the
variant's merged weight W'. The checks here are the injection's: exact against a hand-written reference (the
functional model with W' put in by hand, float64), gradients, checkpointing, blocks whose leaves change in place,
threads, nesting, vmap, and the clear refusals (route=, dropout keys, tied weights)."""

import pytest
import torch
import transformers as tf
from torch import nn
from torch.utils.checkpoint import checkpoint

import lite_fn as lf
from tests.helpers import in_threads, moved
from tests.models import small_config


class ConvNet(nn.Module):
    def __init__(self, checkpointed=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2, dilation=1)
        self.c3 = nn.Conv1d(8, 4, 2, padding="same", padding_mode="reflect")
        self.checkpointed = checkpointed

    def block(self, x):
        return torch.tanh(self.c2(torch.relu(self.c1(x))))

    def forward(self, x):
        if self.checkpointed:
            h = checkpoint(self.block, x, use_reentrant=False, context_fn=lf.checkpoint_context)
        else:
            h = self.block(x)
        return self.c3(h.flatten(2))


def _net(dtype=torch.float64, checkpointed=False):
    torch.manual_seed(0)
    return ConvNet(checkpointed).to(dtype)


def _lora_reference(model, params, x):
    """The model with W + s·B A put in by hand (functional_call), for LoRA params on any substitution layer."""
    weights = {}
    for path, by_variant in params.items():
        p = by_variant["lora"]
        module = model.get_submodule(path)
        W = module.weight
        delta = (p["B"] @ p["A"]) * p["scale"]
        if isinstance(module, nn.Embedding):
            weights[f"{path}.weight"] = W + delta.T
        else:
            weights[f"{path}.weight"] = W + delta.reshape(W.shape)
    return torch.func.functional_call(model, weights, (x,))


def test_conv_lora_matches_the_hand_merged_model_and_its_gradients():
    model, x = _net(), torch.randn(2, 3, 9, 9, dtype=torch.float64)
    params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^c\d$")
    assert torch.equal(lf.call(model, params, x), model(x))  # identity at init
    params = moved(params, 3)
    out = lf.call(model, params, x)
    ref = _lora_reference(model, params, x)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    leaves = [t for bv in params.values() for t in bv["lora"].values() if t.requires_grad]
    ours = torch.autograd.grad(out, leaves, g)
    theirs = torch.autograd.grad(ref, leaves, g)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_checkpointed_conv_gradients_equal_the_unchecked_step():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    plain, checked = _net(), _net(checkpointed=True)
    params = moved(lf.init(0, plain, lf.DoRAConfig(r=2), targets=r"^c\d$"), 5)
    grads = []
    for model in (plain, checked):
        out = lf.call(model, params, x)
        leaves = [t for bv in params.values() for t in bv["dora"].values() if t.requires_grad]
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_checkpoint_without_the_context_is_refused():
    class Net(ConvNet):
        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    torch.manual_seed(0)
    model = Net().double()
    params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^c1$")
    with pytest.raises(RuntimeError, match="checkpoint_context"):
        lf.call(model, params, torch.randn(1, 3, 9, 9, dtype=torch.float64))


def test_a_block_sees_leaves_changed_in_place_between_forwards():
    model, x = _net(), torch.randn(1, 3, 9, 9, dtype=torch.float64)
    params = moved(lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^c1$"), 2)
    with torch.no_grad(), lf.applied(model, params):
        first = model(x)
        assert torch.equal(model(x), first)  # the merged weight kept for the block
        params["c1"]["lora"]["B"].mul_(2)  # an optimizer step between forwards
        second = model(x)
    assert torch.allclose(second, _lora_reference(model, params, x), atol=1e-12)
    assert not torch.allclose(second, first)


def test_threads_on_one_shared_conv_model_are_each_exact():
    model, x = _net(), torch.randn(1, 3, 9, 9, dtype=torch.float64)
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=2), targets=r"^c\d$"), k) for k in range(4)]
    refs = [_lora_reference(model, p, x).detach() for p in adapters]
    errors = []

    def worker(t):
        for _ in range(5):
            out = lf.call(model, adapters[t], x)
            if not torch.allclose(out, refs[t], atol=1e-12):
                errors.append(t)
        with torch.no_grad(), lf.applied(model, adapters[t]):
            if not torch.allclose(model(x), refs[t], atol=1e-12):
                errors.append(t)

    in_threads(worker, 4, lambda: model(x))
    assert errors == []


def test_nested_calls_compose_with_linear_layers():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.conv(x).transpose(1, 2))

    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    outer = moved(lf.init(0, model, lf.IA3Config(), targets=r"^lin$"), 1)
    inner = moved(lf.init(1, model, lf.LoRAConfig(r=2), targets=r"^conv$"), 2)
    both = {**outer, **inner}
    with lf.applied(model, outer):
        nested = lf.call(model, inner, x)
    assert torch.allclose(nested, lf.call(model, both, x), atol=1e-12)


def test_vmap_over_stacked_conv_adapters_equals_the_loop():
    model, x = _net(), torch.randn(2, 3, 9, 9, dtype=torch.float64)
    adapters = [moved(lf.init(k, model, lf.LoHaConfig(r=2), targets=r"^c\d$"), k) for k in range(3)]
    ys = torch.func.vmap(lambda p: lf.call(model, p, x))(lf.stack(adapters))
    for k, p in enumerate(adapters):
        assert torch.allclose(ys[k], lf.call(model, p, x), atol=1e-12)


def test_route_and_dropout_keys_are_refused_on_substitution_layers():
    model, x = _net(), torch.randn(2, 3, 9, 9, dtype=torch.float64)
    adapters = [lf.init(k, model, lf.LoRAConfig(r=2), targets=r"^c1$") for k in range(2)]
    with pytest.raises(ValueError, match=r"route= cannot adapt 'c1' \(a Conv.*torch.func.vmap"):
        lf.call(model, lf.stack(adapters), x, route=torch.tensor([0, 1]))
    noisy = lf.init(0, model, lf.LoRAConfig(r=2, dropout=0.1), targets=r"^c1$")
    with pytest.raises(ValueError, match=r"\['c1'\] is a layer adapted by weight substitution.*dropout=0.0"):
        lf.call(model, noisy, x, key=0)


def test_embedding_lora_and_a_tied_embedding_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, padding_idx=0), nn.Linear(6, 3)).double()
    ids = torch.randint(0, 20, (2, 5))
    params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^0$")
    assert torch.equal(lf.call(model, params, ids), model(ids))
    params = moved(params, 4)
    assert torch.allclose(lf.call(model, params, ids), _lora_reference(model, params, ids), atol=1e-12)
    tied = tf.LlamaForCausalLM(small_config(tf.LlamaConfig, tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is tied to \['lm_head.weight'\].*merged weight"):
        lf.call(tied, lf.init(0, tied, lf.LoRAConfig(r=2), targets=r"embed_tokens$"), torch.ones(1, 3, dtype=torch.long))


def test_embedding_with_max_norm_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(TypeError, match=r"max_norm=1.0.*renormalises the weight rows in place"):
        lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^0$")


def _mixtral():
    torch.manual_seed(0)
    cfg = small_config(
        tf.MixtralConfig,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_key_value_heads=2,
    )
    return tf.MixtralForCausalLM(cfg).eval()


def test_moe_experts_get_one_adapter_each_and_match_the_hand_merged_model():
    model = _mixtral()
    x = torch.randint(0, 64, (2, 6))
    params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"experts\.(gate_up_proj|down_proj)$")
    gate_up = params["model.layers.0.mlp.experts.gate_up_proj"]["lora"]
    E, two_i, h = model.model.layers[0].mlp.experts.gate_up_proj.shape
    assert (gate_up["A"].shape, gate_up["B"].shape) == ((E, 2, h), (E, two_i, 2))
    assert not torch.equal(gate_up["A"][0], gate_up["A"][1])  # each expert its own draw
    params = moved(params, 7)
    out = lf.call(model, params, x).logits
    weights = {}
    for path, bv in params.items():
        p = bv["lora"]
        W = model.get_parameter(path)
        weights[path] = W + torch.einsum("eor,eri->eoi", p["B"], p["A"]) * p["scale"][:, None, None]
    ref = torch.func.functional_call(model, weights, (x,)).logits
    assert torch.allclose(out, ref, atol=1e-5)
    leaves = [t for bv in params.values() for t in bv["lora"].values() if t.requires_grad]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert torch.allclose(a, b, atol=1e-5)
    merged = lf.merge(model, params)
    assert torch.allclose(torch.func.functional_call(model, merged, (x,)).logits, ref, atol=1e-5)


def test_moe_generate_in_a_block_equals_the_merged_model():
    model = _mixtral()
    x = torch.randint(0, 64, (1, 4))
    params = moved(lf.init(0, model, lf.LoRAConfig(r=2), targets=r"experts\.down_proj$"), 3, scale=1.0)
    with torch.no_grad(), lf.applied(model, params):
        ours = model.generate(x, max_new_tokens=5, do_sample=False)
    merged = lf.merge(model, params)
    with torch.no_grad():
        theirs = x
        for _ in range(5):
            nxt = torch.func.functional_call(model, merged, (theirs,)).logits[:, -1].argmax(-1, keepdim=True)
            theirs = torch.cat([theirs, nxt], 1)
    assert torch.equal(ours, theirs)


def test_a_parameter_pattern_that_matches_a_vector_is_refused():
    model = _mixtral()
    with pytest.raises(TypeError, match=r"input_layernorm.weight' has shape \(32,\).*2-D"):
        lf.init(0, model, lf.LoRAConfig(r=2), targets=r"layers\.0\.input_layernorm\.weight$")
