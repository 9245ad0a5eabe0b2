"""peft's non-module targets, both ways, against the installed peft on perturbed tensors:
target_parameters (LoRA on raw parameters: transformers' fused MoE experts, nested ParamWrappers, is_transposed),
modules_to_save (lite_fn's full-copy variant) and bias="all" / "lora_only" (trained base biases)."""

import copy
import json

import peft
import pytest
import torch
import transformers as tf
from helpers import moved, rel_err
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call, vmap

import lite_fn as lf

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def mixtral():
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return tf.MixtralForCausalLM(cfg).eval()


def ids(seed=0, shape=(2, 5)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def peft_model(model, config, seed=0, scale=0.3):
    """peft's adapter on a copy of ``model``, every trainable tensor moved off its init (randomly)."""
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return pm.eval()


def peft_grads(pm, out) -> dict:
    """The gradient of out's loss for every tensor peft saves, keyed as peft's file keys them."""
    out.square().sum().backward()
    sd = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    sd.update({n: p.grad for n, p in pm.named_parameters() if p.grad is not None})
    return peft.get_peft_model_state_dict(pm, state_dict=sd)


def as_peft(tmp_path, tree, model, name="grads") -> dict:
    """``tree`` (params, or their gradients in the params' places) as the tensors of the peft file lite_fn writes."""
    lf.save_peft(tmp_path / name, tree, model=model)
    return load_file(tmp_path / name / "adapter_model.safetensors")


def grads_of(params, out) -> dict:
    """params with each trainable leaf replaced by out's loss gradient (frozen leaves as they are)."""
    out.square().sum().backward()
    return {
        p: {n: {k: (v.grad if v.requires_grad else v) for k, v in lv.items()} for n, lv in bv.items()} for p, bv in params.items()
    }


# ----------------------------------------------------------------------------- target_parameters
def test_moe_experts_load_parity_outputs_and_grads(mixtral, tmp_path):
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], target_parameters=EXPERTS, init_lora_weights=False)
    pm = peft_model(mixtral, cfg)
    pm.save_pretrained(tmp_path / "p")
    x = ids()
    want = pm(x).logits
    params = lf.load_peft(tmp_path / "p", model=mixtral)
    gate_up = params["model.layers.0.mlp.experts.gate_up_proj"]["lora"]
    assert {k: tuple(v.shape) for k, v in gate_up.items()} == {"A": (4, 2, 32), "B": (4, 48, 2), "scale": (4,)}
    got = lf.call(mixtral, params, x).logits
    assert rel_err(got, want) <= 1e-5 and rel_err(mixtral(x).logits, want) > 0.1  # the adapters act
    theirs = peft_grads(pm, want)
    ours = as_peft(tmp_path, grads_of(params, got), mixtral)
    assert ours.keys() == theirs.keys()  # the nesting of peft's wrappers: gate_up_proj inside down_proj
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in ours
    assert all(rel_err(ours[k], theirs[k]) <= 1e-4 for k in theirs), {k: rel_err(ours[k], theirs[k]) for k in theirs}


def test_moe_experts_save_is_what_peft_loads(mixtral, tmp_path):
    mine = moved(
        lf.init(0, mixtral, lf.LoRAConfig(r=2, alpha=4), targets=r"(experts\.(gate_up_proj|down_proj)|v_proj)$"), scale=0.3
    )
    lf.save_peft(tmp_path / "a", mine, model=mixtral)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(p for p in mine if "experts" in p)
    x = ids(1)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(mixtral), tmp_path / "a").eval()
    ours = lf.call(mixtral, mine, x).logits
    assert rel_err(theirs(x).logits, ours) <= 1e-5 and rel_err(mixtral(x).logits, ours) > 0.1
    again = lf.load_peft(tmp_path / "a", model=mixtral)
    assert all(torch.equal(again[p]["lora"][k], v) for p, bv in mine.items() for k, v in bv["lora"].items())


