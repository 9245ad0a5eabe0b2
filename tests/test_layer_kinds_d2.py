"""LoHa, LoKr, VeRA, DeLoRA, RoAd, AntiPaSTO: each ``merged`` hook (the dense merged weight in the adapter's own form)
equals the identity rule ``variants.dense_weights`` on perturbed leaves in float64 — values, gradients, and under
torch.func.vmap over stacked leaves. LoHa and LoKr on convolutions, in peft's plain form and in its
use_effective_conv2d (Tucker) form: parity with peft on perturbed tensors (outputs and gradients), peft files both
ways, lf.init's adapters written for peft, vmap over stacked == a loop, merge == call, exact padding, refusals."""

import copy
import json
from typing import Any, Literal

import peft
import pytest
import torch
from helpers import moved, perturb, rel_err, with_steering
from torch import nn

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import antipasto, delora, loha, lokr, road, vera

# ----------------------------------------------------------------------------- merged == the identity rule
D_OUT, D_IN = 12, 8


def _weights(d_out=D_OUT, d_in=D_IN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64)


def _random(shapes: dict, seed: int) -> dict:
    """Leaves of the given shapes drawn N(0, 0.5²) in float64, trainable (hand-made forms lf.init does not build)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (0.5 * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_(True) for k, s in shapes.items()}


def _tucker_loha(seed):  # W (12, 2·9): a 3 × 3 kernel over 2 input channels, rank 2
    return _random({"B1": (12, 2), "A1": (2, 2), "B2": (12, 2), "A2": (2, 2), "T1": (2, 2, 3, 3), "T2": (2, 2, 3, 3)}, seed)


def _tucker_lokr(seed):  # W (12, 36) = (3·4, 2·(2·9)): W₂ (4, 2·9) a rank-2 Tucker product over 9 kernel positions
    return _random({"w1": (3, 2), "w2_a": (4, 2), "t2": (2, 2, 3, 3), "w2_b": (2, 2)}, seed)


HAND = {
    "loha-tucker": _tucker_loha,
    "lokr-tucker": _tucker_lokr,
    "lokr-conv1d-layout": lambda seed: _random({"w1": (3, 2), "w2": (4, 2, 2)}, seed),
}
# (variant, config or the name of a hand-made form in HAND, W's d_in, steering alpha)
MERGED: dict[str, tuple[Any, Any, int, float | None]] = {
    "loha-factored": (loha, loha.LoHaConfig(r=2, alpha=3.0), D_IN, None),
    "loha-dense": (loha, loha.LoHaConfig(r=3), D_IN, None),
    "loha-tucker": (loha, "loha-tucker", 18, None),
    "lokr-product": (lokr, lokr.LoKrConfig(r=1, alpha=3.0), D_IN, None),
    "lokr-both-products": (lokr, lokr.LoKrConfig(r=1, decompose_both=True), D_IN, None),
    "lokr-full": (lokr, lokr.LoKrConfig(r=4, init_weights="lycoris"), D_IN, None),
    "lokr-tucker": (lokr, "lokr-tucker", 36, None),
    "lokr-conv1d-layout": (lokr, "lokr-conv1d-layout", D_IN, None),  # a full W₂ (b, d, k): peft's Conv1d layout
    "vera": (vera, vera.VeRAConfig(r=4, d_initial=0.3), D_IN, None),
    "delora": (delora, delora.DeLoRAConfig(r=3, lam=2.0), D_IN, None),
    "road_1": (road, road.ROADConfig("road_1", group_size=4), D_IN, None),
    "road_2": (road, road.ROADConfig("road_2", group_size=6), D_IN, None),
    "road_4": (road, road.ROADConfig("road_4", group_size=4), D_IN, None),
    "antipasto-v": (antipasto, antipasto.AntiPaSTOConfig(r=4, block_size=2, max_angle=1.0), D_IN, -0.7),
    "antipasto-u": (antipasto, antipasto.AntiPaSTOConfig(r=4, rotate_v=False, rotate_u=True), D_IN, 1.3),
    "antipasto-uv": (antipasto, antipasto.AntiPaSTOConfig(r=6, block_size=3, rotate_u=True), D_IN, 0.6),
}


def _leaves(case, seed):
    """Perturbed float64 leaves of one MERGED case (trainable leaves moved by 0.3·N(0,1); steering set)."""
    mod, cfg, d_in, alpha = MERGED[case]
    if isinstance(cfg, str):  # a hand-made form lf.init does not build (Tucker cores, peft's Conv1d layout)
        return {**HAND[cfg](seed), "scale": torch.tensor(0.7, dtype=torch.float64)}
    W, _ = _weights(d_in=d_in)
    p = perturb(mod.init(0, W, cfg), seed, scale=0.3)
    return p if alpha is None else with_steering(mod.NAME, p, alpha)


def _merged_hook(mod):
    spec = variants.get(mod.NAME)
    assert spec.merged is not None, mod.NAME
    return spec, spec.merged


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(MERGED))
def test_merged_equals_the_identity_rule_values_and_gradients(case, with_bias):
    mod, _, d_in, _ = MERGED[case]
    spec, merged = _merged_hook(mod)
    W, b = _weights(d_in=d_in)
    b = b if with_bias else None
    p = _leaves(case, seed=3)
    W_hook, b_hook = merged(p, W, b)
    W_rule, b_rule = variants.dense_weights(spec, p, W, b)
    assert rel_err(W_hook, W_rule) <= 1e-12, rel_err(W_hook, W_rule)
    assert rel_err(W_hook, W) > 1e-3  # the adapter really changes the weight
    if b is None:
        assert b_hook is None and b_rule is None
    else:
        assert b_hook is not None and b_rule is not None and rel_err(b_hook, b_rule) <= 1e-12
    # the same gradients for every trainable leaf, through the hook and through the identity rule
    g = torch.Generator().manual_seed(9)
    cW, cb = torch.randn(W.shape, generator=g, dtype=W.dtype), torch.randn(W.shape[0], generator=g, dtype=W.dtype)
    trainable = [k for k, v in p.items() if v.requires_grad]

    def loss(Wb):
        return (Wb[0] * cW).sum() + (0.0 if Wb[1] is None else (Wb[1] * cb).sum())

    g_hook = torch.autograd.grad(loss((W_hook, b_hook)), [p[k] for k in trainable], allow_unused=True)
    g_rule = torch.autograd.grad(loss((W_rule, b_rule)), [p[k] for k in trainable], allow_unused=True)
    for k, gh, gr in zip(trainable, g_hook, g_rule):
        assert gh is not None and gr is not None, k
        assert rel_err(gh, gr) <= 1e-10, (k, rel_err(gh, gr))


@pytest.mark.parametrize("case", list(MERGED))
def test_merged_under_vmap_over_stacked_leaves_equals_a_loop(case):
    mod, _, d_in, alpha = MERGED[case]
    _, merged = _merged_hook(mod)
    W, b = _weights(d_in=d_in)
    adapters = [_leaves(case, seed) for seed in (1, 2, 3)]
    if alpha is not None:  # a steering sweep, α = 0 included
        adapters = [with_steering(mod.NAME, q, a) for q, a in zip(adapters, (alpha, 0.0, -2 * alpha))]
    stacked = lf.stack([{"l": {mod.NAME: q}} for q in adapters])["l"][mod.NAME]
    W_v, b_v = torch.func.vmap(lambda q: merged(q, W, b))(stacked)
    for k, q in enumerate(adapters):
        W_k, b_k = merged(q, W, b)
        assert b_k is not None and b_v is not None and rel_err(W_v[k], W_k) <= 1e-12 and rel_err(b_v[k], b_k) <= 1e-12, k


def test_antipasto_merged_is_the_base_weight_bit_for_bit_at_alpha_zero_and_uses_the_prepared_mixing():
    W, b = _weights()
    p = with_steering("antipasto", _leaves("antipasto-uv", 4), 0.0)
    W0, b0 = antipasto.merged(p, W, b)
    assert torch.equal(W0, W) and b0 is b
    q = _leaves("antipasto-uv", 4)
    prepared = antipasto.prepare({"l": q})["l"]
    assert "M" in prepared
    assert rel_err(antipasto.merged(prepared, W, b)[0], antipasto.merged(q, W, b)[0]) <= 1e-14


# ----------------------------------------------------------------------------- convolutions against peft
class ConvNet(nn.Module):
    def __init__(self, conv1d_padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros"):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, groups=2, dilation=1)  # weight (16, 4, 3, 3)
        self.c3 = nn.Conv2d(16, 16, 1)  # 1 × 1: peft keeps the plain form even with use_effective_conv2d
        self.c4 = nn.Conv1d(16, 8, 3, padding=1, padding_mode=conv1d_padding_mode)
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.lin(self.c4(self.c3(h).flatten(2)).mean(-1))


ALL = ["c1", "c2", "c3", "c4", "lin"]
X = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))


def _net(**kw):
    torch.manual_seed(0)
    return ConvNet(**kw).eval()


# (peft config, the layers that must hold Tucker cores). peft 0.21 cannot run a Conv1d LoKr in the Tucker form
# (torch.kron fails on its (b, d, k, 1) factor), so that case leaves c4 out (test_lokr_conv1d_tucker_... reads it)
PEFT_CASES = {
    "loha-plain": (lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=ALL, rank_pattern={"c2": 3}), set()),
    "loha-tucker": (
        lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=ALL, use_effective_conv2d=True, alpha_pattern={"c4": 5}),
        {"c1", "c2", "c4"},
    ),
    "lokr-product": (lambda: peft.LoKrConfig(r=1, alpha=3, target_modules=ALL), set()),
    "lokr-both-factor-2": (lambda: peft.LoKrConfig(r=1, decompose_both=True, decompose_factor=2, target_modules=ALL), set()),
    "lokr-full": (lambda: peft.LoKrConfig(r=4, alpha=2, target_modules=ALL), set()),
    "lokr-tucker": (
        lambda: peft.LoKrConfig(r=1, alpha=3, target_modules=["c1", "c2", "c3", "lin"], use_effective_conv2d=True),
        {"c1", "c2"},
    ),
}


def _peft_model(net, cfg, seed=5, scale=0.3):
    """peft's adapter on a copy of net, every adapter tensor moved off its init."""
    model = peft.get_peft_model(copy.deepcopy(net), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                t.copy_(scale * torch.randn(t.shape, generator=g))
    return model.eval()


def _peft_grad_in_our_layout(model, path, variant, leaf, leaves):
    """The gradient of peft's tensor behind our ``leaf`` at ``path``, in our leaf's layout (peft's layouts, by hand:
    LoHa's Tucker form stores B as (r, out); LoKr's Tucker form w2_a as (r, b); a conv's full lokr_w2 as (b, d, *k))."""
    layer = model.base_model.model.get_submodule(path)
    if variant == "loha":
        name = {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b", "T1": "hada_t1", "T2": "hada_t2"}
        g = getattr(layer, name[leaf])["default"].grad
        return g.mT if leaf in ("B1", "B2") and "T1" in leaves else g
    g = getattr(layer, f"lokr_{leaf}")["default"].grad
    if leaf == "w2" and g.ndim == 4:  # a Conv2d's (b, d, kh, kw); a Conv1d's (b, d, k) is the leaf as it is
        return g.flatten(1)
    return g.mT if leaf == "w2_a" and "t2" in leaves else g


def _variant_of(params):
    return next(iter(next(iter(params.values()))))


def _hada_cp_by_autograd(t1, w1a, w1b, t2, w2a, w2b, scale):
    """peft's LoHa Tucker ΔW (HadaWeightCP.forward's formula) with autograd's gradients. peft 0.21's hand-written
    HadaWeightCP.backward gets hada_w1_a's and hada_w2_a's gradients wrong (it contracts each with the other
    pair's partial product), so the gradient parity is with the derivative of peft's forward, not with that backward."""
    rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    return rebuild1 * rebuild2 * scale


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_parity_files_both_ways_and_merge(case, tmp_path, monkeypatch):
    make_cfg, tucker = PEFT_CASES[case]
    if case == "loha-tucker":
        monkeypatch.setattr(peft.tuners.loha.layer, "make_weight_cp", _hada_cp_by_autograd)
    net = _net()
    model = _peft_model(net, make_cfg())
    model.save_pretrained(tmp_path / "peft")
    params = lf.load_peft(tmp_path / "peft", model=net)
    variant = _variant_of(params)
    core = "T1" if variant == "loha" else "t2"
    assert {p for p, bv in params.items() if core in bv[variant]} == tucker

    # outputs and gradients (leaves and x) against peft's own forward
    x_ref, x_our = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
    y_ref, y_our = model(x_ref), lf.call(net, params, x_our)
    assert rel_err(y_our, y_ref) <= 1e-5, rel_err(y_our, y_ref)
    assert rel_err(net(X), y_ref) > 1e-2  # really not the identity
    cot = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7))
    (y_ref * cot).sum().backward()
    leaves = [(p, k) for p, bv in params.items() for k, v in bv[variant].items() if v.requires_grad]
    grads = torch.autograd.grad((y_our * cot).sum(), [params[p][variant][k] for p, k in leaves] + [x_our])
    for (p, k), g in zip(leaves, grads):
        ref = _peft_grad_in_our_layout(model, p, variant, k, params[p][variant])
        assert rel_err(g, ref) <= 1e-4, (p, k, rel_err(g, ref))
    assert x_ref.grad is not None and rel_err(grads[-1], x_ref.grad) <= 1e-4

    # merge == call
    y_merged = torch.func.functional_call(net, lf.merge(net, params), (X,))
    assert rel_err(y_merged, y_our) <= 1e-5

    # written back: peft loads it and computes the same; read again: the same leaves
    lf.save_peft(tmp_path / "back", params, model=net)
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["use_effective_conv2d"] is bool(tucker)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "back").eval()
    with torch.no_grad():
        assert rel_err(again(X), y_ref) <= 1e-6
    back = lf.load_peft(tmp_path / "back", model=net)
    for p, bv in params.items():
        for k, v in bv[variant].items():
            assert torch.equal(back[p][variant][k], v.detach()), (p, k)


