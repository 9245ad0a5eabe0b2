"""Activation checkpointing: with ``lf.checkpoint_context`` the recompute during backward sees the
forward's adapters, so gradients equal the unchecked step; every path that would recompute without
them (the plain switch, reentrant checkpointing, a wrapped model, layers wrapped by hand) raises."""

import functools
import warnings

import pytest
import torch
import transformers as tf
from helpers import moved
from models import small_config, tokens
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

import lite_fn as lf

TARGETS = r"(q_proj|v_proj|down_proj)$"
CONTEXT = {"use_reentrant": False, "context_fn": lf.checkpoint_context}


def llama(layers: int = 3) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = small_config(tf.LlamaConfig, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=layers)
    return tf.LlamaForCausalLM(cfg).train()  # checkpointing acts in training mode only


def adapter(model, seed=0, cfg=None):
    return moved(lf.init(seed, model, cfg or lf.LoRAConfig(r=4), targets=TARGETS), seed=seed + 1)


def grads(forward, params) -> dict:
    """The loss and every trainable leaf's gradient after one backward of ``forward()``."""
    leaves = lf.trainable(params)
    for v in leaves:
        v.grad = None
    loss = forward()
    loss.backward()
    assert all(v.grad is not None for v in leaves)
    return {"loss": loss.detach(), **{i: v.grad.clone() for i, v in enumerate(leaves)}}


def assert_same(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def hf_loss(model, params, ids):
    return lambda: lf.call(model, params, ids, labels=ids).loss


@pytest.fixture(scope="module")
def ids():
    return tokens(2, 8)


def enable(model, **kw):
    with warnings.catch_warnings():  # transformers 5 deprecates gradient_checkpointing_enable for activation_…
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kw)
    return model


@pytest.mark.parametrize("every", [1, 2])
def test_transformers_switch_with_context_equals_unchecked(ids, every):
    plain, params = llama(), None
    params = adapter(plain)
    reference = grads(hf_loss(plain, params, ids), params)
    if every == 1:
        checked = enable(llama(), gradient_checkpointing_kwargs=CONTEXT)
    else:
        checked = llama()
        checked.activation_checkpointing_enable(CONTEXT, every_n_layers=every)
    assert checked.is_activation_checkpointing
    assert_same(grads(hf_loss(checked, params, ids), params), reference)  # the same ops: bit for bit


def test_activations_offloaded_to_host_memory(ids):
    """transformers' offload=True is save_on_cpu around each checkpoint (pinned memory needs an accelerator,
    so on CPU the same recipe is written out with pin_memory=False)."""
    plain = llama()
    params = adapter(plain)
    reference = grads(hf_loss(plain, params, ids), params)
    checked = llama()

    def offloaded(fn, *args, **kwargs):
        with save_on_cpu(pin_memory=False):
            return checkpoint(fn, *args, **kwargs)

    checked._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=functools.partial(offloaded, **CONTEXT))
    assert_same(grads(hf_loss(checked, params, ids), params), reference)


class Blocks(torch.nn.Module):
    """Residual MLP blocks, each checkpointed by hand (or not)."""

    def __init__(self, checked: bool, context=lf.checkpoint_context, reentrant: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)) for _ in range(3)
        )
        self.checked, self.context, self.reentrant = checked, context, reentrant

    def forward(self, x):
        for block in self.blocks:
            if not self.checked:
                x = x + block(x)
            elif self.reentrant:
                x = x + checkpoint(block, x, use_reentrant=True)
            elif self.context is None:
                x = x + checkpoint(block, x, use_reentrant=False)
            else:
                x = x + checkpoint(block, x, use_reentrant=False, context_fn=self.context)
        return x


@pytest.mark.parametrize("name", ["lora", "dora", "antipasto", "ia3"])
def test_hand_written_checkpoint_with_context_equals_unchecked(name):
    cfg = {
        "lora": lf.LoRAConfig(r=4),
        "dora": lf.DoRAConfig(r=4),
        "antipasto": lf.AntiPaSTOConfig(r=4, block_size=2),
        "ia3": lf.IA3Config(),
    }[name]
    plain = Blocks(False)
    params = moved(lf.init(0, plain, cfg, targets=r"\.\d\.(0|2)$"))
    if name == "antipasto":
        params = lf.with_alpha(params, 0.7)
    x = torch.randn(4, 5, 16)
    loss = lambda model: lambda: lf.call(model, params, x).square().mean()
    assert_same(grads(loss(Blocks(True)), params), grads(loss(plain), params))


def test_nested_checkpoints_and_a_block_of_generation_code():
    """A checkpoint inside a checkpoint, and lf.applied (many forwards), recompute with the adapters too."""

    class Nested(Blocks):
        def forward(self, x):
            return checkpoint(super().forward, x, use_reentrant=False, context_fn=lf.checkpoint_context)

    plain = Blocks(False)
    params = moved(lf.init(0, plain, lf.LoRAConfig(r=4), targets=r"\.\d\.(0|2)$"))
    x = torch.randn(4, 16)
    reference = grads(lambda: lf.call(plain, params, x).square().mean(), params)
    assert_same(grads(lambda: lf.call(Nested(True), params, x).square().mean(), params), reference)
    nested = Nested(True)

    def in_block():
        with lf.applied(nested, params):
            return nested(x).square().mean()

    assert_same(grads(in_block, params), reference)