class Experts(nn.Module):
    """Experts stored (E, in, out) with ``is_transposed`` (as transformers' GPT-OSS), a 2-D (out, in) parameter, and
    three parameters targeted on one module: peft nests three ParamWrappers (registration order, first innermost)."""

    is_transposed = True

    def __init__(self, E=3, d=6, h=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.up = nn.Parameter(torch.randn(E, d, h, generator=g) / d**0.5)  # (E, in, out)
        self.mix = nn.Parameter(torch.randn(h, h, generator=g) / h**0.5)  # (out, in)
        self.down = nn.Parameter(torch.randn(E, h, d, generator=g) / h**0.5)

    def forward(self, x):  # x (E, n, d): expert e on its own rows
        return torch.bmm(torch.tanh(torch.bmm(x, self.up)) @ self.mix.T, self.down)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Experts()

    def forward(self, x):
        return self.experts(x)


def test_transposed_experts_and_three_nested_wrappers_both_ways(tmp_path):
    model = Holder().eval()
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    names = ["experts.down", "experts.up", "experts.mix"]
    pm = peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=5, target_modules=[], target_parameters=names, init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "p")
    keys = set(load_file(tmp_path / "p" / "adapter_model.safetensors"))
    assert "base_model.model.experts.base_layer.base_layer.lora_A.weight" in keys  # up: registered first, innermost
    params = lf.load_peft(tmp_path / "p", model=model)
    assert {k: tuple(v.shape) for k, v in params["experts.up"]["lora"].items()} == {"A": (3, 2, 5), "B": (3, 6, 2), "scale": (3,)}
    ours = lf.call(model, params, x)
    assert rel_err(ours, pm(x)) <= 1e-5 and rel_err(model(x), pm(x)) > 0.1
    lf.save_peft(tmp_path / "a", params, model=model)
    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == keys
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    assert rel_err(theirs(x), ours) <= 1e-5
    merged = lf.merge(model, params)  # merge == call, per expert
    assert rel_err(functional_call(model, merged, (x,)), ours) <= 1e-5


def test_moe_vmap_over_stacked_equals_loop_and_merge_equals_call(mixtral):
    mine = [
        moved(lf.init(k, mixtral, lf.LoRAConfig(r=2), targets=r"experts\.(gate_up_proj|down_proj)$"), seed=k, scale=0.3)
        for k in range(3)
    ]
    x = ids(2)
    loop = torch.stack([lf.call(mixtral, p, x).logits for p in mine])
    stacked = vmap(lambda p: lf.call(mixtral, p, x).logits, randomness="same")(lf.stack(mine))
    assert rel_err(stacked, loop) <= 1e-5 and rel_err(loop[0], loop[1]) > 1e-3
    merged = functional_call(mixtral, lf.merge(mixtral, mine[0]), (x,)).logits
    assert rel_err(merged, loop[0]) <= 1e-5


def test_target_parameters_refusals(mixtral, tmp_path):
    cfg = peft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    peft_model(mixtral, cfg).save_pretrained(tmp_path / "p")
    config = tmp_path / "p" / "adapter_config.json"
    fields = json.loads(config.read_text())
    config.write_text(json.dumps({**fields, "use_dora": True}))
    with pytest.raises(ValueError, match=r"target_parameters=.*use_dora=True.*ParamWrapper refuses"):
        lf.load_peft(tmp_path / "p", model=mixtral)
    config.write_text(json.dumps({**fields, "r": 3}))
    with pytest.raises(ValueError, match=r"gate_up_proj.*has rank 2 but .* gives r=3"):
        lf.load_peft(tmp_path / "p", model=mixtral)
    mine = lf.init(0, mixtral, lf.LoRAConfig(r=2), targets=r"layers\.0\.mlp\.experts\.down_proj$")
    scale = mine["model.layers.0.mlp.experts.down_proj"]["lora"]["scale"]
    scale[1] = 3.0  # one expert with its own scale: peft has one per parameter
    with pytest.raises(ValueError, match=r"per-expert scales .*one scale"):
        lf.save_peft(tmp_path / "x", mine, model=mixtral)
    dora = lf.init(0, mixtral, lf.DoRAConfig(r=2), targets=r"layers\.0\.mlp\.gate\.weight$")  # the router's (E, H)
    with pytest.raises(ValueError, match=r"raw parameters.*plain LoRA only.*use_dora"):
        lf.save_peft(tmp_path / "x", dora, model=mixtral)