def _hand_lokr_conv1d(t, s, x, conv):
    """A Conv1d LoKr in the Tucker form, by its formula in float64 from peft's stored tensors:
    W₂ = einsum(t2, w2_a, w2_b) (b, d, k), ΔW = s·W₁ ⊗ W₂, y = conv1d(x, W + ΔW)."""
    t = {k: v.double() for k, v in t.items()}
    W2 = torch.einsum("i j k l, i p, j q -> p q k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])[..., 0]  # (b, d, k)
    W1 = t["lokr_w1"]
    a, c = W1.shape
    b, d, k = W2.shape
    dW = s * torch.einsum("i j, p q k -> i p j q k", W1, W2).reshape(a * b, c * d, k)
    W = conv.weight.double() + dW
    return torch.nn.functional.conv1d(x.double(), W, conv.bias.double(), conv.stride, conv.padding, conv.dilation, conv.groups)


def test_lokr_conv1d_tucker_form_is_read_by_its_formula(tmp_path):
    """peft 0.21 writes a Conv1d LoKr with use_effective_conv2d (lokr_t2 (r, r, k, 1)) but cannot run it; lite_fn reads
    it by LyCORIS's formula (a float64 reference from the stored tensors) and writes it back unchanged."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1, groups=2)).eval()
    model = _peft_model(net, peft.LoKrConfig(r=1, alpha=3, target_modules=["0"], use_effective_conv2d=True))
    model.save_pretrained(tmp_path / "peft")
    params = lf.load_peft(tmp_path / "peft", model=net)
    assert params["0"]["lokr"]["t2"].shape == (1, 1, 3, 1)
    stored = {k.split("0.")[-1]: v for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(1))
    want = _hand_lokr_conv1d(stored, 3 / 1, x, net[0])
    assert rel_err(lf.call(net, params, x), want) <= 1e-5
    assert rel_err(net(x), want) > 1e-2
    lf.save_peft(tmp_path / "back", params, model=net)
    again = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert {k.split("0.")[-1]: tuple(v.shape) for k, v in again.items()} == {k: tuple(v.shape) for k, v in stored.items()}
    for k, v in again.items():
        assert torch.equal(v, stored[k.split("0.")[-1]]), k


# ----------------------------------------------------------------------------- lf.init on convolutions, for peft
INIT = {
    "loha": lf.LoHaConfig(r=2, alpha=3.0),
    "lokr-factor-2": lf.LoKrConfig(r=1, alpha=3.0, decompose_factor=2),
    "lokr-factor-2-both": lf.LoKrConfig(r=1, decompose_factor=2, decompose_both=True),
}


@pytest.mark.parametrize("case", list(INIT))
def test_init_on_convolutions_is_the_identity_and_saves_for_peft(case, tmp_path):
    net = _net()
    params = lf.init(0, net, INIT[case], targets=r"^(c\d|lin)$")
    assert set(params) == set(ALL)
    assert torch.equal(lf.call(net, params, X), net(X))  # ΔW = 0 exactly: W' = W bit for bit
    params = moved(params, scale=0.3)
    mine = lf.call(net, params, X)
    assert rel_err(mine, net(X)) > 1e-2
    lf.save_peft(tmp_path / "a", params, model=net)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "a").eval()
    with torch.no_grad():
        assert rel_err(theirs(X), mine) <= 1e-5
    back = lf.load_peft(tmp_path / "a", model=net)
    variant = _variant_of(params)
    for p, bv in params.items():
        for k, v in bv[variant].items():
            assert torch.equal(back[p][variant][k], v.detach()), (p, k)


def test_lokr_init_layout_peft_cannot_hold_is_refused_naming_decompose_factor(tmp_path):
    """lf.init factors a convolution's flattened width in/groups·∏k; peft factors in/groups. With the default
    decompose_factor=-1 they differ here (c1: 36 = 6·6 against peft's 4 = 2·2), and the message names the fix."""
    net = _net()
    params = moved(lf.init(0, net, lf.LoKrConfig(r=1), targets=r"^c1$"))
    with pytest.raises(
        ValueError, match=r"on a convolution peft factors in/groups.*decompose_factor = f divides in/groups.*decompose_factor=2"
    ):
        lf.save_peft(tmp_path / "a", params, model=net)


# ----------------------------------------------------------------------------- vmap, padding
@pytest.mark.parametrize("case", ["loha-plain", "loha-tucker", "lokr-tucker", "lokr-full"])
def test_vmap_over_stacked_adapters_equals_a_loop_on_a_conv_net(case, tmp_path):
    make_cfg, _ = PEFT_CASES[case]
    net = _net()
    _peft_model(net, make_cfg()).save_pretrained(tmp_path / "peft")
    base = lf.load_peft(tmp_path / "peft", model=net)
    adapters = [moved(base, seed=s, scale=0.2) for s in (1, 2, 3)]
    ys = torch.func.vmap(lambda q: lf.call(net, q, X))(lf.stack(adapters))
    for k, q in enumerate(adapters):
        assert rel_err(ys[k], lf.call(net, q, X)) <= 1e-5, k


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_pad_stacks_tucker_forms_of_different_rank_exactly(variant, tmp_path):
    torch.manual_seed(0)  # wide enough that peft's LoKr keeps W₂ a (Tucker) product at r = 2: r < max(b, d) / 2
    net = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 16, 3)).eval()
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    targets = ["0", "2"]
    adapters = []
    for r in (1, 2):
        cfg = (
            peft.LoHaConfig(r=r, alpha=2, target_modules=targets, use_effective_conv2d=True)
            if variant == "loha"
            else peft.LoKrConfig(r=r, alpha=2, target_modules=targets, use_effective_conv2d=True)
        )
        _peft_model(net, cfg, seed=r).save_pretrained(tmp_path / str(r))
        adapters.append(lf.load_peft(tmp_path / str(r), model=net))
    core = "T1" if variant == "loha" else "t2"
    assert [a[p][variant][core].shape[0] for a in adapters for p in targets] == [1, 1, 2, 2]
    adapters.append({"0": adapters[1]["0"]})  # an adapter without layer 2: padded with ΔW = 0 there
    stacked = lf.stack(adapters, pad=True)
    ys = torch.func.vmap(lambda q: lf.call(net, q, x))(stacked)
    for k, q in enumerate(adapters):
        assert rel_err(ys[k], lf.call(net, q, x)) <= 1e-5, k
    assert rel_err(ys[0], ys[1]) > 1e-3 and rel_err(ys[2], net(x)) > 1e-3


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("config_cls", [lf.LoHaConfig, lf.LoKrConfig])
def test_use_effective_conv2d_is_refused_at_config_time_naming_load_peft(config_cls):
    with pytest.raises(ValueError, match=r"use_effective_conv2d=True is not offered by lf.init.*lf.load_peft"):
        config_cls(use_effective_conv2d=True)


