"""OFT: config and size errors, parity with peft's OFTConfig (oft_block_size / r, exact Cayley and the
Cayley–Neumann series, COFT, block_share; outputs and gradients), a float64 reference from the paper's
formula, exact identity at init, COFT's straight-through gradient, vmap, merge, pad, peft files both ways,
and a 4-bit base."""

import contextlib
import json
import math
import os
from typing import Any

import peft
import pytest
import torch
from helpers import assert_config_refused, assert_matches_reference, make_layer, moved, peft_linear, rel_err
from models import logits, tiny, tokens
from test_peft_io import (
    IDS,
    _one_thread,  # noqa: F401  (its autouse fixture: one intra-op thread for tiny models)
    config_of,
    from_pretrained,
    lite_out,
    moved_peft,
    out,
)
from torch.func import vmap

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import oft
from lite_fn.variants.oft import OFTConfig

D_OUT, D_IN = 20, 64


def _oft_weight(layer: Any) -> torch.nn.Parameter:
    """peft's oft_R weight of one adapted layer (our leaf Q, as is)."""
    return layer.oft_R["default"].weight


def _ours_kwargs(kw):
    """peft's OFTConfig arguments as lite_fn's: peft's 0 ("not set") is None here."""
    return {k: v for k, v in kw.items() if not (k in ("r", "oft_block_size") and v == 0)}


# ---------------------------------------------------------------- configuration and size errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), r"r=0 must be a positive int.*leave r=None"),
        (dict(r=-2), r"r=-2 must be a positive int"),
        (dict(r=2.0), r"r=2.0 must be a positive int"),
        (dict(oft_block_size=1), r"oft_block_size=1 must be an int >= 2"),
        (dict(oft_block_size=True), r"oft_block_size=True must be an int >= 2"),
        (dict(r=4, oft_block_size=8), r"r=4 and oft_block_size=8 are both set.*set only r=4.*or only oft_block_size=8"),
        (dict(coft=1), r"coft=1 must be True or False"),
        (dict(block_share="yes"), r"block_share='yes' must be True or False"),
        (dict(eps=0.0), r"eps=0.0 must be > 0"),
        (dict(eps=float("nan")), r"eps=nan must be a finite number"),
        (dict(num_cayley_neumann_terms=1), r"num_cayley_neumann_terms=1 keeps only the I term"),
        (dict(num_cayley_neumann_terms=0, use_cayley_neumann=False), r"num_cayley_neumann_terms=0 must be a positive int"),
        (dict(module_dropout=0.1), r"module_dropout=0.1 is not supported.*use module_dropout=0.0"),
    ],
)
def test_bad_config(kwargs, match):
    assert_config_refused(OFTConfig, kwargs, match)


def test_config_sizes():
    assert OFTConfig().block_size == 32  # peft's default oft_block_size
    assert OFTConfig(oft_block_size=8).block_size == 8
    assert OFTConfig(r=4).block_size is None
    OFTConfig(num_cayley_neumann_terms=1, use_cayley_neumann=False)  # unused there: fine


@pytest.mark.parametrize(
    "kwargs,d_in,match,fix",
    [
        (dict(oft_block_size=5), 24, r"oft_block_size=5 does not divide d_in=24; use oft_block_size=4 or oft_block_size=6", 4),
        (dict(oft_block_size=64), 24, r"oft_block_size=64 does not divide d_in=24; use oft_block_size=24 \(", 24),
        (dict(), 24, r"oft_block_size=32 does not divide d_in=24; use oft_block_size=24 \(", 24),
        (dict(r=5), 24, r"r=5 does not split d_in=24 into equal blocks of size >= 2; use r=4 or r=6", 6),
        (dict(r=24), 24, r"r=24 does not split d_in=24.*use r=12 \(a divisor of 24 up to 12", 12),
        (dict(oft_block_size=4), 7, r"oft_block_size=4 does not divide d_in=7; use oft_block_size=7", 7),
    ],
)
def test_sizes_that_do_not_divide_d_in_are_refused_with_valid_ones(kwargs, d_in, match, fix):
    W, _ = make_layer(6, d_in)
    with pytest.raises(ValueError, match=match):
        oft.init(0, W, OFTConfig(**kwargs))
    key = "r" if "r" in kwargs else "oft_block_size"
    oft.init(0, W, OFTConfig(**{key: fix}))  # the suggestion works