# ----------------------------------------------------------------------------- modules_to_save: full copies
class Net(nn.Module):
    def __init__(self, norm_bias=False):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 4)
        self.ln = nn.LayerNorm(4, bias=norm_bias)
        self.c = nn.Linear(4, 4)
        self.conv = nn.Conv1d(2, 3, 2)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x, tokens):
        h = self.c(self.ln(self.b(torch.relu(self.a(x) + self.emb(tokens)))))
        return self.classifier(h) + self.conv(h.reshape(*h.shape[:-1], 2, 2)).sum(-1).sum(-1, keepdim=True)


def net_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 6, generator=g), torch.randint(0, 7, (3,), generator=g)


@pytest.mark.parametrize(
    "cfg",
    [
        peft.LoraConfig(r=2, target_modules=["a", "b"], modules_to_save=["classifier", "conv", "emb"]),
        peft.IA3Config(target_modules=["a", "b"], feedforward_modules=[], modules_to_save=["classifier", "conv"]),
    ],
    ids=["lora", "ia3"],
)
def test_modules_to_save_load_parity_grads_and_round_trip(cfg, tmp_path):
    model = Net().eval()
    pm = peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "p")
    x = net_inputs()
    want = pm(*x)
    params = lf.load_peft(tmp_path / "p", model=model)
    assert sorted(params["classifier"]["full"]) == ["bias", "weight"] and params["conv"]["full"]["weight"].shape == (3, 4)
    got = lf.call(model, params, *x)
    assert rel_err(got, want) <= 1e-5 and rel_err(model(*x), want) > 0.1
    theirs = peft_grads(pm, want)
    ours = as_peft(tmp_path, grads_of(params, got), model)
    assert ours.keys() == theirs.keys()
    assert all(rel_err(ours[k], theirs[k]) <= 1e-4 for k in theirs), {k: rel_err(ours[k], theirs[k]) for k in theirs}
    lf.save_peft(tmp_path / "a", params, model=model)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == sorted(cfg.modules_to_save)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    assert rel_err(back(*x), got) <= 1e-5


def test_full_copies_from_lf_init_on_every_kind_save_and_vmap(tmp_path):
    """FullConfig on a Linear, a convolution, an embedding (weight substitution) next to LoRA; written as modules_to_save."""
    model = Net().eval()
    lora = lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^(a|b)$")
    full = lf.init(1, model, lf.FullConfig(), targets=r"^(classifier|conv|emb)$")
    assert sorted(full["conv"]["full"]) == ["weight"] and torch.equal(full["emb"]["full"]["weight"], model.emb.weight.T)
    x = net_inputs(1)
    assert rel_err(lf.call(model, full, *x), model(*x)) <= 1e-7  # identity at init: W' = W
    trees = [{**moved(lora, seed=k, scale=0.3), **moved(full, seed=10 + k, scale=0.3)} for k in range(2)]
    ours = lf.call(model, trees[0], *x)
    lf.save_peft(tmp_path / "a", trees[0], model=model)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    assert rel_err(theirs(*x), ours) <= 1e-5 and rel_err(model(*x), ours) > 0.1
    loop = torch.stack([lf.call(model, t, *x) for t in trees])
    assert rel_err(vmap(lambda t: lf.call(model, t, *x))(lf.stack(trees)), loop) <= 1e-5
    assert rel_err(functional_call(model, lf.merge(model, trees[0]), x), ours) <= 1e-5


