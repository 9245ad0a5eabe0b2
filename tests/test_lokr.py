"""LoKr: peft's factorization and layouts, parity with peft's LoKrConfig (outputs, gradients, merge), a float64
Kronecker reference, no d_out × d_in tensor in apply, identity at init, pad, peft files both ways, errors."""

from typing import Any

import peft
import pytest
import torch
from helpers import NewTensorSizes, assert_config_refused, assert_matches_reference, make_layer, peft_linear, rel_err
from models import tiny
from peft.tuners.lokr.layer import factorization as peft_factorization
from test_peft_io import IDS, assert_same, build, config_of, edit_config, from_pretrained, lite_out, moved_peft, out, saved

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import lokr
from lite_fn.variants.lokr import LoKrConfig

D_OUT, D_IN = 24, 36  # 24 = 4·6, 36 = 6·6 under peft's default factorization

# (peft LoKrConfig kwargs, leaves lite_fn / peft hold on a (24, 36) layer)
PARITY: dict[str, tuple[dict[str, Any], set[str]]] = {
    "w1-full-w2-product": (dict(r=2, alpha=5), {"w1", "w2_a", "w2_b"}),
    "both-products": (dict(r=1, alpha=2, decompose_both=True), {"w1_a", "w1_b", "w2_a", "w2_b"}),
    "both-full": (dict(r=4, alpha=3), {"w1", "w2"}),
    "factor-4": (dict(r=2, alpha=4, decompose_factor=4), {"w1", "w2_a", "w2_b"}),
    "factor-5-not-dividing": (dict(r=2, alpha=4, decompose_factor=5, decompose_both=True), {"w1", "w2_a", "w2_b"}),
    "factor-2-both": (dict(r=3, alpha=7, decompose_factor=2, decompose_both=True), {"w1", "w2_a", "w2_b"}),
}


def _ours_cfg(kwargs: dict[str, Any]) -> LoKrConfig:
    mine: dict[str, Any] = {**kwargs, "alpha": float(kwargs["alpha"])}  # peft's alpha is an int field
    return LoKrConfig(**mine)


def _peft_tensors(layer):
    """{our leaf name: peft's parameter} of a peft LoKr layer's default adapter."""
    return {k: getattr(layer, f"lokr_{k}")["default"] for k in lokr.FACTORS if "default" in getattr(layer, f"lokr_{k}")}


