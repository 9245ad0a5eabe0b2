"""The injection never touches the model: threads, nested calls, other libraries' hooks, ties,
routes on models that flatten rows, leaves that would broadcast, layers the forward never computes."""

import copy
import threading

import pytest
import torch
import transformers as tf
from helpers import in_threads, moved
from models import logits, small_config, tied_llama, tiny, tokens
from torch import nn
from torch.func import vmap

import lite_fn as lf


def lora(model, seed, targets=r"(q_proj|v_proj|down_proj)$", r=4):
    return moved(lf.init(seed, model, lf.LoRAConfig(r=r), targets=targets), 10 * seed + 1)


def no_mode_left():
    return torch._C._len_torch_function_stack() == 0


# ----------------------------------------------------------------------------- threads
def test_threads_share_one_model_and_each_gets_its_own_adapter():
    model, x = tiny("llama"), tokens(2, 8)
    adapters = [lora(model, s) for s in range(8)]
    with torch.no_grad():
        expected = [logits(lf.call(model, p, x)) for p in adapters]
        plain = logits(model(x))
    # the adapters differ from each other and from the base by far more than float noise
    assert min((e - plain).abs().max().item() for e in expected) > 1e-3
    wrong, errors, barrier = [], [], threading.Barrier(5)

    def worker(t):
        try:
            barrier.wait()
            for i in range(100):
                k = (2 * t + i) % 8
                with torch.no_grad():
                    out = logits(lf.call(model, adapters[k], x))
                if not torch.equal(out, expected[k]):
                    wrong.append((t, i, k))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def plain_worker():
        barrier.wait()
        for i in range(100):
            with torch.no_grad():
                if not torch.equal(logits(model(x)), plain):
                    wrong.append(("plain", i))

    in_threads(worker, 4, plain_worker)
    assert not errors, errors
    assert wrong == []
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert no_mode_left()


def test_threads_with_base_weights_on_one_skeleton():
    model, x = tiny("llama"), tokens(2, 8)
    skeleton = copy.deepcopy(model).to("meta")
    weights = [
        {**{n: t.detach() + 0.01 * s for n, t in model.named_parameters()}, **dict(model.named_buffers())} for s in range(3)
    ]
    p = lora(model, 1)
    with torch.no_grad():
        expected = [logits(lf.call(skeleton, p, x, base=w)) for w in weights]
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    wrong = []

    def worker(t):
        for i in range(30):
            k = (t + i) % 3
            with torch.no_grad():
                if not torch.equal(logits(lf.call(skeleton, p, x, base=weights[k])), expected[k]):
                    wrong.append((t, i))

    in_threads(worker, 4)
    assert wrong == []
    assert all(t.is_meta for t in skeleton.parameters())


# ----------------------------------------------------------------------------- nesting, hooks, exceptions
class _Outer(nn.Module):
    """lin1 -> an lf.call of `inner` (its own adapter) -> lin2, all inside one outer lf.call."""

    def __init__(self, inner, inner_params):
        super().__init__()
        torch.manual_seed(3)
        self.lin1, self.lin2, self.inner = nn.Linear(8, 8), nn.Linear(8, 8), inner
        self.inner_params = inner_params

    def forward(self, x):
        h = self.lin1(x)
        h = lf.call(self.inner, self.inner_params, h)
        return self.lin2(h)


def test_nested_calls_compose():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    inner_p = moved(lf.init(1, inner, lf.LoRAConfig(r=2)), 5)
    outer = _Outer(inner, inner_p)
    outer_p = moved(lf.init(2, outer, lf.LoRAConfig(r=2), targets=r"^lin[12]$"), 7)
    x = torch.randn(3, 8)
    out = lf.call(outer, outer_p, x)
    lin = lf.variants.get("lora").apply

    def ref():
        h = lin(outer_p["lin1"]["lora"], outer.lin1.weight, x, outer.lin1.bias)
        h = lin(inner_p["0"]["lora"], inner[0].weight, h, inner[0].bias).tanh()
        h = lin(inner_p["2"]["lora"], inner[2].weight, h, inner[2].bias)
        return lin(outer_p["lin2"]["lora"], outer.lin2.weight, h, outer.lin2.bias)

    assert torch.allclose(out, ref(), atol=1e-6, rtol=0)
    assert not torch.allclose(out, outer(x), atol=1e-4)  # the inner call alone would give this
    assert no_mode_left()


