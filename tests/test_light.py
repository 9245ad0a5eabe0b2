"""The light injection (adapters act around the targeted layers' own module calls where no op needs
substituting) and the remembered per-call plan: both must give exactly what the op-by-op mode gives,
and notice every change to params or model between calls."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import moved
from models import tiny, tokens

import lite_fn as lf
from lite_fn import _inject, runtime

TARGETS = r"(q_proj|v_proj|down_proj)$"


@pytest.fixture
def model():
    return copy.deepcopy(tiny("llama"))


def adapter(model, seed=0, targets=TARGETS):
    return moved(lf.init(seed, model, lf.LoRAConfig(r=4), targets=targets), seed=seed + 1, scale=0.3)


def test_light_and_op_by_op_agree(model):
    params, x = adapter(model), tokens(2, 6)
    with torch.no_grad():
        light = lf.call(model, params, x).logits  # no gradient: the light path
    assert runtime._light({}, None, None, True)
    full = lf.call(model, params, x).logits  # a training call with trainable base weights: op by op
    torch.testing.assert_close(light, full, rtol=0, atol=1e-6)
    frozen = copy.deepcopy(model).requires_grad_(False)
    torch.testing.assert_close(lf.call(frozen, params, x).logits, full, rtol=0, atol=1e-6)  # grad on, light


def test_training_inside_a_block_keeps_the_base_frozen(model):
    """A block is light; its model calls that record gradients through trainable base weights go op by op."""
    params, x = adapter(model), tokens(2, 6)
    assert all(p.requires_grad for p in model.parameters())
    lf.call(model, params, x, labels=x).loss.backward()
    expected = [v.grad.clone() for v in lf.trainable(params)]
    for v in lf.trainable(params):
        v.grad = None
    with lf.applied(model, params):
        model(x, labels=x).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    for a, v in zip(expected, lf.trainable(params)):
        torch.testing.assert_close(v.grad, a, rtol=1e-5, atol=1e-7)


def test_frozen_base_trains_through_the_light_path(model):
    model.requires_grad_(False)
    params, x = adapter(model), tokens(2, 6)
    grads = torch.autograd.grad(lf.call(model, params, x, labels=x).loss, lf.trainable(params))
    reference = copy.deepcopy(model).requires_grad_(True)  # op by op (detached trainable base)
    expected = torch.autograd.grad(lf.call(reference, params, x, labels=x).loss, lf.trainable(params))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_nested_blocks_inner_answers_a_layer_both_target(model):
    outer, inner = adapter(model, 0, r"q_proj$"), adapter(model, 5, r"q_proj$")
    other = adapter(model, 9, r"v_proj$")
    x = tokens(1, 5)
    with torch.no_grad():
        with lf.applied(model, outer), lf.applied(model, inner):
            light = model(x).logits
        with lf.applied(model, outer), lf.applied(model, other):
            mixed = model(x).logits
        torch.testing.assert_close(light, lf.call(model, inner, x).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed, lf.call(model, {**outer, **other}, x).logits, rtol=0, atol=1e-6)
    with lf.applied(model, outer):  # a training lf.call inside a light block: both act, the call innermost
        got = lf.call(model, other, x).logits
    torch.testing.assert_close(got, lf.call(model, {**outer, **other}, x).logits, rtol=0, atol=1e-6)
    assert torch._C._len_torch_function_stack() == 0


def test_a_layer_the_forward_never_calls_is_reported(model):
    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias)  # not through proj's call

    net = Direct()
    params = moved(lf.init(0, net, lf.LoRAConfig(r=2), targets=r"^proj$"))
    x = torch.randn(2, 4)
    # light (no gradient): the module is never called, so the call says so
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"targeted layers \['proj'\] were never computed"):
        lf.call(net, params, x)
    out = lf.call(net, params, x)  # op by op (a training call): the weight's op is answered
    assert not torch.allclose(out, net(x))


def test_the_remembered_plan_sees_every_change(model):
    params, x = adapter(model), tokens(2, 6)
    path = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        first = lf.call(model, params, x).logits
        assert torch.equal(lf.call(model, params, x).logits, first)  # remembered: the same answer
        params[path]["lora"]["B"].mul_(2)  # in place: read at the call
        doubled = lf.call(model, params, x).logits
        assert not torch.allclose(doubled, first)
        params[path]["lora"]["B"] = params[path]["lora"]["B"] / 2  # a new leaf object
        torch.testing.assert_close(lf.call(model, params, x).logits, first, rtol=0, atol=1e-6)
        params[path]["lora"]["A"] = torch.zeros(3, 32)  # a wrong shape is checked again
        with pytest.raises(ValueError, match=r"\['B'\] has shape \(32, 4\) but lora on W of shape \(32, 32\) needs \(32, 3\)"):
            lf.call(model, params, x)
    params[path]["lora"]["A"] = torch.zeros(4, 32, requires_grad=True)
    layer = model.get_submodule(path)
    with torch.no_grad():
        replacement = torch.nn.Linear(32, 32, bias=False)
        replacement.weight.copy_(layer.weight)
        model.model.layers[0].self_attn.q_proj = replacement  # a module replaced between calls
        lf.call(model, params, x)
        model.model.layers[0].self_attn.q_proj.weight.data = replacement.weight.double()  # a weight cast in place
        with pytest.raises(TypeError, match=r"dtype torch.float32 but the layer's weight is torch.float64"):
            lf.call(model, params, x)


def test_a_forward_that_turns_gradients_on_inside_a_gradient_free_call_keeps_the_base_detached():
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.enable_grad():
                return self.b(torch.tanh(self.a(x)))

    net = Inner()
    params = moved(lf.init(0, net, lf.LoRAConfig(r=2), targets=r"^a$"))
    x = torch.randn(3, 4)
    for _ in range(2):  # the second call replays the remembered plan (no weight walk until needed)
        with torch.no_grad():
            out = lf.call(net, params, x)
        assert out.requires_grad
        grads = torch.autograd.grad(out.sum(), [net.a.weight, net.b.weight, *lf.trainable(params)], allow_unused=True)
        assert grads[0] is None and grads[1] is None  # the base weights were detached
        assert all(g is not None for g in grads[2:])


INPUT_SIDE = [name for name, spec in lf.REGISTRY.items() if spec.apply_input is not None]


def test_input_side_variants_declare_it():
    assert {"oft", "ia3_ff"} <= set(INPUT_SIDE)


@pytest.mark.parametrize("name", INPUT_SIDE)
def test_input_side_variants_run_the_layer_once_on_the_adapted_input(name):
    """A variant that only transforms the layer's input (apply_input) is applied by the forward pre-hook on
    the light path: the layer computes its one product on x', equal to apply (and to the op-by-op path)."""
    from cases import all_cases

    cfg = next(c for n, c in all_cases() if n == name)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24))
    params = moved(lf.init(0, net, cfg), seed=3)
    x = torch.randn(5, 24)
    spec = lf.REGISTRY[name]
    leaves = params["0"][name]
    assert torch.equal(
        spec.apply(leaves, net[0].weight, x, net[0].bias), F.linear(spec.apply_input(leaves, x), net[0].weight, net[0].bias)
    )
    want = lf.call(net, params, x)  # trainable base, gradients on: op by op
    calls = []
    lf.REGISTRY[name] = dataclasses.replace(spec, apply=lambda *a, **k: calls.append(1) or spec.apply(*a, **k))
    try:
        with torch.no_grad():
            light = lf.call(net, params, x)
        frozen = copy.deepcopy(net).requires_grad_(False)
        trained = lf.call(frozen, params, x)
        with lf.applied(frozen, params):
            block = frozen(x)
    finally:
        lf.REGISTRY[name] = spec
    assert calls == []  # never the output-side apply: the layers ran on the adapted input
    assert torch.equal(light, want) and torch.equal(trained, want) and torch.equal(block, want)
    g_light = torch.autograd.grad(trained.square().sum(), lf.trainable(params))
    g_ops = torch.autograd.grad(lf.call(net, params, x).square().sum(), lf.trainable(params))
    assert all(torch.equal(a, b) for a, b in zip(g_light, g_ops))


def test_a_forward_that_raises_after_the_input_pre_hook_leaves_nothing_behind():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8)).requires_grad_(False)
    params = moved(lf.init(0, net, lf.IA3FFConfig()), seed=1)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError):  # float64 input: the pre-hook scales it, then F.linear refuses the dtype mix
        lf.call(net, params, x.double())
    assert _inject._local.adapted_inputs == []
    assert torch.equal(lf.call(net, params, x), F.linear(x * params["0"]["ia3_ff"]["g"], net[0].weight, net[0].bias))