def _randomised(layer, seed, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    tensors = _peft_tensors(layer)
    with torch.no_grad():
        for t in tensors.values():
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    return tensors


def _kron_reference(p, W, b, x):
    """ΔW[i·b + p, j·d + q] = s · W₁[i, j] · W₂[p, q] (the Kronecker product, written out), float64."""
    dbl = {k: v.detach().double() for k, v in p.items()}
    W1 = dbl["w1"] if "w1" in dbl else dbl["w1_a"] @ dbl["w1_b"]
    W2 = dbl["w2"] if "w2" in dbl else dbl["w2_a"] @ dbl["w2_b"]
    (a, c), (bb, d) = W1.shape, W2.shape
    dW = torch.zeros(a * bb, c * d, dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            dW[i * bb : (i + 1) * bb, j * d : (j + 1) * d] = dbl["scale"] * W1[i, j] * W2
    return x.double() @ (W.double() + dW).T + b.double(), dW


# ---------------------------------------------------------------- peft's factorization and layouts


def test_factorization_equals_peft_and_its_documented_examples():
    assert [lokr.factorization(256), lokr.factorization(128), lokr.factorization(127), lokr.factorization(128, 4)] == [
        (16, 16),
        (8, 16),
        (1, 127),
        (4, 32),
    ]  # peft's docstring
    for dim in range(1, 300):
        for f in (-1, -2, 0, 1, 2, 3, 4, 5, 7, 8, 12, 16, 64, 1000):
            assert lokr.factorization(dim, f) == peft_factorization(dim, f), (dim, f)


@pytest.mark.parametrize("case", list(PARITY))
def test_layout_equals_peft_layers(case):
    kwargs, names = PARITY[case]
    W, b = make_layer(D_OUT, D_IN)
    theirs = {k: tuple(t.shape) for k, t in _peft_tensors(peft_linear(W, b, peft.LoKrConfig, **kwargs)).items()}
    ours = {k: tuple(v.shape) for k, v in lokr.init(0, W, _ours_cfg(kwargs)).items() if k != "scale"}
    assert ours == theirs and set(ours) == names


@pytest.mark.parametrize("d_out,d_in", [(17, 12), (64, 64), (48, 20), (96, 32)])
@pytest.mark.parametrize("kwargs", [dict(r=2), dict(r=1, decompose_both=True), dict(r=3, decompose_factor=4)])
def test_layout_equals_peft_for_other_widths(d_out, d_in, kwargs):
    W, b = make_layer(d_out, d_in)
    theirs = {k: tuple(t.shape) for k, t in _peft_tensors(peft_linear(W, b, peft.LoKrConfig, **kwargs)).items()}
    assert (
        lokr.layout(d_out, d_in, kwargs["r"], kwargs.get("decompose_both", False), kwargs.get("decompose_factor", -1)) == theirs
    )


# ---------------------------------------------------------------- init and identity


@pytest.mark.parametrize("init_weights", [True, "lycoris"])
@pytest.mark.parametrize("case", ["w1-full-w2-product", "both-products", "both-full"])
def test_init_like_peft_and_exact_identity(case, init_weights):
    """peft zeroes W₁ (w1, or w1_a) by default and W₂ (w2, or w2_b) with "lycoris"; the rest is kaiming-uniform
    U(±1/√fan_in); the output is F.linear's, bit for bit."""
    kwargs = {**PARITY[case][0], "init_weights": init_weights}
    W, b = make_layer(D_OUT, D_IN)
    theirs = _peft_tensors(peft_linear(W, b, peft.LoKrConfig, **kwargs))
    ours = lokr.init(0, W, _ours_cfg(kwargs))
    for k, t in theirs.items():
        mine = ours[k]
        assert mine.requires_grad and mine.dtype == W.dtype
        assert bool((mine == 0).all()) == bool((t == 0).all()), k  # the same factor is zero
        if not bool((t == 0).all()):
            bound = t.shape[1] ** -0.5
            for v in (mine.detach(), t.detach()):
                assert v.abs().max() <= bound and v.abs().max() > 0.5 * bound, k
    assert float(ours["scale"]) == kwargs["alpha"] / kwargs["r"] and not ours["scale"].requires_grad
    x = torch.randn(3, 5, D_IN)
    assert torch.equal(lokr.apply(ours, W, x, b), torch.nn.functional.linear(x, W, b))
    assert torch.equal(lokr.apply(ours, W, x), torch.nn.functional.linear(x, W))


def test_same_key_same_params_other_key_other_params():
    W, _ = make_layer(D_OUT, D_IN)
    cfg = LoKrConfig(r=1, decompose_both=True)
    p0, p0b, p1 = lokr.init(3, W, cfg), lokr.init(3, W, cfg), lokr.init(4, W, cfg)
    assert all(torch.equal(p0[k], p0b[k]) for k in p0)
    assert not torch.equal(p0["w1_b"], p1["w1_b"]) and not torch.equal(p0["w2_a"], p1["w2_a"])


# ---------------------------------------------------------------- peft parity (perturbed tensors)


@pytest.mark.parametrize("case", list(PARITY))
def test_peft_parity_outputs_and_grads(case):
    kwargs, _ = PARITY[case]
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = peft_linear(W, b, peft.LoKrConfig, **kwargs)
    theirs = _randomised(layer, seed=4)
    p = {k: t.detach().clone().requires_grad_(True) for k, t in theirs.items()}
    p["scale"] = lokr.init(0, W, _ours_cfg(kwargs))["scale"]
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    leaves = [(k, p[k], t) for k, t in theirs.items()]
    y_ref, _ = assert_matches_reference(layer, lambda h: lokr.apply(p, W, h, b), x, leaves, cotangent=6, tag=(case,))
    assert rel_err(y_ref, torch.nn.functional.linear(x, W, b)) > 1e-2  # the randomised adapter does something


@pytest.mark.parametrize("case", ["both-products", "factor-4"])
def test_merge_matches_peft_merge(case):
    kwargs, _ = PARITY[case]
    W, b = make_layer(D_OUT, D_IN, seed=7)
    layer = peft_linear(W, b, peft.LoKrConfig, **kwargs)
    p = {k: t.detach().clone() for k, t in _randomised(layer, seed=8).items()}
    p["scale"] = torch.tensor(kwargs["alpha"] / kwargs["r"])
    with torch.no_grad():
        layer.merge()
    W_merged, b_merged = variants.dense_weights(variants.get("lokr"), p, W, b)
    assert rel_err(W_merged, layer.get_base_layer().weight) <= 1e-5
    assert b_merged is not None and torch.equal(b_merged, b)  # the bias passes through


# ---------------------------------------------------------------- float64 Kronecker reference


@pytest.mark.parametrize(
    "factors",
    [
        {"w1": (2, 8), "w2": (8, 3)},  # W₁ on the c axis first is cheaper
        {"w1": (8, 3), "w2": (2, 8)},  # W₂ on the d axis first is cheaper
        {"w1_a": (4, 2), "w1_b": (2, 6), "w2_a": (5, 2), "w2_b": (2, 4)},
        {"w1": (1, 24), "w2": (20, 1)},  # degenerate: a prime-like split
        {"w1": (3, 3), "w2_a": (7, 1), "w2_b": (1, 8)},
    ],
)
def test_float64_against_the_dense_kronecker_product(factors):
    g = torch.Generator().manual_seed(1)
    p = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in factors.items()}
    p["scale"] = torch.tensor(0.7, dtype=torch.float64)
    W1 = p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]
    W2 = p["w2"] if "w2" in p else p["w2_a"] @ p["w2_b"]
    d_out, d_in = W1.shape[0] * W2.shape[0], W1.shape[1] * W2.shape[1]
    W, b = make_layer(d_out, d_in, dtype=torch.float64)
    x = torch.randn(3, 4, d_in, generator=g, dtype=torch.float64)
    want, dW = _kron_reference(p, W, b, x)
    assert rel_err(dW, 0.7 * torch.kron(W1, W2)) <= 1e-14  # the reference is the Kronecker product
    assert rel_err(lokr.apply(p, W, x, b), want) <= 1e-12
    if W1.shape[0] > 1 < W2.shape[1]:  # (a row ⊗ a column commutes) the order of the factors matters
        assert rel_err(lokr.apply(p, W, x, b), x @ (W + 0.7 * torch.kron(W2, W1)).T + b) > 1e-3