def test_instance_forward_hooks_of_other_libraries_run_and_stay():
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        n = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.n += 1
            return args, kwargs

    model, x = copy.deepcopy(tiny("llama")), tokens()
    q = model.model.layers[0].self_attn.q_proj
    add_hook_to_module(q, Count())
    hooked_forward = q.forward
    p = lora(model, 1)
    expected = logits(lf.call(tiny("llama"), p, x))
    assert torch.equal(logits(lf.call(model, p, x)), expected)
    assert Count.n == 1 and q.forward is hooked_forward  # ran, and is still installed
    lf.init(0, model, lf.EVAConfig(r=2), targets=r"q_proj$", calibration=[x], progress=False)
    assert Count.n == 2 and q.forward is hooked_forward


def test_offloaded_model_weights_loaded_during_forward():
    from accelerate import cpu_offload

    model, x = copy.deepcopy(tiny("llama")), tokens()
    cpu_offload(model, execution_device="cpu")  # weights live on meta between forwards
    p = lora(tiny("llama"), 1)
    assert torch.equal(logits(lf.call(model, p, x)), logits(lf.call(tiny("llama"), p, x)))


def test_exception_mid_forward_leaves_nothing_behind():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IndexError):
        lf.call(model, lora(model, 1), torch.full((1, 3), 10_000))
    assert no_mode_left()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model(tokens())), logits(tiny("llama")(tokens())))


def test_base_gets_no_gradient_even_when_trainable():
    model = copy.deepcopy(tiny("llama")).requires_grad_(True)
    p = lora(model, 1)
    logits(lf.call(model, p, tokens())).sum().backward()
    assert all(t.grad is None for t in model.parameters())
    assert p["model.layers.0.self_attn.q_proj"]["lora"]["A"].grad is not None
    lf.trainable(p)[0].grad = None
    logits(lf.call(model, p, tokens(), freeze_base=False)).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


# ----------------------------------------------------------------------------- ties
def test_tied_head_adapted_exactly_and_merge_refused():
    model, x = tied_llama(), tokens()
    p = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=r"lm_head$"), 3)
    out = logits(lf.call(model, p, x))
    h = model.model(x).last_hidden_state
    ref = lf.variants.get("lora").apply(p["lm_head"]["lora"], model.lm_head.weight, h)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)  # the embedding (same tensor) was not adapted
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to \['model\.embed_tokens\.weight'\]"):
        lf.merge(model, p)


def test_linear_layers_sharing_one_weight_are_refused():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    m[2].weight = m[0].weight
    p = lf.init(0, m, lf.LoRAConfig(r=2), targets=r"^0$")
    with pytest.raises(ValueError, match=r"0\.weight is tied to \['2\.weight'\]"):
        lf.call(m, p, torch.randn(2, 4))


# ----------------------------------------------------------------------------- routes
@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_route_on_models_that_flatten_batch_and_sequence(kind):
    if kind == "opt":
        torch.manual_seed(0)
        config = small_config(tf.OPTConfig, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)
        model = tf.OPTForCausalLM(config).eval()
        targets = r"(fc1|fc2|q_proj)$"
    else:
        model, targets = tiny("gpt2"), r"(c_attn|c_fc|mlp\.c_proj)$"  # Conv1D flattens its input too
    x = tokens(3, 5)
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=targets), k) for k in range(3)]
    route = torch.tensor([2, 0, 2])
    mixed = logits(lf.call(model, lf.stack(adapters), x, route=route))
    for i, k in enumerate(route.tolist()):
        assert torch.allclose(mixed[i], logits(lf.call(model, adapters[k], x[i : i + 1]))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "route, message",
    [
        (torch.tensor([True, False]), "boolean mask is not a route"),
        (torch.tensor([0, -1]), "adapter index -1, but the stacked params hold 3 adapters"),
        (torch.tensor([0, 3]), "adapter index 3, but the stacked params hold 3 adapters"),
        (torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.tensor([[0, 1]]), r"shape \(1, 2\)"),
        (torch.tensor([0, 1, 2]), "route has 3 entries"),
        ("01", "got str"),
    ],
)
def test_bad_routes(route, message):
    model = tiny("llama")
    stacked = lf.stack([lora(model, k) for k in range(3)])
    with pytest.raises((ValueError, TypeError), match=message):
        lf.call(model, stacked, tokens(2, 4), route=route)
    assert no_mode_left()