def test_full_copy_of_moe_experts(mixtral, tmp_path):
    """A full copy of a raw 3-D parameter (one per expert) is peft's modules_to_save copy of its module."""
    mine = moved(
        {
            **lf.init(0, mixtral, lf.LoRAConfig(r=2), targets=r"layers\.1\.self_attn\.q_proj$"),
            **lf.init(1, mixtral, lf.FullConfig(), targets=r"layers\.0\.mlp\.experts\.down_proj$"),
        },
        scale=0.05,
    )
    x = ids(3)
    ours = lf.call(mixtral, mine, x).logits
    lf.save_peft(tmp_path / "a", mine, model=mixtral)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == ["model.layers.0.mlp.experts"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(mixtral), tmp_path / "a").eval()
    assert rel_err(theirs(x).logits, ours) <= 1e-5 and rel_err(mixtral(x).logits, ours) > 1e-3
    again = lf.load_peft(tmp_path / "a", model=mixtral)  # the whole experts module: gate_up_proj copied too
    assert sorted(p for p, bv in again.items() if "full" in bv) == [
        f"model.layers.0.mlp.experts.{n}" for n in ("down_proj", "gate_up_proj")
    ]
    assert rel_err(lf.call(mixtral, again, x).logits, ours) <= 1e-6


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.proj = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 8)

    def forward(self, h):
        return self.proj(self.attn(h, h, h, need_weights=False)[0])


def test_full_copy_of_multihead_attention(tmp_path):
    """Full copies of an nn.MultiheadAttention's packed in_proj and of its out_proj: one modules_to_save copy."""
    net = Attn().eval()
    tree = moved(
        {
            **lf.init(0, net, lf.LoRAConfig(r=2), targets=r"^proj$"),
            **lf.init(1, net, lf.FullConfig(), targets=r"^attn(\.out_proj)?$"),
        },
        scale=0.2,
    )
    h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    ours = lf.call(net, tree, h)
    lf.save_peft(tmp_path / "m", tree, model=net)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["modules_to_save"] == ["attn"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "m").eval()
    assert rel_err(theirs(h), ours) <= 1e-5 and rel_err(net(h), ours) > 0.1
    again = lf.load_peft(tmp_path / "m", model=net)
    assert sorted(again["attn"]["full"]) == ["bias", "weight"] and rel_err(lf.call(net, again, h), ours) <= 1e-6


def test_training_full_copies_and_experts_leaves_the_base_untouched(mixtral):
    before = {k: v.detach().clone() for k, v in mixtral.state_dict().items()}
    params = {
        **lf.init(0, mixtral, lf.LoRAConfig(r=2), targets=r"experts\.gate_up_proj$"),
        **lf.init(1, mixtral, lf.FullConfig(), targets=r"(lm_head|layers\.0\.mlp\.experts\.down_proj)$"),
    }
    opt = torch.optim.SGD(lf.trainable(params), lr=0.1)
    x = ids(4)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lf.call(mixtral, params, x).logits.flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert not torch.equal(params["lm_head"]["full"]["weight"], mixtral.lm_head.weight)
    assert all(torch.equal(v, before[k]) for k, v in mixtral.state_dict().items())
    assert all(p.grad is None for p in mixtral.parameters())


# ----------------------------------------------------------------------------- bias="all" / "lora_only"
@pytest.mark.parametrize(
    "kw",
    [
        dict(bias="lora_only"),
        dict(bias="all"),
        dict(bias="all", modules_to_save=["classifier"]),
        dict(bias="all", lora_bias=True),
    ],
    ids=["lora_only", "all", "all+modules_to_save", "all+lora_bias"],
)
def test_trained_biases_load_and_save_with_parity(kw, tmp_path):
    model = Net().eval()  # its LayerNorm has no bias: every bias peft trains is a layer's
    pm = peft_model(model, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["a", "b"], **kw))
    pm.save_pretrained(tmp_path / "p")
    x = net_inputs(2)
    want = pm(*x)
    params = lf.load_peft(tmp_path / "p", model=model)
    assert "bias" in params["a"]["lora"] and "bias" in params["b"]["lora"]  # the trained base biases, on LoRA's leaf
    if kw["bias"] == "all":
        assert sorted(params["c"]["full"]) == ["bias"]  # a layer that is no LoRA target: its bias alone
    got = lf.call(model, params, *x)
    assert rel_err(got, want) <= 1e-5 and rel_err(model(*x), want) > 0.1
    assert rel_err(functional_call(model, lf.merge(model, params), x), got) <= 1e-5
    lf.save_peft(tmp_path / "a", params, model=model)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    assert rel_err(back(*x), got) <= 1e-5


