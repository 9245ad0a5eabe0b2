"""peft options lite_fn now reproduces: LoRA's lora_bias (a bias on lora_B) and HRA's apply_GS (Gram–Schmidt form).

Parity with the installed peft on perturbed adapters (outputs 1e-5, gradients 1e-4) on nn.Linear and transformers'
Conv1D; peft -> lf.load_peft and lf.save_peft -> peft on tiny models; vmap == loop over stacked (padded) params;
merge == call; and every refusal where peft itself has no math to match (DoRA with lora_bias, merging a lora_bias
into a bias-free layer, add_weighted_adapter's dropped biases, Gram–Schmidt on dependent vectors).
"""

import copy
import json
from typing import Any

import peft
import pytest
import torch
from helpers import NewTensorSizes, assert_matches_reference, make_layer, moved, peft_linear, rel_err
from models import logits, tiny, tokens
from torch import nn
from torch.func import functional_call, vmap
from transformers.pytorch_utils import Conv1D

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import hra, lora

IDS = tokens(2, 6)
D_OUT, D_IN = 20, 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and much faster on a busy 2-core machine; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers
def moved_peft(base, cfg, seed=0, scale=0.1):
    """peft's get_peft_model on a copy of base, every trainable adapter parameter moved off its init."""
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return pm.eval()


def saved(pm, tmp_path, name="adapter"):
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def from_pretrained(base, path):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def out(model, x=IDS):
    with torch.no_grad():
        return logits(model(x))


def lite_out(base, params, x=IDS):
    with torch.no_grad():
        return logits(lf.call(base, params, x))