def test_route_needs_stacked_params():
    model = tiny("llama")
    with pytest.raises(ValueError, match="leading adapter axis"):
        lf.call(model, lora(model, 1), tokens(2, 4), route=torch.tensor([0, 0]))


# ----------------------------------------------------------------------------- exact leaves
@pytest.mark.parametrize(
    "cfg, leaf, bad",
    [
        (lf.IA3Config(), "g", (1,)),
        (lf.LoRAConfig(r=4), "scale", (4,)),
        (lf.DoRAConfig(r=4), "m", (1,)),
        (lf.ROADConfig(group_size=8), "alpha", (1,)),
        (lf.LoRAConfig(r=4), "A", (4, 1)),
        (lf.HRAConfig(r=2), "U", (2, 1)),
    ],
)
def test_leaves_that_would_broadcast_are_refused(cfg, leaf, bad, tmp_path):
    model = tiny("llama")
    p = lf.init(0, model, cfg, targets=r"v_proj$")
    path = "model.layers.0.self_attn.v_proj"
    name = next(iter(p[path]))
    p[path][name][leaf] = torch.ones(bad)
    pattern = rf"params\['{path}'\]\['{name}'\]\['{leaf}'\] has shape {tuple(bad)}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern):
        lf.call(model, p, tokens())
    with pytest.raises(ValueError, match=pattern):
        lf.merge(model, p)


def test_missing_extra_leaf_and_dtype():
    model = tiny("llama")
    p = lf.init(0, model, lf.LoRAConfig(r=4), targets=r"v_proj$")
    leaves = p["model.layers.0.self_attn.v_proj"]["lora"]
    with pytest.raises(ValueError, match=r"missing leaf 'scale' \(expected shape \(\)\)"):
        lf.call(model, {"model.layers.0.self_attn.v_proj": {"lora": {k: v for k, v in leaves.items() if k != "scale"}}}, tokens())
    with pytest.raises(ValueError, match=r"unexpected leaf 'C'"):
        lf.call(model, {"model.layers.0.self_attn.v_proj": {"lora": {**leaves, "C": torch.ones(1)}}}, tokens())
    with pytest.raises(TypeError, match=r"\['A'\] has dtype torch.float64 but the layer's weight is torch.float32"):
        lf.call(model, {"model.layers.0.self_attn.v_proj": {"lora": {**leaves, "A": leaves["A"].double()}}}, tokens())


def test_errors_inside_the_forward_are_not_reported_as_shape_errors():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("CPU out of memory (simulated)")

    m = Boom()
    with pytest.raises(RuntimeError, match=r"^CPU out of memory \(simulated\)$"):
        lf.call(m, lf.init(0, m, lf.LoRAConfig(r=2)), torch.randn(1, 4))