def test_apply_never_forms_the_kronecker_product():
    W, b = make_layer(64, 64)
    p = {"w1": torch.randn(8, 8), "w2": torch.randn(8, 8), "scale": torch.tensor(0.5)}
    x = torch.randn(3, 64)
    with NewTensorSizes() as rec:
        lokr.apply(p, W, x, b)
    assert max(rec.numels) < 64 * 64 // 4, max(rec.numels)  # the largest is an output, (3, 64)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), r"r=0 must be a positive int"),
        (dict(r=2.0), r"r=2.0 must be a positive int"),
        (dict(alpha=float("nan")), r"alpha=nan must be a finite number"),
        (dict(decompose_both="yes"), r"decompose_both='yes' must be a bool"),
        (dict(decompose_factor=0), r"decompose_factor=0 must be -1 .* or a positive int"),
        (dict(decompose_factor=-2), r"decompose_factor=-2 must be -1"),
        (dict(decompose_factor=2.5), r"decompose_factor=2.5 must be -1"),
        (dict(init_weights=False), r"init_weights=False is not True .* or 'lycoris'"),
        (dict(init_weights="gaussian"), r"init_weights='gaussian' is not True"),
        (dict(rank_dropout=0.1), r"rank_dropout=0.1 is not supported.*use rank_dropout=0.0"),
        (dict(module_dropout=0.5), r"module_dropout=0.5 is not supported.*use module_dropout=0.0"),
    ],
)
def test_bad_config(kwargs, match):
    assert_config_refused(LoKrConfig, kwargs, match)


def test_rank_above_min_dim_is_refused_at_init():
    W, _ = make_layer(40, 10)
    with pytest.raises(ValueError, match=r"r=11 exceeds min\(d_out, d_in\)=10.*use r <= 10"):
        lokr.init(0, W, LoKrConfig(r=11))
    assert set(lokr.init(0, W, LoKrConfig(r=10))) == {"w1", "w2", "scale"}


def test_params_from_another_width():
    p = lokr.init(0, make_layer(D_OUT, D_IN)[0], LoKrConfig(r=2))
    W, b = make_layer(16, D_IN)
    with pytest.raises(ValueError, match=r"W1 \(4, 6\) ⊗ W2 \(6, 6\) is \(24, 36\) but W has shape \(16, 36\); init the params"):
        lokr.apply(p, W, torch.randn(2, D_IN), b)
    given = {k: tuple(v.shape) for k, v in p.items()}
    with pytest.raises(ValueError, match=r"W1 of shape \(4, 6\) does not tile W of shape \(18, 36\)"):
        lokr.shapes(given, 18, 36)
    assert lokr.shapes(given, 16, 36)["w2_a"] == (4, 2)  # tiles: the runtime's check names the shape that differs
    with pytest.raises(ValueError, match=r"hold no W1"):
        lokr.shapes({"w2": (6, 6), "scale": ()}, D_OUT, D_IN)