def test_params_from_another_width_are_refused():
    p = oft.init(0, make_layer(6, 24)[0], OFTConfig(oft_block_size=8))
    W, b = make_layer(6, 32)
    with pytest.raises(ValueError, match=r"oft.apply: Q of shape \(3, 28\) is not an OFT layout for d_in=32.*lf.init"):
        oft.apply(p, W, torch.randn(2, 32), b)
    with pytest.raises(ValueError, match=r"Q of shape \(5, 7\) is not an OFT layout"):  # 7 is no triangle number
        oft.apply({"Q": torch.zeros(5, 7)}, W, torch.randn(2, 32), b)


def test_leaves():
    W, _ = make_layer(6, 24)
    p = oft.init(0, W, OFTConfig(r=4))
    assert set(p) == {"Q", "neumann"} and p["Q"].shape == (4, 15) and p["Q"].requires_grad
    assert torch.equal(p["Q"], torch.zeros(4, 15)) and p["neumann"].tolist() == [2.0, 2.0, 2.0, 1.0]
    p = oft.init(0, W, OFTConfig(oft_block_size=8, block_share=True, coft=True, use_cayley_neumann=False))
    assert set(p) == {"Q", "eps"} and p["Q"].shape == (1, 28) and not p["eps"].requires_grad
    assert p["eps"].item() == pytest.approx(6e-5)
    assert oft.shapes({k: tuple(v.shape) for k, v in p.items()}, 6, 24) == {"Q": (1, 28), "eps": ()}


# ---------------------------------------------------------------- peft parity (outputs and gradients)

PEFT_CASES = {
    "default": dict(),  # oft_block_size=32 and the 5-term Cayley–Neumann series
    "oft_block_size": dict(oft_block_size=8),
    "r": dict(r=4, oft_block_size=0),
    "exact-cayley": dict(oft_block_size=8, use_cayley_neumann=False),
    "neumann-2": dict(oft_block_size=8, num_cayley_neumann_terms=2),
    "neumann-3": dict(oft_block_size=8, num_cayley_neumann_terms=3),
    "neumann-7": dict(oft_block_size=16, num_cayley_neumann_terms=7),
    "block_share": dict(oft_block_size=8, block_share=True),
    "coft": dict(oft_block_size=8, coft=True),
    "coft-exact-share": dict(oft_block_size=16, coft=True, block_share=True, use_cayley_neumann=False),
}


def _coft_eps(w):
    """An eps whose radius ε' = eps/√rows lies between the block norms ‖Q_i‖_F = √2‖q_i‖ (some blocks projected,
    some not); for one shared block, a radius of half its norm."""
    norms = math.sqrt(2.0) * w.detach().double().norm(dim=-1)
    radius = norms.median().item() if norms.numel() > 1 else 0.5 * norms.item()
    return radius * math.sqrt(w.shape[0]), norms, radius


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_parity_outputs_and_grads(case):
    kw = dict(PEFT_CASES[case])
    W, b = make_layer(D_OUT, D_IN, seed=3)
    g = torch.Generator().manual_seed(4)
    if kw.get("coft"):  # pick eps from the perturbation peft's tensor will get
        probe = _oft_weight(peft_linear(W, b, peft.OFTConfig, **kw))
        kw["eps"], norms, radius = _coft_eps(0.3 * torch.randn(probe.shape, generator=g))
        assert (norms > radius).any() and (norms.numel() == 1 or (norms < radius).any())
        g = torch.Generator().manual_seed(4)
    layer = peft_linear(W, b, peft.OFTConfig, **kw)
    w = _oft_weight(layer)
    with torch.no_grad():
        w.copy_(0.3 * torch.randn(w.shape, generator=g))
    p = oft.init(0, W, OFTConfig(**_ours_kwargs(kw)))
    assert p["Q"].shape == w.shape  # peft's oft_R.weight is our Q, as is
    Q = w.detach().clone().requires_grad_(True)  # copied before peft's forward projects w in place (coft)
    p = {**p, "Q": Q}
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    y_ref, _ = assert_matches_reference(layer, lambda h: oft.apply(p, W, h, b), x, [("Q", Q, w)], cotangent=6, tag=(case,))
    assert rel_err(y_ref, torch.nn.functional.linear(x, W, b)) > 1e-2  # really not the identity