# ----------------------------------------------------------------------------- unrecognised layers
def test_linear_subclass_with_its_own_forward_is_adapted_exactly():
    """A Linear subclass whose forward is not F.linear (Falcon's FalconLinear) sees the merged weight W' at every
    use: its output is its own forward with W' in place of W, in training and in a no-grad forward."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * (x @ self.weight.T) + self.bias

    torch.manual_seed(0)
    m = nn.Sequential(Scaled(4, 3))
    p = moved(lf.init(0, m, lf.LoRAConfig(r=2)), 1)
    x = torch.randn(5, 4)
    lp = p["0"]["lora"]
    W_new = m[0].weight + lp["scale"] * lp["B"] @ lp["A"]
    ref = 2 * (x @ W_new.T) + m[0].bias
    out = lf.call(m, p, x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert lp["A"].grad is not None and m[0].weight.grad is None
    with torch.no_grad():
        assert torch.allclose(lf.call(m, p, x), ref, atol=1e-6)


def test_a_weight_used_outside_its_layer_sees_the_adapted_weight():
    class MatmulLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(x @ self.a.weight.T)  # `a` is used, but not through its own call (Mamba's dt_proj)

    torch.manual_seed(0)
    m = MatmulLinear()
    x = torch.randn(2, 4)
    p = moved(lf.init(0, m, lf.LoRAConfig(r=2)), 1)
    merged = lf.merge(m, p)
    ref = torch.func.functional_call(m, merged, (x,))
    assert torch.allclose(lf.call(m, p, x), ref, atol=1e-6)  # op by op (training call): every use sees W'
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"targeted layers \['a'\] were never computed.*a\\.weight\$"):
        lf.call(m, p, x)  # the light path sees module calls only: a clear error naming the fix
    q = {"a.weight": p["a"], "b": p["b"]}  # the fix: target the weight itself
    assert lf.target_paths(m, r"(a\.weight|b)$") == ["b", "a.weight"]
    with torch.no_grad():
        assert torch.allclose(lf.call(m, q, x), ref, atol=1e-6)


def test_vmap_over_model_code_that_cannot_be_vmapped_suggests_route():
    class Legacy(torch.autograd.Function):  # old-style: no setup_context, so no functorch support
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return Legacy.apply(self.lin(x))

    m = M()
    stacked = lf.stack([moved(lf.init(k, m, lf.LoRAConfig(r=2)), k) for k in range(2)])
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=r"route=route"):
        vmap(lambda p: lf.call(m, p, x))(stacked)
    out = lf.call(m, stacked, x, route=torch.tensor([1, 0]))  # the suggested way works
    assert out.shape == (2, 4)


# ----------------------------------------------------------------------------- the rest of the list
def test_with_alpha_validates_and_copies():
    model = tiny("llama")
    p = lf.init(0, model, lf.AntiPaSTOConfig(r=8, block_size=4), targets=r"o_proj$")
    q = lf.with_alpha(p, 0.5)
    path = "model.layers.0.self_attn.o_proj"
    assert q is not p and q[path] is not p[path] and q[path]["antipasto"] is not p[path]["antipasto"]
    assert p[path]["antipasto"]["alpha"].item() == 1.0 and q[path]["antipasto"]["alpha"].item() == 0.5
    for bad in (float("nan"), float("inf"), "1", True, None, torch.tensor(float("nan")), torch.ones(2), torch.tensor(1)):
        with pytest.raises(ValueError, match="alpha"):
            lf.with_alpha(p, bad)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 2), nn.Linear(16, 16)

    def forward(self, x, z):
        return self.a(x).sum() + self.b(z).sum()


def test_eva_plan_never_exceeds_layer_width():
    # a's inputs have 3 strong directions, b's are isotropic: the budget (2 + 2) would give a rank 3 > d_out=2
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 16, generator=g)
    data = [(torch.randn(64, 3, generator=g) @ mix, torch.randn(64, 16, generator=g)) for _ in range(2)]
    p = lf.init(0, _TwoInputs(), lf.EVAConfig(r=2, rho=4.0), calibration=data, progress=False)
    assert {k: v["eva"]["A"].shape[0] for k, v in p.items()} == {"a": 2, "b": 2}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_max_batches_must_be_positive(bad):
    with pytest.raises(ValueError, match=rf"max_batches={bad!r} must be a positive int"):
        lf.init(0, tiny("llama"), lf.EVAConfig(r=2), targets=r"q_proj$", calibration=[tokens()], max_batches=bad)


def test_every_variant_returns_contiguous_leaves():
    from cases import all_cases
    from helpers import needs_calibration

    model = tiny("llama")
    for _, cfg in all_cases():
        calib = [tokens(2, 6, seed=7)] if needs_calibration(cfg, model) else None
        p = lf.init(0, model, cfg, targets=r"(o_proj|down_proj)$", calibration=calib, progress=False)
        for path, bv in p.items():
            for name, leaves in bv.items():
                assert all(v.is_contiguous() for v in leaves.values()), (name, path)


def test_gradient_checkpointing_without_the_context_is_refused_while_training():
    torch.manual_seed(0)
    cfg = small_config(tf.LlamaConfig, num_key_value_heads=2, intermediate_size=64)
    model = tf.LlamaForCausalLM(cfg)
    model.activation_checkpointing_enable() if hasattr(
        model, "activation_checkpointing_enable"
    ) else model.gradient_checkpointing_enable()
    model.train()
    p = lora(model, 1, targets=r"q_proj$")
    with pytest.raises(RuntimeError, match=r"inside torch.utils.checkpoint without lf.checkpoint_context"):
        lf.call(model, p, tokens())
    with torch.no_grad():
        assert torch.equal(logits(lf.call(model, p, tokens())), logits(lf.call(model.eval(), p, tokens())))