def config_of(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def edit_config(path, **fields):
    (path / "adapter_config.json").write_text(json.dumps({**config_of(path), **fields}))


def assert_same(a, b, effect_vs=None, tol=1e-5):
    assert rel_err(a, b) <= tol, rel_err(a, b)
    if effect_vs is not None:  # the adapter really changes the output
        assert rel_err(effect_vs, b) > 1e-4, rel_err(effect_vs, b)


def with_bias_layer(kind, W, b, **cfg):
    """peft's LoRA (lora_bias=True) around one nn.Linear or transformers Conv1D holding copies of W (d_out, d_in) and
    b, every adapter tensor perturbed; the adapted layer."""
    layer: Any
    if kind == "Linear":
        layer = peft_linear(W, b, peft.LoraConfig, lora_bias=True, **cfg)
    else:
        conv: Any = Conv1D(W.shape[0], W.shape[1])  # Conv1D(nf=d_out, nx=d_in) stores W as (d_in, d_out)
        with torch.no_grad():
            conv.weight.copy_(W.T)
            conv.bias.copy_(b)
        peft_cfg = peft.LoraConfig(target_modules=["0"], lora_bias=True, fan_in_fan_out=True, **cfg)
        wrapped: Any = peft.get_peft_model(nn.Sequential(conv), peft_cfg).base_model
        layer = wrapped.model[0]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return layer


def leaves_of(layer):
    """lite_fn LoRA leaves copied from a peft LoRA layer (trainable ones requiring grad)."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return {
        "A": A.detach().clone().requires_grad_(True),
        "B": B.detach().clone().requires_grad_(True),
        "bias": layer.lora_B["default"].bias.detach().clone().requires_grad_(True),
        "scale": torch.tensor(layer.scaling["default"]),
    }


def gram_schmidt_R(U):
    """R = I − 2QQᵀ with Q = classical Gram–Schmidt of the rows of U, dense, in U's dtype (the docstring's math)."""
    qs = []
    for u in U:
        v = u - sum(((q @ u) * q for q in qs), torch.zeros_like(u))
        qs.append(v / v.norm())
    Q = torch.stack(qs, dim=1)  # (d_in, r)
    return torch.eye(U.shape[1], dtype=U.dtype) - 2.0 * Q @ Q.T


def peft_hra_layer(W, b, r, seed=4):
    """peft's HRA with apply_GS=True (init_weights=False) around one nn.Linear, its vectors redrawn."""
    layer = peft_linear(W, b, peft.HRAConfig, r=r, apply_GS=True, init_weights=False)
    u = layer.hra_u["default"]
    with torch.no_grad():
        u.copy_(torch.randn(u.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


# ----------------------------------------------------------------------------- lora_bias: the layer
@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_bias_parity_outputs_and_grads(kind, use_rslora):
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = with_bias_layer(kind, W, b, r=4, lora_alpha=6, use_rslora=use_rslora)
    p = leaves_of(layer)
    ref = layer.lora_B["default"]
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    y_ref, _ = assert_matches_reference(
        layer,
        lambda h: lora.apply(p, W, h, b),
        x,
        [("A", p["A"], layer.lora_A["default"].weight), ("B", p["B"], ref.weight), ("bias", p["bias"], ref.bias)],
        cotangent=6,
    )
    without = {k: v for k, v in p.items() if k != "bias"}
    assert rel_err(lora.apply(without, W, x, b), y_ref) > 1e-2  # the bias term is really there


def test_lora_bias_formula_float64_with_dropout():
    """y = x Wᵀ + b + s·((x̃ Aᵀ) Bᵀ + bias): the bias is lora_B's, never dropped (peft: lora_B(lora_A(dropout(x))))."""
    g = torch.Generator().manual_seed(0)
    W, b = (t.double() for t in make_layer(D_OUT, D_IN, seed=1))
    p = {
        "A": torch.randn(3, D_IN, generator=g, dtype=torch.float64),
        "B": torch.randn(D_OUT, 3, generator=g, dtype=torch.float64),
        "bias": torch.randn(D_OUT, generator=g, dtype=torch.float64),
        "scale": torch.tensor(1.7, dtype=torch.float64),
        "dropout": torch.tensor(0.4, dtype=torch.float64),
    }
    x = torch.randn(6, D_IN, generator=g, dtype=torch.float64)
    noise = torch.rand(x.shape, generator=g, dtype=torch.float64)
    xd = torch.where(noise >= 0.4, x / 0.6, 0.0)
    assert rel_err(lora.apply(p, W, x, b, noise), x @ W.T + b + 1.7 * ((xd @ p["A"].T) @ p["B"].T + p["bias"])) <= 1e-12
    assert rel_err(lora.apply(p, W, x, None), x @ W.T + 1.7 * ((x @ p["A"].T) @ p["B"].T + p["bias"])) <= 1e-12


def test_lora_bias_init_is_zero_trainable_and_identity():
    W, b = make_layer(D_OUT, D_IN)
    p = lora.init(0, W, lf.LoRAConfig(r=4, lora_bias=True))
    assert p["bias"].shape == (D_OUT,) and p["bias"].requires_grad and torch.equal(p["bias"], torch.zeros(D_OUT))
    assert "bias" in lora.TRAINABLE and "bias" not in lora.init(0, W, lf.LoRAConfig(r=4))
    assert torch.equal(p["A"], lora.init(0, W, lf.LoRAConfig(r=4))["A"])  # the same draws with or without the bias
    x = torch.randn(3, D_IN)
    assert torch.equal(lora.apply(p, W, x, b), torch.nn.functional.linear(x, W, b))
    model = tiny("gpt2")
    params = lf.init(0, model, lf.LoRAConfig(r=2, lora_bias=True), targets=r"c_attn$")
    assert all(t.requires_grad for t in lf.trainable(params) if t.shape == (96,))
    assert sum(t.shape == (96,) for t in lf.trainable(params)) == 2  # c_attn's d_out, one bias per layer
    with pytest.raises(ValueError, match=r"lora_bias=1 must be True or False"):
        lf.LoRAConfig(lora_bias=1)  # type: ignore[arg-type]


def test_lora_bias_vmap_and_apply_runs_equal_the_loop():
    W, b = make_layer(D_OUT, D_IN)
    g = torch.Generator().manual_seed(2)
    ps = [
        {
            "A": torch.randn(3, D_IN, generator=g),
            "B": torch.randn(D_OUT, 3, generator=g),
            "bias": torch.randn(D_OUT, generator=g),
            "scale": torch.tensor(0.5 + k),
        }
        for k in range(4)
    ]
    stacked = {k: torch.stack([p[k] for p in ps]) for k in ps[0]}
    x = torch.randn(5, D_IN, generator=g)
    want = torch.stack([lora.apply(p, W, x, b) for p in ps])
    assert rel_err(vmap(lora.apply, in_dims=(0, None, None, None))(stacked, W, x, b), want) <= 1e-6
    runs = torch.randn(4, 2, 3, D_IN, generator=g)
    want = torch.stack([lora.apply(p, W, xi, b) for p, xi in zip(ps, runs)])
    assert rel_err(lora.apply_runs(stacked, W, runs, b), want) <= 1e-6
    assert rel_err(lora.apply_runs(stacked, W, runs, None), want - b) <= 1e-6


# ----------------------------------------------------------------------------- lora_bias: peft files, both ways
@pytest.mark.parametrize(
    "kind,targets",
    [("gpt2", ["c_attn", "c_fc"]), ("llama", ["q_proj", "down_proj"])],  # Conv1D with biases; Linear without
)
def test_peft_lora_bias_file_loads_and_saves_back(kind, targets, tmp_path):
    base = tiny(kind)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True, rank_pattern={targets[1]: 2})
    pm = moved_peft(base, cfg)
    d = saved(pm, tmp_path)
    assert config_of(d)["lora_bias"] is True
    params = lf.load_peft(d, model=base)
    for leaves in (bv["lora"] for bv in params.values()):
        assert leaves["bias"].requires_grad and leaves["bias"].abs().sum() > 0
    want = out(pm)
    assert_same(lite_out(base, params), want, effect_vs=out(base))
    without = {p: {"lora": {k: v for k, v in bv["lora"].items() if k != "bias"}} for p, bv in params.items()}
    assert rel_err(lite_out(base, without), want) > 1e-4  # the biases matter
    lf.save_peft(tmp_path / "back", params, model=base)
    assert config_of(tmp_path / "back")["lora_bias"] is True
    assert_same(out(from_pretrained(base, tmp_path / "back")), want)


def test_lite_fn_lora_bias_saves_for_peft(tmp_path):
    base = tiny("gpt2")
    params = moved(lf.init(0, base, lf.LoRAConfig(r=2, alpha=3, lora_bias=True), targets=r"(c_attn|c_proj)$"))
    lf.save_peft(tmp_path / "a", params, model=base)
    cfg = config_of(tmp_path / "a")
    assert cfg["lora_bias"] is True and cfg["fan_in_fan_out"] is True
    assert_same(out(from_pretrained(base, tmp_path / "a")), lite_out(base, params), effect_vs=out(base))
    # without any bias leaf the flag stays off
    plain = moved(lf.init(0, base, lf.LoRAConfig(r=2), targets=r"c_attn$"))
    lf.save_peft(tmp_path / "b", plain, model=base)
    assert config_of(tmp_path / "b")["lora_bias"] is False


def test_save_refuses_a_partial_lora_bias(tmp_path):
    base = tiny("gpt2")
    a = lf.init(0, base, lf.LoRAConfig(r=2, lora_bias=True), targets=r"c_attn$")
    c = lf.init(1, base, lf.LoRAConfig(r=2), targets=r"c_proj$")
    with pytest.raises(ValueError, match=r"lora_bias is one flag.*have a lora_B bias.*do not.*zero bias"):
        lf.save_peft(tmp_path / "x", {**a, **c}, model=base)


def test_load_refuses_lora_bias_where_peft_refuses_it(tmp_path):
    base = tiny("llama")
    with pytest.raises(ValueError, match="not supported for DoRA"):  # peft's own refusal: no math to match
        peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, lora_bias=True)
    d = saved(moved_peft(base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)), tmp_path, "dora")
    edit_config(d, lora_bias=True)
    with pytest.raises(ValueError, match=r"lora_bias=True with use_dora=True.*peft itself refuses"):
        lf.load_peft(d, model=base)
    d = saved(moved_peft(base, peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)), tmp_path, "g")
    edit_config(d, init_lora_weights="gaussian")
    with pytest.raises(ValueError, match=r"lora_bias=True with init_lora_weights='gaussian'.*True or False"):
        lf.load_peft(d, model=base)
    edit_config(d, init_lora_weights=True, lora_bias="yes")
    with pytest.raises(ValueError, match=r"lora_bias='yes'; expected true or false"):
        lf.load_peft(d, model=base)
    edit_config(d, lora_bias=False)  # the file still holds lora_B.bias: named, not ignored
    with pytest.raises(ValueError, match=r"has tensor\(s\) \['lora_B.bias'\] that lora does not use"):
        lf.load_peft(d, model=base)