def test_plain_switch_raises_naming_the_context(ids):
    model = enable(llama())  # transformers' default: non-reentrant, no context
    params = adapter(model)
    with pytest.raises(RuntimeError, match=r"inside torch.utils.checkpoint without lf.checkpoint_context.*context_fn"):
        lf.call(model, params, ids, labels=ids)
    with torch.no_grad():  # nothing is recomputed without gradients: evaluation is exact as it is
        assert torch.equal(lf.call(model, params, ids).logits, lf.call(llama().eval(), params, ids).logits)


def test_hand_written_checkpoint_without_context_raises():
    model = Blocks(True, context=None)
    params = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=r"blocks\.\d\.0$"))
    with pytest.raises(
        RuntimeError, match=r"blocks\.0\.0 is computed inside torch.utils.checkpoint without lf.checkpoint_context"
    ):
        lf.call(model, params, torch.randn(2, 16))


def test_reentrant_checkpointing_raises_in_calls_and_blocks(ids):
    model = enable(llama(), gradient_checkpointing_kwargs={"use_reentrant": True})
    params = adapter(model)
    with pytest.raises(RuntimeError, match=r"gradients off inside a training lf.call \(reentrant"):
        lf.call(model, params, ids, labels=ids)
    by_hand = Blocks(True, reentrant=True)
    hand = moved(lf.init(0, by_hand, lf.LoRAConfig(r=4), targets=r"blocks\.\d\.0$"))
    x = torch.randn(2, 16, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    with pytest.raises(RuntimeError, match=r"gradients off inside a training lf.call"):
        lf.call(by_hand, hand, x)
    with pytest.raises(RuntimeError, match=r"gradients off inside a training lf.applied"), lf.applied(by_hand, hand):
        by_hand(x).sum().backward()
    with torch.no_grad(), lf.applied(by_hand.eval(), hand):  # generation-style use of a block stays fine
        by_hand(x)


def test_a_wrapped_checkpointed_model_raises(ids):
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids, labels=ids).loss

    inner = enable(llama())
    params = {f"inner.{p}": v for p, v in adapter(inner).items()}
    with pytest.raises(
        RuntimeError, match=r"inner\.model\.layers\.0\.self_attn\.q_proj is computed inside torch.utils.checkpoint"
    ):
        lf.call(Wrapper(inner), params, ids)


def test_a_layer_run_without_gradient_inside_a_training_call_raises():
    class NoGrad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.no_grad():
                x = self.a(x)
            return self.b(x)

    model = NoGrad()
    params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^a$")
    with pytest.raises(RuntimeError, match=r"a is computed with gradients off inside a training lf.call"):
        lf.call(model, params, torch.randn(2, 4))
    frozen = {p: {n: {k: v.detach() for k, v in lv.items()} for n, lv in bv.items()} for p, bv in params.items()}
    lf.call(model, frozen, torch.randn(2, 4))  # no leaf requires grad: not a training call


def test_adapted_turns_checkpointing_on(ids):
    plain = llama()
    params = adapter(plain)
    reference = grads(hf_loss(plain, params, ids), params)
    model = llama()
    assert not model.is_activation_checkpointing
    module = lf.Adapted(model, params, checkpointing=True)
    assert model.is_activation_checkpointing
    got = grads(lambda: module(ids, labels=ids).loss, module.params)
    assert_same({k: got[k] for k in reference}, reference)
    with pytest.raises(TypeError, match=r"has no gradient_checkpointing_enable\(\).*context_fn=lf.checkpoint_context"):
        lf.Adapted(Blocks(False), lf.init(0, Blocks(False), lf.LoRAConfig(r=2), targets=r"blocks\.\d\.0$"), checkpointing=True)


def test_k_stacked_adapters_checkpoint_with_a_route_and_refuse_vmap(ids):
    plain, checked = llama(2), enable(llama(2), gradient_checkpointing_kwargs=CONTEXT)
    stacked = lf.stack([adapter(plain, seed=k) for k in range(3)])
    batch = ids.repeat(3, 1)
    route = torch.arange(3).repeat_interleave(2)
    reference = grads(lambda: lf.call(plain, stacked, batch, route=route, labels=batch).loss, stacked)
    got = grads(lambda: lf.call(checked, stacked, batch, route=route, labels=batch).loss, stacked)
    assert_same(got, reference)
    checked.disable_input_require_grads()  # transformers' input hook calls requires_grad_, which vmap refuses
    losses = lf.train.stacked_loss(checked)
    with pytest.raises(RuntimeError, match=r"under a torch.func transform.*route="):
        losses(stacked, ids.expand(3, *ids.shape), labels=ids.expand(3, *ids.shape))


def test_four_bit_base_with_checkpointing(ids):
    pytest.importorskip("bitsandbytes")
    from test_quantized import quantized

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, checked = quantized("nf4", train=True), enable(quantized("nf4", train=True), gradient_checkpointing_kwargs=CONTEXT)
    params = adapter(plain)
    reference = grads(hf_loss(plain, params, ids), params)
    assert_same(grads(hf_loss(checked, params, ids), params), reference, exact=False)