def test_trained_bias_refusals(tmp_path):
    model = Net(norm_bias=True).eval()
    peft_model(model, peft.LoraConfig(r=2, target_modules=["a", "b"], bias="all")).save_pretrained(tmp_path / "ln")
    with pytest.raises(ValueError, match=r"'ln\.bias' \(of a LayerNorm\).*differs from the model's.*not 1-D"):
        lf.load_peft(tmp_path / "ln", model=model)
    peft_model(model, peft.LoraConfig(r=2, target_modules=["a"], use_dora=True, bias="lora_only")).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match=r"'a' \(read as dora\) has a bias .* that differs from the model's.*LoRA only"):
        lf.load_peft(tmp_path / "d", model=model)
    untrained = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["a"], use_dora=True, bias="all"))
    untrained.save_pretrained(tmp_path / "u")  # biases as the model's: DoRA, and (trainable) copies of the others'
    loaded = lf.load_peft(tmp_path / "u", model=model)
    assert list(loaded["a"]) == ["dora"] and sorted(loaded) == ["a", "b", "c", "classifier", "conv"]
    own = {n: t for n, t in model.named_parameters()}
    assert all(torch.equal(loaded[p]["full"]["bias"], own[f"{p}.bias"]) for p in ("b", "c", "classifier", "conv"))


def test_full_copy_save_refusals(tmp_path):
    model = Net().eval()
    full = lf.init(0, model, lf.FullConfig(), targets=r"^classifier$")
    with pytest.raises(ValueError, match=r"only full copies.*needs at least one layer adapted by a peft type"):
        lf.save_peft(tmp_path / "x", full, model=model)
    seq = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    tree = {**lf.init(0, seq, lf.LoRAConfig(r=2), targets=r"^1\.1$"), **lf.init(1, seq, lf.FullConfig(), targets=r"^0$")}
    with pytest.raises(ValueError, match=r"modules_to_save matches module names by suffix.*\['0'\] would also copy \['1\.0'\]"):
        lf.save_peft(tmp_path / "x", tree, model=seq)
    inside = {**lf.init(0, seq, lf.LoRAConfig(r=2), targets=r"^1\.1$"), **lf.init(1, seq, lf.FullConfig(), targets=r"^1\.0$")}
    inside["1.1.weight"] = lf.init(2, seq, lf.FullConfig(), targets=r"^1\.1\.weight$")["1.1.weight"]
    with pytest.raises(ValueError, match=r"adapted \(LORA\) inside '1\.1'"):
        lf.save_peft(tmp_path / "x", inside, model=seq)
    stray = lf.init(0, model, lf.FullConfig(), targets=r"^b$")
    stray["b"]["full"]["bias"] = torch.zeros(4)
    nb = Net()
    nb.b = nn.Linear(5, 4, bias=False)
    with pytest.raises(ValueError, match=r"no bias has a 'bias' leaf"):
        lf.call(nb, stray, *net_inputs())


def test_modules_to_save_selects_what_peft_wraps():
    """peft's plain endswith on the model's module names (no dot): "0" selects "seq.0" and "seq.1.0"; nested and shared
    matches are refused."""
    from lite_fn.peft_io import _matcher

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Linear(4, 4)
            self.seq = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))

        def forward(self, h):
            return self.seq(self.x(h))

    model = Top()
    for names in (["0"], ["q.x"], ["seq.1.0", "x"]):
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["seq.1.1"], modules_to_save=names))
        wrapped = sorted(
            n.removeprefix("base_model.model.") for n, m in pm.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"
        )
        assert sorted(_matcher.save_paths({"modules_to_save": names}, model, "test")) == wrapped, names
    with pytest.raises(ValueError, match=r"selects both 'seq' and 'seq\.0' inside it"):
        _matcher.save_paths({"modules_to_save": ["seq", "seq.0"]}, model, "test")
    shared = nn.Sequential(model.x, model.x)
    with pytest.raises(ValueError, match=r"one module under two names \('1', '0'\)"):
        _matcher.save_paths({"modules_to_save": ["0", "1"]}, shared, "test")