def test_dora_refuses_lora_bias_and_a_stray_bias_leaf():
    with pytest.raises(ValueError, match=r"DoRAConfig: lora_bias=True is not supported.*LoRAConfig\(lora_bias=True\)"):
        lf.DoRAConfig(lora_bias=True)
    model = tiny("gpt2")
    for cfg, name in ((lf.DoRAConfig(r=2), "dora"), (lf.PiSSAConfig(r=2), "pissa")):
        params = lf.init(0, model, cfg, targets=r"c_attn$")
        for bv in params.values():
            bv[name]["bias"] = torch.zeros(96)
        with pytest.raises(ValueError, match=r"unexpected leaf 'bias'"):  # refused, never silently ignored
            lf.call(model, params, IDS)


def test_eva_with_a_bias_leaf_computes_lora_math():
    """EVA shares LoRA's leaves and forward, so a bias leaf there means what it means for LoRA."""
    W, b = make_layer(D_OUT, D_IN)
    p = moved({"l": {"lora": lora.init(0, W, lf.LoRAConfig(r=3, lora_bias=True))}})["l"]["lora"]
    x = torch.randn(4, D_IN)
    assert rel_err(variants.get("eva").apply(p, W, x, b), lora.apply(p, W, x, b)) <= 1e-7


# ----------------------------------------------------------------------------- lora_bias: merge, stack, arithmetic
def test_merge_equals_call_and_refuses_a_bias_free_layer():
    model = tiny("gpt2")  # Conv1D layers with biases
    params = moved(lf.init(0, model, lf.LoRAConfig(r=2, alpha=4, lora_bias=True), targets=r"(c_attn|c_fc)$"))
    merged = lf.merge(model, params)
    assert {k.rsplit(".", 1)[1] for k in merged} == {"weight", "bias"}
    with torch.no_grad():
        dense = logits(functional_call(model, merged, (IDS,)))
    assert_same(dense, lite_out(model, params), effect_vs=out(model))
    llama = tiny("llama")  # no biases on its linear layers: s·bias has nowhere to go in a merged layer
    params = moved(lf.init(0, llama, lf.LoRAConfig(r=2, lora_bias=True), targets=r"q_proj$"))
    with pytest.raises(ValueError, match=r"no bias.*lora_bias leaf 'bias'.*no bias parameter to carry it.*lf.call"):
        lf.merge(llama, params)
    pm = moved_peft(llama, peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(RuntimeError, match="base layer has no bias"):  # peft refuses the same merge
        pm.merge_and_unload()


def test_stack_pad_mixes_biased_and_plain_adapters_exactly():
    model = tiny("gpt2")
    a = moved(lf.init(0, model, lf.LoRAConfig(r=2, lora_bias=True), targets=r"c_attn$"), seed=1)
    c = moved(lf.init(1, model, lf.LoRAConfig(r=4), targets=r"(c_attn|c_proj)$"), seed=2)
    d = moved(lf.init(2, model, lf.LoRAConfig(r=3, lora_bias=True), targets=r"c_proj$"), seed=3)
    stacked = lf.stack([a, c, d], pad=True)
    leaf = stacked["transformer.h.0.attn.c_attn"]["lora"]
    assert leaf["bias"].shape == (3, 96) and leaf["bias"].requires_grad
    xs = tokens(6, 5, seed=4)
    route = torch.arange(3).repeat_interleave(2)  # equal runs: the routed fast path (apply_runs)
    with torch.no_grad():
        by_vmap = vmap(lambda p: logits(lf.call(model, p, IDS)))(stacked)
        routed = logits(lf.call(model, stacked, xs, route=route))
    for k, p in enumerate((a, c, d)):
        assert_same(by_vmap[k], lite_out(model, p), effect_vs=out(model))
        assert_same(routed[2 * k : 2 * k + 2], lite_out(model, p, xs[2 * k : 2 * k + 2]))


def test_merge_adapters_refuses_lora_bias_as_peft_drops_it():
    base = tiny("gpt2")
    pm = moved_peft(base, peft.LoraConfig(r=2, target_modules=["c_attn"], lora_bias=True, fan_in_fan_out=True))
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_attn"], lora_bias=True, fan_in_fan_out=True))
    pm.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both", combination_type="cat")
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_B["default"].bias.abs().sum() > 0
    assert torch.equal(layer.lora_B["both"].bias, torch.zeros(96))  # peft's merged adapter lost the bias
    a = moved(lf.init(0, base, lf.LoRAConfig(r=2, lora_bias=True), targets=r"c_attn$"), seed=1)
    c = moved(lf.init(1, base, lf.LoRAConfig(r=2, lora_bias=True), targets=r"c_attn$"), seed=2)
    for method in ("cat", "linear", "svd"):
        with pytest.raises(ValueError, match=r"adapters\[0\].*lora_bias leaf 'bias'.*biases are dropped.*remove the leaves"):
            lf.merge_adapters([a, c], [1.0, 1.0], method=method)
    plain = [{p: {"lora": {k: v for k, v in bv["lora"].items() if k != "bias"}} for p, bv in t.items()} for t in (a, c)]
    lf.merge_adapters(plain, [1.0, 1.0], method="cat")  # the fix the message names works


# ----------------------------------------------------------------------------- HRA apply_GS: the layer
@pytest.mark.parametrize("r", [1, 3, 4, 6])
def test_gram_schmidt_parity_outputs_and_grads(r):
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = peft_hra_layer(W, b, r)
    u_ref = layer.hra_u["default"]  # (d_in, r): the vectors as columns
    U = u_ref.detach().T.clone().requires_grad_(True)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    y_ref, _ = assert_matches_reference(
        layer, lambda h: hra.apply({"U_gs": U}, W, h, b), x, [("U_gs", U, u_ref)], cotangent=6, to_ours=lambda name, g: g.T
    )
    assert rel_err(y_ref, torch.nn.functional.linear(x, W, b)) > 1e-2  # really not the identity
    if r > 1:  # one vector: the same reflection either way; more: not the reflection chain
        assert rel_err(y_ref, hra.apply({"U": U}, W, x, b)) > 1e-2


def test_gram_schmidt_float64_is_a_symmetric_reflection():
    """y = x R Wᵀ + b with R = I − 2QQᵀ (Q: Gram–Schmidt of the rows of U): R symmetric, orthogonal, R² = I."""
    g = torch.Generator().manual_seed(0)
    W, b = (t.double() for t in make_layer(D_OUT, D_IN, seed=1))
    U = torch.randn(5, D_IN, generator=g, dtype=torch.float64)
    x = torch.randn(7, D_IN, generator=g, dtype=torch.float64)
    R = gram_schmidt_R(U)
    assert rel_err(hra.apply({"U_gs": U}, W, x, b), x @ (W @ R).T + b) <= 1e-12
    eye = torch.eye(D_IN, dtype=torch.float64)
    Rt = hra.apply({"U_gs": U}, eye, eye)
    assert rel_err(Rt, Rt.T) <= 1e-12 and rel_err(Rt @ Rt, eye) <= 1e-12
    assert rel_err(hra.apply({"U_gs": U * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]}, eye, eye), Rt) <= 1e-12