@pytest.mark.parametrize("cfg", [lf.LoHaConfig(r=2), lf.LoKrConfig(r=1, decompose_factor=2)], ids=["loha", "lokr"])
def test_save_refuses_conv3d_and_non_zero_padding(cfg, tmp_path):
    conv3d = nn.Sequential(nn.Conv3d(4, 4, 3)).eval()
    with pytest.raises(ValueError, match=r"'0' is a Conv3d; peft's LO(HA|KR) adapts nn.Conv1d and nn.Conv2d"):
        lf.save_peft(tmp_path / "a", lf.init(0, conv3d, cfg, targets=r"^0$"), model=conv3d)
    net = _net(conv1d_padding_mode="circular")
    with pytest.raises(ValueError, match=r"'c4' pads with padding_mode='circular'.*zero padding"):
        lf.save_peft(tmp_path / "b", lf.init(0, net, cfg, targets=r"^c4$"), model=net)


def test_save_refuses_forms_peft_does_not_hold_there(tmp_path):
    net = _net()
    _peft_model(net, PEFT_CASES["loha-tucker"][0]()).save_pretrained(tmp_path / "peft")
    tucker = lf.load_peft(tmp_path / "peft", model=net)
    plain = lf.init(0, net, lf.LoHaConfig(r=2), targets=r"^c2$")
    with pytest.raises(ValueError, match=r"one use_effective_conv2d per adapter.*\['c1'\].*\['c2'\]"):
        lf.save_peft(tmp_path / "a", {"c1": tucker["c1"], "c2": plain["c2"]}, model=net)
    # a full W₂ in lite_fn's Kronecker layout on a Conv1d (peft reads a Conv1d's full lokr_w2 in another layout)
    full = {"w1": torch.randn(2, 2), "w2": torch.randn(4, 24), "scale": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"'c4' holds a full LoKr W2 of shape \(4, 24\).*Conv1d's full lokr_w2"):
        lf.save_peft(tmp_path / "c", {"c4": {"lokr": full}}, model=net)
    lin = nn.Sequential(nn.Linear(18, 12)).double()  # a Tucker form on a linear layer: nothing peft holds
    hand = {"0": {"loha": {**_tucker_loha(0), "scale": torch.tensor(1.0, dtype=torch.float64)}}}
    with pytest.raises(ValueError, match=r"Tucker cores T1 of shape \(2, 2, 3, 3\).*only on a Conv1d / Conv2d"):
        lf.save_peft(tmp_path / "b", hand, model=lin)


def test_load_refuses_a_file_whose_cores_do_not_fit_the_kernel(tmp_path):
    net = _net()
    _peft_model(net, PEFT_CASES["loha-tucker"][0]()).save_pretrained(tmp_path / "peft")
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "use_effective_conv2d": False}))  # the tensors are the Tucker form's
    with pytest.raises(ValueError, match=r"has tensor\(s\) \['hada_t1', 'hada_t2'\]|has shape .* expected"):
        lf.load_peft(tmp_path / "peft", model=net)