@pytest.mark.parametrize("case", ["oft_block_size", "exact-cayley", "block_share"])
def test_merge_matches_peft_merge(case):
    kw = PEFT_CASES[case]
    W, b = make_layer(D_OUT, D_IN, seed=7)
    layer = peft_linear(W, b, peft.OFTConfig, **kw)
    w = _oft_weight(layer)
    with torch.no_grad():
        w.copy_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(8)))
    p = {**oft.init(0, W, OFTConfig(**_ours_kwargs(kw))), "Q": w.detach().clone()}
    layer.merge()
    Wm, bm = variants.dense_weights(variants.get("oft"), p, W, b)
    assert rel_err(Wm, layer.get_base_layer().weight) <= 1e-5
    assert bm is not None and torch.equal(bm, b)  # the bias is not rotated
    assert rel_err(Wm, W) > 1e-2


# ---------------------------------------------------------------- float64 reference (the paper's formula, not peft's code)


def _reference_R(q, bs, n, exact, terms, eps):
    """blockdiag(R_1 … R_n): Q_i = P_i − P_iᵀ from the upper triangle q_i (row-major); COFT scales Q_i into the
    Frobenius ball of radius eps/√rows; R_i = (I − Q_i)(I + Q_i)⁻¹, or the series I + 2Q + … + 2Q^{p−1} + Q^p."""
    rows, blocks = q.shape[0], []
    iu = torch.triu_indices(bs, bs, offset=1)
    eye = torch.eye(bs, dtype=q.dtype)
    for i in range(n):
        P = torch.zeros(bs, bs, dtype=q.dtype)
        P[iu[0], iu[1]] = q[0 if rows == 1 else i]
        S = P - P.T
        if eps is not None:
            radius = eps / math.sqrt(rows)
            S = S * min(1.0, radius / S.norm().item())
        if exact:
            R = (eye - S) @ torch.linalg.inv(eye + S)
        elif terms == 2:
            R = eye + 2 * S
        else:
            p = max(terms - 1, 3)
            R = eye + sum(2 * torch.linalg.matrix_power(S, k) for k in range(1, p)) + torch.linalg.matrix_power(S, p)
        blocks.append(R)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize(
    "kw",
    [
        dict(oft_block_size=4, use_cayley_neumann=False),
        dict(r=3, num_cayley_neumann_terms=5),
        dict(oft_block_size=6, num_cayley_neumann_terms=3),
        dict(oft_block_size=6, num_cayley_neumann_terms=2, block_share=True),
        dict(oft_block_size=4, use_cayley_neumann=False, coft=True, eps=3.3),  # radius 1.9: one block of three kept
    ],
    ids=str,
)
def test_float64_reference(kw):
    cfg = OFTConfig(**kw)
    W, b = make_layer(10, 12, dtype=torch.float64)
    p = oft.init(0, W, cfg)
    bs = 12 // cfg.r if cfg.r else cfg.block_size
    assert bs is not None
    q = 0.4 * torch.randn(p["Q"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    R = _reference_R(q, bs, 12 // bs, not cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms, cfg.eps if cfg.coft else None)
    y = oft.apply({**p, "Q": q}, W, x, b)
    assert rel_err(y, x @ R @ W.T + b) <= 1e-12
    assert rel_err(y, x @ R.T @ W.T + b) > 1e-2  # the orientation matters, and we would notice
    if not cfg.use_cayley_neumann:  # the exact transform is orthogonal
        assert rel_err(R.T @ R, torch.eye(12, dtype=torch.float64)) <= 1e-12


def test_the_series_expands_the_inverse_of_the_exact_transform():
    """peft's two modes rotate in opposite senses: the Neumann series sums (I + Q)(I − Q)⁻¹, the solve gives
    (I − Q)(I + Q)⁻¹; with many terms and a small Q, series(Q) = exact(−Q)."""
    W, b = make_layer(10, 12, dtype=torch.float64)
    q = 0.05 * torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    series = {**oft.init(0, W, OFTConfig(oft_block_size=4, num_cayley_neumann_terms=40)), "Q": q}
    exact = {**oft.init(0, W, OFTConfig(oft_block_size=4, use_cayley_neumann=False)), "Q": -q}
    assert rel_err(oft.apply(series, W, x, b), oft.apply(exact, W, x, b)) <= 1e-12
    assert rel_err(oft.apply({**exact, "Q": q}, W, x, b), oft.apply(exact, W, x, b)) > 1e-3


def test_coft_gradient_passes_the_projection_straight_through():
    """The gradient at Q is the unconstrained gradient at the projected Q (peft projects its parameter in place
    under no_grad, then differentiates); a gradient through the projection would differ."""
    W, b = make_layer(10, 12, dtype=torch.float64)
    q = 0.5 * torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps, _, radius = _coft_eps(q)
    p = oft.init(0, W, OFTConfig(oft_block_size=4, coft=True, eps=eps, use_cayley_neumann=False))
    scale = (radius / (math.sqrt(2.0) * q.norm(dim=-1, keepdim=True))).clamp(max=1.0)
    assert (scale < 1).any() and (scale == 1).any()  # both branches: the median block is kept
    x = torch.randn(5, 12, dtype=torch.float64)
    cot = torch.randn(5, 10, dtype=torch.float64)
    (g_coft,) = torch.autograd.grad((oft.apply({**p, "Q": q.requires_grad_(True)}, W, x, b) * cot).sum(), [q])
    plain = {"Q": (q.detach() * scale).requires_grad_(True)}
    y_plain = oft.apply(plain, W, x, b)
    (g_plain,) = torch.autograd.grad((y_plain * cot).sum(), [plain["Q"]])
    assert rel_err(oft.apply({**p, "Q": q}, W, x, b), y_plain) <= 1e-12
    assert rel_err(g_coft, g_plain) <= 1e-12
    through = torch.func.grad(
        lambda t: (
            oft.apply({"Q": t * (radius / (math.sqrt(2.0) * t.norm(dim=-1, keepdim=True))).clamp(max=1.0)}, W, x, b) * cot
        ).sum()
    )(q.detach())
    assert rel_err(g_coft, through) > 1e-3


# ---------------------------------------------------------------- identity, vmap, merge


@pytest.mark.parametrize(
    "kw",
    [dict(oft_block_size=8), dict(r=2, use_cayley_neumann=False), dict(oft_block_size=4, coft=True, block_share=True)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_identity_at_init_is_exact(kw, dtype):
    W, b = make_layer(D_OUT, D_IN, dtype=dtype)
    p = oft.init(0, W, OFTConfig(**kw))
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(oft.apply(p, W, x, b), torch.nn.functional.linear(x, W, b))


def test_vmap_and_merge_with_a_block_size_config():
    """The generic suites run r-configs; here the oft_block_size and Cayley forms."""
    W, b = make_layer(D_OUT, D_IN)
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(2))
    for cfg in (OFTConfig(oft_block_size=16), OFTConfig(oft_block_size=8, use_cayley_neumann=False, block_share=True)):
        base = oft.init(0, W, cfg)
        ps = [moved({"l": {"oft": base}}, seed=k)["l"]["oft"] for k in range(3)]
        stacked = {k: torch.stack([p[k].detach() for p in ps]) for k in base}
        got = vmap(lambda p: oft.apply(p, W, x, b))(stacked)
        want = torch.stack([oft.apply(p, W, x, b) for p in ps])
        assert rel_err(got, want) <= 1e-5
        Wm, bm = variants.dense_weights(variants.get("oft"), ps[0], W, b)
        assert rel_err(torch.nn.functional.linear(x, Wm, bm), want[0]) <= 1e-5


# ---------------------------------------------------------------- lf.stack(pad=True)


def _build(cfg, targets, seed):
    return moved(lf.init(seed, tiny("llama"), cfg, targets=targets), seed)


def test_pad_neumann_lengths_and_missing_layers_exactly():
    base = tiny("llama")
    a = _build(OFTConfig(oft_block_size=8, num_cayley_neumann_terms=3), r"(q_proj|o_proj)$", 1)
    c = _build(OFTConfig(oft_block_size=8, num_cayley_neumann_terms=7), r"q_proj$", 2)
    stacked = lf.stack([a, c], pad=True)
    assert stacked["model.layers.0.self_attn.q_proj"]["oft"]["neumann"].shape == (2, 6)
    x = IDS.repeat(2, 1)
    with torch.no_grad():
        routed = logits(lf.call(base, stacked, x, route=torch.tensor([0, 0, 1, 1])))
        for k, p in enumerate((a, c)):
            alone = logits(lf.call(base, p, IDS))
            assert rel_err(routed[2 * k : 2 * k + 2], alone) <= 1e-6, k
            assert rel_err(alone, logits(base(IDS))) > 1e-3
    filled = lf.unstack(stacked)[1]["model.layers.0.self_attn.o_proj"]["oft"]
    assert torch.equal(filled["Q"], torch.zeros_like(filled["Q"]))  # R = I where adapter 1 has no layer


def test_pad_refusals_name_the_reason():
    q8 = _build(OFTConfig(oft_block_size=8), r"q_proj$", 1)
    with pytest.raises(ValueError, match=r"cannot pad oft .*rotate different blocks.*\(4, 28\).*\(2, 120\)"):
        lf.stack([q8, _build(OFTConfig(oft_block_size=16), r"q_proj$", 2)], pad=True)
    with pytest.raises(ValueError, match=r"cannot pad oft .*different functions of Q.*eps comes with coft"):
        lf.stack([q8, _build(OFTConfig(oft_block_size=8, coft=True), r"q_proj$", 2)], pad=True)


# ---------------------------------------------------------------- peft files both ways


def _edit(path, **fields):
    """test_peft_io's edit_config, where a field given as _DROP is removed."""
    cfg = {k: v for k, v in {**config_of(path), **fields}.items() if v is not _DROP}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


_DROP = object()

LOAD_CASES = {
    "default": dict(target_modules=["q_proj", "down_proj"]),  # block size 32: one block on q_proj, two on down_proj
    "r": dict(r=4, oft_block_size=0, target_modules=["k_proj", "up_proj"]),
    "exact-coft": dict(oft_block_size=8, use_cayley_neumann=False, coft=True, eps=1.0, target_modules=["v_proj", "o_proj"]),
    "block_share": dict(oft_block_size=16, block_share=True, num_cayley_neumann_terms=3, target_modules=["q_proj", "down_proj"]),
    "adjusted-by-peft": dict(oft_block_size=12, target_modules=["q_proj"]),  # peft moves it to 8 for d_in=32
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_reproduces_peft_from_pretrained(case, tmp_path):
    with pytest.warns(UserWarning, match="Adjusted") if case == "adjusted-by-peft" else contextlib.nullcontext():
        pm = moved_peft(tiny("llama"), peft.OFTConfig(**LOAD_CASES[case]))
    pm.save_pretrained(tmp_path / "a")
    params = lf.load_peft(tmp_path / "a", model=tiny("llama"))
    assert {n for bv in params.values() for n in bv} == {"oft"}
    for bv in params.values():
        assert {k for k, v in bv["oft"].items() if v.requires_grad} == {"Q"}
    ours = lite_out(tiny("llama"), params)
    assert rel_err(ours, out(from_pretrained(tiny("llama"), tmp_path / "a"), IDS)) <= 1e-5
    assert rel_err(ours, out(tiny("llama"), IDS)) > 1e-4


SAVE_CASES = {  # [(cfg, targets)], the sizes peft's config should say
    "block-size": ([(OFTConfig(oft_block_size=8), r"(q_proj|down_proj)$")], dict(r=0, oft_block_size=8)),
    "exact-coft-share": (
        [(OFTConfig(r=2, block_share=True, coft=True, eps=0.5, use_cayley_neumann=False), r"(o_proj|up_proj)$")],
        dict(r=0, oft_block_size=16, block_share=True, coft=True, eps=0.5, use_cayley_neumann=False),
    ),
    "r-over-two-widths": (
        [(OFTConfig(r=4, num_cayley_neumann_terms=4), r"(q_proj|down_proj)$")],  # blocks of 8 and 16
        dict(r=4, oft_block_size=0, use_cayley_neumann=True, num_cayley_neumann_terms=4),
    ),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_loads_in_peft_and_reproduces_call(case, tmp_path):
    cfgs, expected = SAVE_CASES[case]
    params = {}
    for i, (cfg, targets) in enumerate(cfgs):
        params.update(_build(cfg, targets, i))
    lf.save_peft(tmp_path / "out", params, model=tiny("llama"))
    written = config_of(tmp_path / "out")
    assert written["peft_type"] == "OFT" and {k: written[k] for k in expected} == expected
    mine = lite_out(tiny("llama"), params)
    assert rel_err(out(from_pretrained(tiny("llama"), tmp_path / "out"), IDS), mine) <= 1e-5
    assert rel_err(mine, out(tiny("llama"), IDS)) > 1e-4
    back = lf.load_peft(tmp_path / "out", model=tiny("llama"))
    assert rel_err(lite_out(tiny("llama"), back), mine) <= 1e-6


def test_save_refusals_name_what_peft_cannot_hold(tmp_path):
    base = tiny("llama")
    two_sizes = {**_build(OFTConfig(oft_block_size=8), r"q_proj$", 0), **_build(OFTConfig(oft_block_size=32), r"down_proj$", 1)}
    with pytest.raises(ValueError, match=r"one r \(blocks per layer\) or one oft_block_size.*4 blocks of 8.*2 blocks of 32"):
        lf.save_peft(tmp_path / "x", two_sizes, model=base)
    mixed = {
        **_build(OFTConfig(oft_block_size=8, coft=True), r"q_proj$", 0),
        **_build(OFTConfig(oft_block_size=8), r"o_proj$", 1),
    }
    with pytest.raises(ValueError, match=r"one use_cayley_neumann and one coft per adapter.*coft=True.*coft=False"):
        lf.save_peft(tmp_path / "x", mixed, model=base)
    gpt2 = tiny("gpt2")
    with pytest.raises(ValueError, match=r"peft's OFT adapts torch.nn.Linear.*Conv1D"):
        lf.save_peft(tmp_path / "x", lf.init(0, gpt2, OFTConfig(oft_block_size=8), targets=r"c_attn$"), model=gpt2)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(oft_block_size=_DROP), r"has no oft_block_size: it was written by peft < 0.14"),
        (dict(r=4), r"sets r=4 and oft_block_size=8; peft's OFT needs exactly one of them non-zero"),
        (dict(block_share=True), r"q_proj.oft_R.weight has shape \(4, 28\), but .* gives \(1, 28\)"),
        (dict(oft_block_size=16), r"has shape \(4, 28\), but .* gives \(2, 120\)"),
        (dict(some_new_field=3), r"some_new_field=3.*does not know the field"),
    ],
)
def test_load_refuses_edited_configs_naming_the_field(fields, match, tmp_path):
    moved_peft(tiny("llama"), peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    _edit(tmp_path / "a", **fields)
    with pytest.raises(ValueError, match=match):
        lf.load_peft(tmp_path / "a", model=tiny("llama"))


def test_load_ignores_module_dropout_as_peft_does(tmp_path):
    """peft 0.21 builds the block dropout but never calls it: even in train mode its output is the eval one."""
    pm = moved_peft(tiny("llama"), peft.OFTConfig(oft_block_size=8, module_dropout=0.5, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "a")
    params = lf.load_peft(tmp_path / "a", model=tiny("llama"))
    with torch.no_grad():
        train_out = logits(pm.train()(IDS))
    assert rel_err(lite_out(tiny("llama"), params), train_out) <= 1e-5


def test_embedding_target_loads_as_the_output_side_form_and_saves_back(tmp_path):
    """peft's OFT on an nn.Embedding rotates the embedding vectors (oft_embedding_R): leaf Q_out, both ways."""
    pm = moved_peft(tiny("llama"), peft.OFTConfig(oft_block_size=8, target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(tmp_path / "a")  # peft then saves the embedding weights too
    with pytest.raises(ValueError, match=r"holds base-model weights.*embed_tokens"):
        lf.load_peft(tmp_path / "a", model=tiny("llama"))
    pm.save_pretrained(tmp_path / "b", save_embedding_layers=False)  # only oft_embedding_R.weight
    params = lf.load_peft(tmp_path / "b", model=tiny("llama"))
    assert set(params["model.embed_tokens"]["oft"]) == {"Q_out", "neumann"}
    want = out(pm, IDS)
    assert rel_err(lite_out(tiny("llama"), params), want) <= 1e-5
    assert rel_err(lite_out(tiny("llama"), params), out(tiny("llama"), IDS)) > 1e-3  # the rotation is not trivial
    lf.save_peft(tmp_path / "c", params, model=tiny("llama"))
    assert rel_err(out(from_pretrained(tiny("llama"), tmp_path / "c"), IDS), want) <= 1e-5


# ---------------------------------------------------------------- a 4-bit base (peft's OFT wraps bitsandbytes layers too)


def test_parity_with_peft_on_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from test_quantized import TARGETS, quantized

    ours_model, x = quantized("nf4", train=True), tokens()
    cfg = OFTConfig(oft_block_size=16)
    pm: Any = peft.get_peft_model(
        quantized("nf4", train=True), peft.OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    params = lf.init(0, ours_model, cfg, targets=TARGETS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, bv in params.items():
            w = _oft_weight(pm.base_model.model.get_submodule(path))
            w.copy_(0.2 * torch.randn(w.shape, generator=gen))
            bv["oft"]["Q"] = w.detach().clone().requires_grad_(True)
    ref = pm(x).logits
    ours = lf.call(ours_model, params, x).logits
    assert rel_err(ours, ref) <= 1e-5
    with torch.no_grad():
        assert rel_err(ours, ours_model(x).logits) > 1e-3
    ref.square().mean().backward()
    ours.square().mean().backward()
    for path, bv in params.items():
        mine, theirs = bv["oft"]["Q"].grad, _oft_weight(pm.base_model.model.get_submodule(path)).grad
        assert mine is not None and theirs is not None and rel_err(mine, theirs) <= 1e-4, path