def test_gram_schmidt_never_builds_a_d_in_square_matrix_and_dependent_vectors_give_nan():
    d_in = 64
    W, b = make_layer(16, d_in)
    U = torch.randn(8, d_in)
    with NewTensorSizes() as rec:
        hra.apply({"U_gs": U}, W, torch.randn(3, d_in), b)
    assert max(rec.numels) < d_in * d_in // 4, max(rec.numels)
    paired = U.repeat_interleave(2, dim=0)  # peft's paired init: 0/0 in Gram–Schmidt (peft: NaN or rounding noise)
    assert torch.isnan(hra.apply({"U_gs": paired}, W, torch.randn(3, d_in), b)).all()


def test_gram_schmidt_init_and_config():
    with pytest.raises(ValueError, match=r"apply_GS=True has no identity init.*init_weights=False.*lf.load_peft"):
        lf.HRAConfig(r=4, apply_GS=True)
    with pytest.raises(ValueError, match=r"r=3 must be even.*init_weights=False"):
        lf.HRAConfig(r=3)
    with pytest.raises(ValueError, match=r"apply_GS='yes' must be True or False"):
        lf.HRAConfig(apply_GS="yes")  # type: ignore[arg-type]
    W, b = make_layer(D_OUT, D_IN, seed=3)
    for r, gs in ((5, True), (3, False)):
        cfg = lf.HRAConfig(r=r, apply_GS=gs, init_weights=False)
        leaves = hra.init(0, W, cfg)
        name = "U_gs" if gs else "U"
        assert list(leaves) == [name] and leaves[name].shape == (r, D_IN) and leaves[name].requires_grad
        assert torch.equal(leaves[name], hra.init(0, W, cfg)[name])
        # peft's init_weights=False: kaiming_uniform_ of the (d_in, r) tensor, fan-in r: U(±1/√r)
        u_ref = peft_linear(W, b, peft.HRAConfig, r=r, apply_GS=gs, init_weights=False).hra_u["default"].detach()
        for V in (leaves[name].detach(), u_ref):
            assert V.abs().max() <= r**-0.5 and V.abs().max() > 0.5 * r**-0.5
        x = torch.randn(4, D_IN)
        assert rel_err(hra.apply(leaves, W, x, b), torch.nn.functional.linear(x, W, b)) > 1e-2  # not the identity
    with pytest.raises(ValueError, match=r"r=13 exceeds d_in=12.*use r <= 12"):
        hra.init(0, W, lf.HRAConfig(r=13, apply_GS=True, init_weights=False))


