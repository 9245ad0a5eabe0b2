"""LoHa: parity with peft's LoHaConfig in both of apply's forms, a float64 reference from the paper's formula,
exact identity at init, what autograd keeps, peft files both ways, exact padding, errors.

No 4-bit test: peft has no bitsandbytes LoHa layer to compare with. Convolutions (both of peft's forms) are tested
in tests/test_layer_kinds_d2.py; here only the one conv file lite_fn refuses (padding_mode other than 'zeros')."""

import copy
import json

import peft
import pytest
import torch
from helpers import NewTensorSizes, assert_config_refused, assert_matches_reference, make_layer, moved, peft_linear, rel_err
from models import logits, tiny, tokens
from torch.func import grad, vmap

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import loha
from lite_fn.variants.loha import LoHaConfig

PEFT_NAMES = {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b"}  # our leaf -> peft's tensor
# (d_out, d_in, r) covering both forms: r²(d_out + d_in) < d_out·d_in is the factored one
LAYERS = [(20, 12, 2, True), (20, 12, 4, False), (48, 40, 3, True), (48, 40, 7, False)]
LAYER_IDS = [f"{o}x{i}-r{r}-{'factored' if f else 'dense'}" for o, i, r, f in LAYERS]
IDS = tokens(2, 6)
SPEC = variants.get("loha")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not fight other processes for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dense_reference(p, W, b, x):
    """The paper's ΔW = s·(B₁A₁) ⊙ (B₂A₂) and y = x (W + ΔW)ᵀ + b, in float64."""
    B1, A1, B2, A2, s = (p[k].double() for k in ("B1", "A1", "B2", "A2", "scale"))
    dW = s * (B1 @ A1) * (B2 @ A2)
    return x.double() @ (W.double() + dW).T + (0.0 if b is None else b.double()), dW


def _random_leaves(d_out, d_in, r, s, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = loha.shapes({"A1": (r, d_in)}, d_out, d_in)
    p = {k: (torch.randn(shape[k], generator=g, dtype=dtype) * 0.5).requires_grad_(True) for k in PEFT_NAMES}
    return {**p, "scale": torch.tensor(s, dtype=dtype)}


# ----------------------------------------------------------------------------- peft parity
@pytest.mark.parametrize("layer_case", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("alpha", [8, 3.5])
def test_peft_parity_outputs_and_grads(layer_case, alpha):
    d_out, d_in, r, is_factored = layer_case
    assert loha.factored(r, d_out, d_in) == is_factored
    W, b = make_layer(d_out, d_in, seed=3)
    layer = peft_linear(W, b, peft.LoHaConfig, r=r, alpha=alpha)
    g = torch.Generator().manual_seed(4)
    theirs = {leaf: getattr(layer, name)["default"] for leaf, name in PEFT_NAMES.items()}
    with torch.no_grad():  # every factor off peft's init (hada_w2_b = 0 there)
        for t in theirs.values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    ours = {k: v.detach().clone().requires_grad_(True) for k, v in theirs.items()}  # peft's layout, no transposes
    ours["scale"] = torch.tensor(alpha / r)
    x = torch.randn(2, 5, d_in, generator=torch.Generator().manual_seed(5))
    leaves = [(k, ours[k], theirs[k]) for k in PEFT_NAMES]
    y_ref, y_our = assert_matches_reference(layer, lambda h: loha.apply(ours, W, h, b), x, leaves, cotangent=6)
    assert rel_err(y_ref, torch.nn.functional.linear(x, W, b)) > 1e-2  # really not the identity
    assert rel_err(y_our, _dense_reference(ours, W, b, x)[0]) <= 1e-5


@pytest.mark.parametrize("init_weights", [True, False])
def test_init_like_peft(init_weights):
    d_out, d_in, r = 20, 12, 4
    W, b = make_layer(d_out, d_in, seed=3)
    layer = peft_linear(W, b, peft.LoHaConfig, r=r, init_weights=init_weights)
    p = loha.init(0, W, LoHaConfig(r=r, init_weights=init_weights))
    assert {k: (tuple(v.shape), v.requires_grad) for k, v in p.items()} == {
        "B1": ((d_out, r), True),
        "A1": ((r, d_in), True),
        "B2": ((d_out, r), True),
        "A2": ((r, d_in), True),
        "scale": ((), False),
    }
    assert float(p["scale"]) == 8 / r == layer.scaling["default"]  # peft's default alpha = 8
    # peft's kaiming_uniform_(a=√5) sees hada_w*_a as (d_out, r): fan-in r; hada_w*_b as (r, d_in): fan-in d_in
    bounds = {"B1": r**-0.5, "A1": d_in**-0.5, "B2": r**-0.5, "A2": d_in**-0.5}
    for leaf, name in PEFT_NAMES.items():
        theirs = getattr(layer, name)["default"].detach()
        for t in (p[leaf].detach(), theirs):
            if leaf == "A2" and init_weights:
                assert torch.equal(t, torch.zeros(r, d_in)), leaf  # the zero factor: peft's hada_w2_b
            else:
                assert bounds[leaf] >= t.abs().max() > 0.5 * bounds[leaf], leaf
    x = torch.randn(7, d_in)
    base = torch.nn.functional.linear(x, W, b)
    with torch.no_grad():
        if init_weights:
            assert torch.equal(loha.apply(p, W, x, b), base) and rel_err(layer(x), base) <= 1e-6
        else:  # all four random: not the identity, in peft either
            assert rel_err(loha.apply(p, W, x, b), base) > 1e-3 and rel_err(layer(x), base) > 1e-3


# ----------------------------------------------------------------------------- the math, float64
@pytest.mark.parametrize("layer_case", LAYERS, ids=LAYER_IDS)
def test_float64_reference_outputs_and_grads(layer_case):
    d_out, d_in, r, _ = layer_case
    W, b = (t.double() for t in make_layer(d_out, d_in, seed=1))
    p = _random_leaves(d_out, d_in, r, 0.7, seed=2)
    x = torch.randn(3, 4, d_in, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = torch.randn(3, 4, d_out, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y_ref, dW = _dense_reference(p, W, b, x)
    assert rel_err(loha.apply(p, W, x, b), y_ref) <= 1e-12
    wrong = {**p, "A1": p["A2"], "A2": p["A1"]}  # pairing the factors the other way is another matrix
    assert rel_err(loha.apply(wrong, W, x, b), y_ref) > 1e-2
    assert rel_err(variants.dense_weights(SPEC, p, W)[0] - W, dW) <= 1e-12  # the generic merge sees the same ΔW
    trained = {k: p[k] for k in PEFT_NAMES}
    ours = grad(lambda t: (loha.apply({**p, **t}, W, x, b) * G).sum())(trained)
    ref = grad(lambda t: (_dense_reference({**p, **t}, W, b, x)[0] * G).sum())(trained)
    for k in PEFT_NAMES:
        assert rel_err(ours[k], ref[k]) <= 1e-12, k


def test_update_is_not_low_rank():
    """rank((B₁A₁) ⊙ (B₂A₂)) reaches r² > r: what makes LoHa more than a LoRA of the same parameter count."""
    d_out, d_in, r = 20, 12, 3
    p = _random_leaves(d_out, d_in, r, 1.0, seed=5)
    dW = variants.dense_weights(SPEC, p, torch.zeros(d_out, d_in, dtype=torch.float64))[0]
    assert int(torch.linalg.matrix_rank(dW)) == r * r


@pytest.mark.parametrize("layer_case", LAYERS, ids=LAYER_IDS)
def test_identity_at_init_is_exact(layer_case):
    d_out, d_in, r, _ = layer_case
    for dtype in (torch.float32, torch.bfloat16):
        W, b = make_layer(d_out, d_in, seed=1, dtype=dtype)
        p = loha.init(3, W, LoHaConfig(r=r, alpha=5))
        x = torch.randn(4, 3, d_in).to(dtype)
        assert torch.equal(loha.apply(p, W, x, b), torch.nn.functional.linear(x, W, b))
        assert torch.equal(loha.apply(p, W, x), torch.nn.functional.linear(x, W))


# ----------------------------------------------------------------------------- cost
def _saved_numels(fn, *existing):
    """The sizes of the tensors autograd saves for backward while fn runs, but for those sharing memory with
    ``existing`` (the layer's weight, saved for x's gradient, is no new memory)."""
    numels, skip = [], {t.untyped_storage().data_ptr() for t in existing}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return numels


@pytest.mark.parametrize("layer_case", LAYERS, ids=LAYER_IDS)
def test_autograd_keeps_at_most_one_dense_matrix(layer_case):
    """Dense form: only ΔW itself (peft's custom function saves the factors, not B₁A₁ and B₂A₂; so does ours).
    Factored form: nothing of size d_out·d_in, forward or saved."""
    d_out, d_in, r, is_factored = layer_case
    W, b = make_layer(d_out, d_in)
    p = _random_leaves(d_out, d_in, r, 0.5, seed=1, dtype=torch.float32)
    x = torch.randn(3, d_in, requires_grad=True)  # an activation; 3 rows: the output is smaller than d_out·d_in
    big = [n for n in _saved_numels(lambda: loha.apply(p, W, x, b), W) if n >= d_out * d_in]
    assert len(big) == (0 if is_factored else 1), big
    if is_factored:
        with torch.no_grad(), NewTensorSizes() as rec:
            loha.apply(p, W, x, b)
        assert max(rec.numels) < d_out * d_in // 2, max(rec.numels)


def test_dense_form_grads_under_vmap_equal_a_loop():
    """The dense form's custom autograd function under torch.func: grad of vmap and vmap of grad == a loop."""
    d_out, d_in, r = 20, 12, 4
    assert not loha.factored(r, d_out, d_in)
    W, b = make_layer(d_out, d_in)
    ps = [_random_leaves(d_out, d_in, r, 0.5 + k, seed=k, dtype=torch.float32) for k in range(3)]
    stacked = {k: torch.stack([p[k].detach() for p in ps]) for k in ps[0]}
    xs = torch.randn(3, 5, d_in)

    def loss(p, x):
        return loha.apply(p, W, x, b).square().sum()

    loop = [grad(loss)({k: v.detach() for k, v in p.items()}, x) for p, x in zip(ps, xs)]
    per = vmap(grad(loss))(stacked, xs)
    total = grad(lambda st: vmap(loss)(st, xs).sum())(stacked)
    for k in PEFT_NAMES:
        want = torch.stack([g[k] for g in loop])
        assert rel_err(per[k], want) <= 1e-6 and rel_err(total[k], want) <= 1e-6, k


# ----------------------------------------------------------------------------- peft files
def _moved_peft(base, cfg, seed=0):
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in pm.named_parameters():
            if t.requires_grad:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return pm.eval()


def _out(model, params=None):
    with torch.no_grad():
        return logits(model(IDS) if params is None else lf.call(model, params, IDS))


def _from_pretrained(base, path):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


LOAD_CASES = {
    "r4-alpha8": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns": lambda: peft.LoHaConfig(
        r=4,
        alpha=6,
        target_modules=["q_proj", "up_proj", "down_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"layers.1.mlp.down_proj": 3},
    ),
    "dropouts-random-init-ignored": lambda: peft.LoHaConfig(
        r=3, alpha=5, rank_dropout=0.2, module_dropout=0.1, init_weights=False, target_modules=["k_proj", "o_proj"]
    ),
    "all-linear": lambda: peft.LoHaConfig(r=2, alpha=1, target_modules="all-linear"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_reproduces_peft_from_pretrained(case, tmp_path):
    base = tiny("llama")
    _moved_peft(base, LOAD_CASES[case]()).save_pretrained(tmp_path / "a")
    params = lf.load_peft(tmp_path / "a", model=base)
    assert {n for bv in params.values() for n in bv} == {"loha"}
    want = _out(_from_pretrained(base, tmp_path / "a"))
    assert rel_err(_out(base, params), want) <= 1e-5
    assert rel_err(_out(base), want) > 1e-4  # the adapter changes the output
    for bv in params.values():
        assert {k for k, v in bv["loha"].items() if v.requires_grad} == set(loha.TRAINABLE) & set(bv["loha"])
    if case == "patterns":
        up, down = params["model.layers.0.mlp.up_proj"]["loha"], params["model.layers.1.mlp.down_proj"]["loha"]
        assert up["A1"].shape[0] == 2 and float(up["scale"]) == 6 / 2 and float(down["scale"]) == 3 / 4


def test_save_loads_in_peft_and_reproduces_call(tmp_path):
    base = tiny("llama")
    params = {
        **lf.init(0, base, LoHaConfig(r=4, alpha=8), targets=r"(q_proj|v_proj)$"),  # dense form on these sizes
        **lf.init(1, base, LoHaConfig(r=2, alpha=3), targets=r"up_proj$"),  # factored form
    }
    params = moved(params, seed=2)
    lf.save_peft(tmp_path / "out", params, model=base)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and cfg["r"] == 4 and cfg["alpha"] == 8
    assert set(cfg["rank_pattern"].values()) == {2} and set(cfg["alpha_pattern"].values()) == {3}
    mine = _out(base, params)
    assert rel_err(_out(_from_pretrained(base, tmp_path / "out")), mine) <= 1e-5
    assert rel_err(_out(base), mine) > 1e-4
    back = lf.load_peft(tmp_path / "out", model=base)
    for path, bv in params.items():
        for k, v in bv["loha"].items():
            assert torch.equal(back[path]["loha"][k], v.detach()), (path, k)


def test_gpt2_conv1d_save_is_refused(tmp_path):
    gpt2 = tiny("gpt2")
    params = lf.init(0, gpt2, LoHaConfig(r=2), targets=r"c_attn$")
    with pytest.raises(ValueError, match=r"peft's LOHA adapts torch.nn.Linear.*not transformers' Conv1D.*Conv1D layers"):
        lf.save_peft(tmp_path / "gpt2", params, model=gpt2)


def test_load_refuses_a_conv2d_target_that_pads_otherwise_than_with_zeros(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(self.conv(x).mean((-1, -2)))

    torch.manual_seed(0)
    net = Net().eval()
    _moved_peft(net, peft.LoHaConfig(r=2, target_modules=["conv", "lin"], use_effective_conv2d=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'conv' pads with padding_mode='reflect'.*zero padding"):
        lf.load_peft(tmp_path, model=net)


def test_load_refuses_a_non_number_alpha(tmp_path):
    base = tiny("llama")
    d = tmp_path / "a"
    _moved_peft(base, peft.LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "alpha_pattern": {"q_proj": "big"}}))
    with pytest.raises(ValueError, match=r"alpha / alpha_pattern gives 'big'.*expected a number"):
        lf.load_peft(d, model=base)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(ValueError, match=r"hada_w1_a has rank 2 but .* gives r=3"):
        lf.load_peft(d, model=base)


# ----------------------------------------------------------------------------- padding
def test_pad_is_exact_over_ranks_and_target_sets():
    base = tiny("llama")
    a = moved(lf.init(0, base, LoHaConfig(r=2, alpha=4), targets=r"q_proj$"), seed=1)
    b = moved(lf.init(1, base, LoHaConfig(r=5, alpha=3), targets=r"(q_proj|up_proj)$"), seed=2)
    stacked = lf.stack([a, b], pad=True)
    q = stacked["model.layers.0.self_attn.q_proj"]["loha"]
    assert q["A1"].shape == (2, 5, 32) and q["B2"].shape == (2, 32, 5)
    routed = _out_routed(base, stacked, 2)
    for k, p in enumerate((a, b)):
        alone = _out(base, p)
        assert rel_err(routed[k * 2 : (k + 1) * 2], alone) <= 1e-5, k
        assert rel_err(_out(base, lf.unstack(stacked)[k]), alone) <= 1e-6, k
        assert rel_err(alone, _out(base)) > 1e-4
    filled = lf.unstack(stacked)[0]["model.layers.0.mlp.up_proj"]["loha"]  # a does not target up_proj
    assert all(not bool(filled[k].any()) for k in PEFT_NAMES)


def _out_routed(base, stacked, K):
    with torch.no_grad():
        return logits(lf.call(base, stacked, IDS.repeat(K, 1), route=torch.arange(K).repeat_interleave(IDS.shape[0])))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r=0 must be a positive int"),
        (dict(r=2.0), "r=2.0 must be a positive int"),
        (dict(alpha=float("inf")), "alpha=inf must be a finite number"),
        (dict(alpha="8"), "alpha='8' must be a finite number"),
        (dict(init_weights="yes"), "init_weights='yes' must be a bool"),
        (dict(rank_dropout=0.1), r"rank_dropout=0.1 is not supported: peft applies it in training only.*use rank_dropout=0.0"),
        (
            dict(module_dropout=0.5),
            r"module_dropout=0.5 is not supported: peft applies it in training only.*use module_dropout=0.0",
        ),
        (dict(module_dropout=None), "module_dropout=None must be a finite number"),
    ],
)
def test_bad_config(kwargs, match):
    assert_config_refused(LoHaConfig, kwargs, match)


def test_rank_above_min_dim_is_refused():
    W, _ = make_layer(20, 12)
    with pytest.raises(ValueError, match=r"r=13 exceeds min\(d_out, d_in\)=12.*use r <= 12"):
        loha.init(0, W, LoHaConfig(r=13))


def test_params_from_another_width():
    p = loha.init(0, make_layer(20, 12)[0], LoHaConfig(r=2))
    W, b = make_layer(24, 12)
    with pytest.raises(ValueError, match=r"fit W of shape \(20, 12\), not W of shape \(24, 12\); init the params from this W"):
        loha.apply(p, W, torch.randn(3, 12), b)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24))
    with pytest.raises(ValueError, match=r"\['B1'\] has shape \(20, 2\) but loha on W of shape \(24, 12\) needs \(24, 2\)"):
        lf.call(model, {"0": {"loha": p}}, torch.randn(3, 12))
    bad = {**p, "A2": torch.zeros(3, 12)}  # the two pairs must share one rank
    with pytest.raises(ValueError, match=r"\['A2'\] has shape \(3, 12\) but loha .* needs \(2, 12\)"):
        lf.call(torch.nn.Sequential(torch.nn.Linear(12, 20)), {"0": {"loha": bad}}, torch.randn(3, 12))
