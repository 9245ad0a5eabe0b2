"""lf.applied: every forward inside the block is adapted, so model.generate works with adapters —
one adapter, K routed adapters, an alpha sweep, beam search, with and without KV cache, threads."""

import copy

import helpers
import pytest
import torch
from models import tiny, tokens

import lite_fn as lf


def moved(params, seed, scale=0.3):  # large enough that the adapters change greedy tokens
    return helpers.moved(params, seed, scale)


TARGETS = r"(q_proj|v_proj|down_proj)$"


def greedy(model, ids, **kw):
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, **kw}
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def test_greedy_generate_equals_peft():
    import peft

    model, ids = tiny("llama"), tokens(2, 5)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    params = lf.init(0, model, lf.LoRAConfig(r=4, alpha=8), targets=r"(q_proj|v_proj)$")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, bv in params.items():
            layer = pm.base_model.model.get_submodule(path)
            for leaf, peft_leaf in (("A", layer.lora_A["default"].weight), ("B", layer.lora_B["default"].weight)):
                peft_leaf.copy_(torch.randn(peft_leaf.shape, generator=gen) * 0.5)
                bv["lora"][leaf] = peft_leaf.detach().clone().requires_grad_(True)
    expected = greedy(pm, ids)
    with lf.applied(model, params):
        ours = greedy(model, ids)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, greedy(model, ids))  # the adapter changed the tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_routed_generate_equals_separate_generates(use_cache):
    model = tiny("llama")
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=TARGETS), k) for k in range(3)]
    ids = tokens(4, 5, seed=3)
    route = torch.tensor([2, 0, 1, 2])
    with lf.applied(model, lf.stack(adapters), route=route):
        batched = greedy(model, ids, use_cache=use_cache)
    separate = []
    for i, k in enumerate(route.tolist()):
        with lf.applied(model, adapters[k]):
            separate.append(greedy(model, ids[i : i + 1], use_cache=use_cache)[0])
    assert torch.equal(batched, torch.stack(separate))
    assert len({tuple(s.tolist()) for s in separate[:3]}) > 1  # the adapters generate different tokens


def test_alpha_sweep_generate_and_alpha_zero_is_the_base():
    model = tiny("llama")
    steer = moved(lf.init(0, model, lf.AntiPaSTOConfig(r=8, block_size=4), targets=r"(o_proj|down_proj)$"), 1, scale=30.0)
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    sweep = lf.stack([lf.with_alpha(steer, a) for a in alphas])
    prompt = tokens(1, 5, seed=4).repeat(len(alphas), 1)
    with lf.applied(model, sweep, route=torch.arange(len(alphas))):
        rows = greedy(model, prompt)
    for i, a in enumerate(alphas):
        with lf.applied(model, lf.with_alpha(steer, a)):
            assert torch.equal(rows[i], greedy(model, prompt[:1])[0]), a
    assert torch.equal(rows[2], greedy(model, prompt[:1])[0])  # alpha = 0: the base model's tokens
    assert len({tuple(r.tolist()) for r in rows}) > 1


def test_leaves_changed_in_place_inside_a_block_take_effect_at_the_next_forward():
    """A block runs many forwards; a value swap (alpha.fill_) or an optimizer step between them is seen
    by the next one (per-call derived leaves, e.g. AntiPaSTO's prepare hook, are not used in a block)."""
    model, x = tiny("llama"), tokens(2, 5)
    steer = moved(lf.init(0, model, lf.AntiPaSTOConfig(r=8, block_size=4), targets=r"(o_proj|down_proj)$"), 1, scale=30.0)
    alphas = [leaves["alpha"] for bv in steer.values() for leaves in bv.values()]
    with torch.no_grad(), lf.applied(model, steer):
        first = model(x).logits
        for a in alphas:
            a.fill_(-1.0)
        second = model(x).logits
    assert torch.equal(second, lf.call(model, steer, x).logits) and not torch.allclose(first, second)


def test_beam_search_keeps_routes_aligned():
    model = tiny("llama")
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=TARGETS), k) for k in range(2)]
    ids = tokens(2, 5, seed=5)
    route = torch.tensor([1, 0])
    with lf.applied(model, lf.stack(adapters), route=route):
        batched = greedy(model, ids, num_beams=3)
    for i, k in enumerate(route.tolist()):
        with lf.applied(model, adapters[k]):
            assert torch.equal(batched[i], greedy(model, ids[i : i + 1], num_beams=3)[0])


def test_sampling_with_route_equals_separate_rows():
    model = tiny("llama")
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=TARGETS), k) for k in range(2)]
    ids = tokens(2, 5, seed=6)
    with lf.applied(model, lf.stack(adapters), route=torch.tensor([1, 0])):
        out = model(ids).logits
    for i, k in enumerate([1, 0]):
        with lf.applied(model, adapters[k]):
            assert torch.allclose(out[i], model(ids[i : i + 1]).logits[0], atol=1e-5, rtol=0)
    torch.manual_seed(0)
    with lf.applied(model, lf.stack(adapters), route=torch.tensor([1, 0])):
        sampled = greedy(model, ids, do_sample=True, top_k=5)
    assert sampled.shape == (2, 13)


def test_threads_generate_with_their_own_adapters_and_model_is_untouched():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=TARGETS), k) for k in range(4)]
    ids = tokens(1, 5, seed=7)
    expected = []
    for p in adapters:
        with lf.applied(model, p):
            expected.append(greedy(model, ids))
    plain = greedy(model, ids)
    wrong = []

    def worker(t):
        for i in range(5):
            k = (t + i) % 4
            with lf.applied(model, adapters[k]):
                if not torch.equal(greedy(model, ids), expected[k]):
                    wrong.append((t, i))

    def plain_worker():
        for i in range(5):
            if not torch.equal(greedy(model, ids), plain):
                wrong.append(("plain", i))

    helpers.in_threads(worker, 4, plain_worker)
    assert wrong == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0


def test_applied_blocks_nest_and_unwind_on_error():
    model, ids = tiny("llama"), tokens(1, 5)
    a = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=r"q_proj$"), 1)
    b = moved(lf.init(1, model, lf.LoRAConfig(r=4), targets=r"v_proj$"), 2)
    with lf.applied(model, a), lf.applied(model, b):
        both = model(ids).logits
    assert torch.allclose(both, lf.call(model, {**a, **b}, ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(KeyError), lf.applied(model, a):
        raise KeyError("boom")
    assert torch._C._len_torch_function_stack() == 0
    assert torch.equal(model(ids).logits, tiny("llama")(ids).logits)