def test_gram_schmidt_vmap_equals_loop_and_merge_equals_call():
    W, b = make_layer(D_OUT, D_IN)
    g = torch.Generator().manual_seed(3)
    ps = [{"U_gs": torch.randn(4, D_IN, generator=g)} for _ in range(3)]
    stacked = {"U_gs": torch.stack([p["U_gs"] for p in ps])}
    x = torch.randn(5, D_IN, generator=g)
    want = torch.stack([hra.apply(p, W, x, b) for p in ps])
    assert rel_err(vmap(hra.apply, in_dims=(0, None, None, None))(stacked, W, x, b), want) <= 1e-6
    model = tiny("llama")
    params = lf.init(0, model, lf.HRAConfig(r=3, apply_GS=True, init_weights=False), targets=r"(q_proj|up_proj)$")
    merged = lf.merge(model, params)
    with torch.no_grad():
        dense = logits(functional_call(model, merged, (IDS,)))
    assert_same(dense, lite_out(model, params), effect_vs=out(model))
    grads = torch.autograd.grad(logits(lf.call(model, params, IDS)).square().sum(), lf.trainable(params))
    assert len(grads) == 4 and all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


# ----------------------------------------------------------------------------- HRA apply_GS: peft files, both ways
def test_peft_gram_schmidt_file_loads_and_saves_back(tmp_path):
    base = tiny("llama")
    cfg = peft.HRAConfig(r=3, apply_GS=True, init_weights=False, target_modules=["q_proj", "down_proj"])
    pm = moved_peft(base, cfg)
    d = saved(pm, tmp_path)
    params = lf.load_peft(d, model=base)
    assert {tuple(bv["hra"]) for bv in params.values()} == {("U_gs",)}
    assert all(bv["hra"]["U_gs"].requires_grad for bv in params.values())
    want = out(pm)
    assert_same(lite_out(base, params), want, effect_vs=out(base))
    lf.save_peft(tmp_path / "back", params, model=base)
    assert config_of(tmp_path / "back")["apply_GS"] is True
    assert_same(out(from_pretrained(base, tmp_path / "back")), want)
    mine = moved(lf.init(1, base, lf.HRAConfig(r=2, apply_GS=True, init_weights=False), targets=r"v_proj$"))
    lf.save_peft(tmp_path / "mine", mine, model=base)
    assert_same(out(from_pretrained(base, tmp_path / "mine")), lite_out(base, mine), effect_vs=out(base))