def test_runtime_names_the_leaf_of_another_width():
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT))
    p = lf.init(0, model, LoKrConfig(r=2))
    other = torch.nn.Sequential(torch.nn.Linear(D_IN, 16))
    with pytest.raises(ValueError, match=r"\['w2_a'\] has shape \(6, 2\) but lokr on W of shape \(16, 36\) needs \(4, 2\)"):
        lf.call(other, p, torch.randn(2, D_IN))


# ---------------------------------------------------------------- lf.stack(pad=True)


def _adapter(cfg, targets, seed):
    return build("llama", [(cfg, targets)], seed)[1]  # lite_fn params on tiny Llama, trainable leaves moved


def test_pad_ranks_and_missing_layers_exactly():
    base = tiny("llama")
    a = _adapter(LoKrConfig(r=1, alpha=2.0, decompose_both=True), r"up_proj$", seed=1)
    b = _adapter(LoKrConfig(r=3, alpha=3.0, decompose_both=True), r"(up_proj|o_proj)$", seed=2)
    up = "model.layers.0.mlp.up_proj"  # (64, 32): W₁ (8, 4), W₂ (8, 8), both products below r = 4
    assert a[up]["lokr"]["w1_a"].shape == (8, 1) and b[up]["lokr"]["w2_b"].shape == (3, 8)
    stacked = lf.stack([a, b], pad=True)
    B = IDS.shape[0]
    routed = lite_out(base, stacked, IDS.repeat(2, 1), route=torch.arange(2).repeat_interleave(B))
    for k, p in enumerate((a, b)):
        assert_same(routed[k * B : (k + 1) * B], lite_out(base, p), effect_vs=out(base, IDS))
    filled = lf.unstack(stacked)[0]["model.layers.0.self_attn.o_proj"]["lokr"]
    assert all(not bool(filled[k].any()) for k in lokr.FACTORS if k in filled)  # a's missing layer: zero factors


def test_pad_refuses_other_factor_shapes_or_forms():
    q = r"q_proj$"
    full = _adapter(LoKrConfig(r=4), q, seed=1)  # W₂ (8, 8) full on q_proj (32 = 4·8)
    product = _adapter(LoKrConfig(r=2), q, seed=2)  # W₂ a rank-2 product
    other_split = _adapter(LoKrConfig(r=2, decompose_factor=2), q, seed=3)  # 32 = 2·16
    with pytest.raises(ValueError, match=r"cannot pad lokr .*W2 \(8, 8\) ⊗|W2 \(8, 8\) as a rank-2 product"):
        lf.stack([full, product], pad=True)
    with pytest.raises(ValueError, match=r"cannot pad lokr .*W1 \(4, 4\) ⊗ W2 \(8, 8\).*W1 \(2, 2\) ⊗ W2 \(16, 16\)"):
        lf.stack([product, other_split], pad=True)


# ---------------------------------------------------------------- peft files, both ways (tiny Llama)


LOAD = {
    "default": lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    "decompose-both-patterns": lambda: peft.LoKrConfig(
        r=2,
        alpha=5,
        decompose_both=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 1},
        alpha_pattern={"layers.1.mlp.down_proj": 3},
    ),
    "factor-4-and-training-fields": lambda: peft.LoKrConfig(
        r=8,
        alpha=4,
        decompose_factor=4,
        target_modules="all-linear",
        rank_dropout=0.2,
        module_dropout=0.1,
        rank_dropout_scale=True,
        init_weights="lycoris",
        use_effective_conv2d=True,
    ),
}


@pytest.mark.parametrize("case", list(LOAD))
def test_load_peft_equals_from_pretrained(case, tmp_path):
    base = tiny("llama")
    d = saved(moved_peft(base, LOAD[case]()), tmp_path)
    params = lf.load_peft(d, model=base)
    assert {n for bv in params.values() for n in bv} == {"lokr"}
    assert_same(lite_out(base, params), out(from_pretrained(base, d), IDS), effect_vs=out(base, IDS))
    for bv in params.values():
        leaves = bv["lokr"]
        assert {k for k, v in leaves.items() if v.requires_grad} == set(leaves) - {"scale"}


SAVE = {  # [(cfg, targets)]
    "one-config": [(LoKrConfig(r=2, alpha=4.0), r"(q_proj|v_proj)$")],
    "ranks-and-alphas": [
        (LoKrConfig(r=1, alpha=3.0, decompose_both=True), r"(q_proj|up_proj)$"),
        (LoKrConfig(r=2, alpha=1.5, decompose_both=True), r"o_proj$"),
        (LoKrConfig(r=8, alpha=2.0), r"v_proj$"),  # both factors full: r only sets the scale
    ],
    "factor-8-lycoris": [(LoKrConfig(r=4, alpha=6.0, decompose_factor=8, init_weights="lycoris"), r"(k_proj|gate_proj)$")],
}


@pytest.mark.parametrize("case", list(SAVE))
def test_save_peft_loads_in_peft_and_back(case, tmp_path):
    base, params = build("llama", SAVE[case], seed=10)
    lf.save_peft(tmp_path / "out", params, model=base)
    assert config_of(tmp_path / "out")["peft_type"] == "LOKR"
    mine = lite_out(base, params)
    assert_same(out(from_pretrained(base, tmp_path / "out"), IDS), mine, effect_vs=out(base, IDS))
    assert_same(lite_out(base, lf.load_peft(tmp_path / "out", model=base)), mine, tol=1e-6)


def test_save_refuses_what_one_peft_config_cannot_hold(tmp_path):
    base = tiny("llama")
    mixed = {
        **_adapter(LoKrConfig(r=2), r"q_proj$", seed=1),  # 32 = 4·8
        **_adapter(LoKrConfig(r=2, decompose_factor=2), r"o_proj$", seed=2),  # 32 = 2·16
    }
    with pytest.raises(ValueError, match=r"one decompose_factor per adapter.*\(32, 32\) as \(2, 2\) ⊗ \(16, 16\)"):
        lf.save_peft(tmp_path / "x", mixed, model=base)
    both = {
        **_adapter(LoKrConfig(r=1, decompose_both=True), r"q_proj$", seed=1),  # W₁ a product
        **_adapter(LoKrConfig(r=1), r"o_proj$", seed=2),  # W₁ full at r=1 < max(4, 4)/2
    }
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.o_proj' holds W1 \(4, 4\) .*decompose_both=True"):
        lf.save_peft(tmp_path / "x", both, model=base)
    gpt2 = tiny("gpt2")
    conv1d = lf.init(0, gpt2, LoKrConfig(r=2), targets=r"c_attn$", progress=False)
    with pytest.raises(ValueError, match=r"peft's LOKR adapts torch.nn.Linear .*Conv1D"):
        lf.save_peft(tmp_path / "x", conv1d, model=gpt2)


def test_load_refuses_tensors_that_do_not_fit_the_config(tmp_path):
    base = tiny("llama")
    d = saved(moved_peft(base, peft.LoKrConfig(r=2, target_modules=["q_proj"])), tmp_path)
    edit_config(d, r=4)  # peft would build W₂ (8, 8) full at r=4; the file holds a rank-2 product
    with pytest.raises(
        ValueError,
        match=r"q_proj' \(read as lokr\) lacks tensor\(s\) \['lokr_w2'\]; has tensor\(s\) \['lokr_w2_a', 'lokr_w2_b'\].*holds exactly \['lokr_w1', 'lokr_w2'\]",
    ):
        lf.load_peft(d, model=base)
    edit_config(d, r=2, decompose_factor="4")
    with pytest.raises(ValueError, match=r"decompose_factor='4'; expected an int"):
        lf.load_peft(d, model=base)


def test_light_path_and_op_by_op_agree():
    """Under no_grad apply gets the layer's stand-in weight (F.linear returns the layer's own output); with a
    trainable base it gets the weight itself: the same result either way."""
    base = tiny("llama")
    params = build("llama", [(LoKrConfig(r=2, decompose_both=True), r"(q_proj|v_proj|down_proj)$")], seed=3)[1]
    light = lite_out(base, params)
    full = lf.call(base, params, IDS).logits
    torch.testing.assert_close(light, full.detach(), rtol=0, atol=1e-6)
    assert_same(light, full, effect_vs=out(base, IDS))