def test_gram_schmidt_refusals(tmp_path):
    base = tiny("llama")
    paired = peft.get_peft_model(copy.deepcopy(base), peft.HRAConfig(r=4, apply_GS=True, target_modules=["q_proj"]))
    d = saved(paired, tmp_path, "paired")  # peft's default init with apply_GS, untrained: pairs of equal vectors
    with pytest.raises(ValueError, match=r"apply_GS=True.*q_proj.hra_u's vector 1 lies in the span.*paired init"):
        lf.load_peft(d, model=base)
    edit_config(d, apply_GS="yes")
    with pytest.raises(ValueError, match=r"apply_GS='yes'; expected true or false"):
        lf.load_peft(d, model=base)
    gs = lf.init(0, base, lf.HRAConfig(r=2, apply_GS=True, init_weights=False), targets=r"q_proj$")
    chain = lf.init(0, base, lf.HRAConfig(r=2), targets=r"v_proj$")
    with pytest.raises(ValueError, match=r"one apply_GS for all layers.*q_proj.*Gram–Schmidt.*v_proj"):
        lf.save_peft(tmp_path / "x", {**gs, **chain}, model=base)
    both = {p: {"hra": {**bv["hra"], "U": bv["hra"]["U_gs"]}} for p, bv in gs.items()}
    with pytest.raises(ValueError, match=r"unexpected leaf 'U_gs'"):  # one form per layer
        lf.call(base, both, IDS)
