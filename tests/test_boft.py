"""BOFT: config and size errors, parity with peft's BOFTConfig (block_size / block_num forms, 1–3
butterfly factors; outputs, gradients, the dense butterfly matrix, merge), a float64 reference from
the paper's definition, identity at init, no d×d matrix, vmap, pad, and peft files both ways."""

import json

import peft
import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from helpers import NewTensorSizes, assert_config_refused, assert_matches_reference, make_layer, moved, peft_linear, rel_err
from models import logits, tiny
from test_peft_io import IDS, from_pretrained, lite_out, moved_peft, out
from torch.func import vmap

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import boft
from lite_fn.variants.boft import BOFTConfig

D_OUT, D_IN = 20, 32


class _BlockDiagInTorch:
    """Stands in for peft's CUDA extension fbd_cuda (block-diagonal assembly, forward and backward) in plain
    torch on CPU. peft's pure-torch fallback (no extension) only supports one factor: it then forces
    n_butterfly_factor = 1. With this, the rest of peft's multi-factor path runs as is."""

    @staticmethod
    def forward(blocks):  # (N, D, H, H) -> [(N, D·H, D·H)]
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):  # the diagonal blocks of the gradient
        N, D, H, _ = blocks.shape
        g = grad.reshape(N, D, H, D, H)
        return [torch.stack([g[:, k, :, k, :] for k in range(D)], dim=1)]


@pytest.fixture(autouse=True)
def _peft_cpu_path(monkeypatch):
    """peft's BOFT without its CUDA extension (its pure-torch path), and without trying to build it at every
    layer (peft retries the compile each time it finds none). ``_multi_factor`` switches the stand-in on."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)


@pytest.fixture
def _multi_factor(monkeypatch):
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: _BlockDiagInTorch)


def _peft_kwargs(cfg: BOFTConfig) -> dict:
    return dict(boft_block_size=cfg.block_size, boft_block_num=cfg.block_num, boft_n_butterfly_factor=cfg.n_butterfly_factor)


# every option peft has that lite_fn supports: both size forms, 1, 2 and 3 butterfly factors (d_in = 32)
PARITY = [
    BOFTConfig(block_size=4),
    BOFTConfig(block_num=4),
    BOFTConfig(block_size=4, n_butterfly_factor=2),
    BOFTConfig(block_num=4, n_butterfly_factor=2),
    BOFTConfig(block_size=2, n_butterfly_factor=3),
    BOFTConfig(block_num=8, n_butterfly_factor=3),
]


# ---------------------------------------------------------------- configuration and size errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=4, block_num=8), r"block_size=4 and block_num=8: set exactly one"),
        (dict(block_size=0, block_num=0), r"block_size=0 and block_num=0: set exactly one"),
        (dict(block_size=-2), r"block_size=-2 must be an int >= 0"),
        (dict(block_num=2.0), r"block_num=2.0 must be an int >= 0"),
        (dict(n_butterfly_factor=0), r"n_butterfly_factor=0 must be a positive int"),
        (dict(block_size=3, n_butterfly_factor=2), r"block_size=3 must be even with n_butterfly_factor=2.*use block_size=2 or 4"),
        (dict(block_num=6, n_butterfly_factor=3), r"block_num=6 must be a multiple of .*=4.*use block_num=4 or 8"),
        (dict(block_num=2, n_butterfly_factor=3), r"block_num=2 must be a multiple of .*=4.*use block_num=4$"),
        (dict(dropout=0.1), r"dropout=0.1 is not supported: peft's boft_dropout .* not implemented.*use dropout=0.0"),
        (dict(dropout=float("nan")), r"dropout=nan must be a finite number"),
    ],
)
def test_bad_config(kwargs, match):
    assert_config_refused(BOFTConfig, kwargs, match)


def test_defaults_resolve_as_peft():
    assert (BOFTConfig().block_size, BOFTConfig().block_num) == (4, 0)  # peft's boft_block_size=4 default
    assert (BOFTConfig(block_num=8).block_size, BOFTConfig(block_num=8).block_num) == (0, 8)


@pytest.mark.parametrize(
    "d_in,kwargs,match,valid",
    [
        (24, dict(block_size=5), r"block_size=5 does not fit d_in=24.*use block_size=4 or 6$", dict(block_size=6)),
        (
            24,
            dict(block_size=4, n_butterfly_factor=3),
            r"block_size=4 does not fit d_in=24.*multiple of 16.*block_size=2 or 6$",
            dict(block_size=6),
        ),
        (24, dict(block_num=5), r"block_num=5 does not fit d_in=24.*use block_num=4 or 6$", dict(block_num=4)),
        (
            24,
            dict(block_num=8, n_butterfly_factor=2),
            r"block_num=8 does not fit d_in=24.*even block size.*block_num=6 or 12$",
            dict(block_num=6),
        ),
        (14, dict(block_size=2, n_butterfly_factor=3), r"d_in=14 has no even block size .* use n_butterfly_factor=1", None),
    ],
)
def test_sizes_that_do_not_fit_d_in(d_in, kwargs, match, valid):
    W, _ = make_layer(D_OUT, d_in)
    with pytest.raises(ValueError, match=match):
        boft.init(0, W, BOFTConfig(**kwargs))
    if valid is not None:  # the suggestion works
        boft.init(0, W, BOFTConfig(**{**kwargs, **valid}))


def test_params_from_another_width_are_refused():
    p = boft.init(0, make_layer(D_OUT, 24)[0], BOFTConfig(block_size=4))
    W, b = make_layer(D_OUT, D_IN)
    with pytest.raises(ValueError, match=r"R of shape \(1, 6, 4, 4\) is not a BOFT layout for d_in=32.*from this W"):
        boft.apply(p, W, torch.randn(2, D_IN), b)
    with pytest.raises(ValueError, match=r"R of shape \(1, 6, 4, 4\) is not a BOFT layout for d_in=32"):
        boft.shapes({k: tuple(v.shape) for k, v in p.items()}, D_OUT, D_IN)
    bad = {"R": torch.zeros(2, 8, 3, 3), "s": torch.ones(D_OUT)}  # 2 factors on odd blocks
    with pytest.raises(ValueError, match=r"2 butterfly factors, which need an even block_size"):
        boft.apply(bad, make_layer(D_OUT, 24)[0], torch.randn(2, 24))


# ---------------------------------------------------------------- leaves and identity


@pytest.mark.parametrize("cfg", PARITY, ids=str)
def test_leaves_and_exact_identity_at_init(cfg):
    W, b = make_layer(D_OUT, D_IN)
    p = boft.init(0, W, cfg)
    m = cfg.n_butterfly_factor
    D = cfg.block_num or D_IN // cfg.block_size
    assert {k: tuple(v.shape) for k, v in p.items()} == {"R": (m, D, D_IN // D, D_IN // D), "s": (D_OUT,)}
    assert torch.equal(p["R"], torch.zeros_like(p["R"])) and torch.equal(p["s"], torch.ones(D_OUT))
    assert all(v.requires_grad for v in p.values()) and not boft.random_init(cfg)
    x = torch.randn(3, 4, D_IN)
    for dtype in (torch.float32, torch.bfloat16):  # bit for bit: Q − I and s − 1 are exactly 0
        pd = {k: v.detach().to(dtype) for k, v in p.items()}
        Wd, bd, xd = W.to(dtype), b.to(dtype), x.to(dtype)
        assert torch.equal(boft.apply(pd, Wd, xd, bd), torch.nn.functional.linear(xd, Wd, bd))
        assert torch.equal(boft.apply(pd, Wd, xd), torch.nn.functional.linear(xd, Wd))


# ---------------------------------------------------------------- peft parity


def _perturbed_peft_layer(cfg, W, b, seed):
    layer = peft_linear(W, b, peft.BOFTConfig, **_peft_kwargs(cfg))
    R, s = layer.boft_R["default"], layer.boft_s["default"]
    assert R.shape[0] == cfg.n_butterfly_factor  # peft really built every factor
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the identity init; R is not skew: only its skew part acts
        R.copy_(0.3 * torch.randn(R.shape, generator=g))
        s.copy_(1.0 + 0.2 * torch.randn(s.shape, generator=g))
    return layer, {"R": R.detach().clone().requires_grad_(True), "s": s.detach().reshape(-1).clone().requires_grad_(True)}


@pytest.mark.usefixtures("_multi_factor")
@pytest.mark.parametrize("cfg", PARITY, ids=str)
def test_peft_parity_outputs_and_grads(cfg):
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer, p = _perturbed_peft_layer(cfg, W, b, seed=4)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    leaves = [("R", p["R"], layer.boft_R["default"]), ("s", p["s"], layer.boft_s["default"])]
    y_ref, _ = assert_matches_reference(
        layer, lambda h: boft.apply(p, W, h, b), x, leaves, cotangent=6, to_ours=lambda name, g: g.reshape(p[name].shape)
    )  # peft's boft_s is (d_out, 1)
    assert rel_err(y_ref, torch.nn.functional.linear(x, W, b)) > 1e-2  # really not the identity


@pytest.mark.parametrize("cfg", [BOFTConfig(block_size=4), BOFTConfig(block_num=2)], ids=str)
def test_peft_parity_on_its_pure_torch_path(cfg):
    """One factor: peft's own CPU fallback (torch.block_diag), no stand-in for its CUDA extension."""
    W, b = make_layer(D_OUT, D_IN, seed=1)
    layer, p = _perturbed_peft_layer(cfg, W, b, seed=2)
    assert not layer.fbd_cuda_available
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(3))
    leaves = [("R", p["R"], layer.boft_R["default"]), ("s", p["s"], layer.boft_s["default"])]
    assert_matches_reference(
        layer, lambda h: boft.apply(p, W, h, b), x, leaves, cotangent=4, to_ours=lambda n, g: g.reshape(p[n].shape)
    )


@pytest.mark.usefixtures("_multi_factor")
@pytest.mark.parametrize("cfg", PARITY, ids=str)
def test_butterfly_matrix_and_merge_match_peft(cfg):
    """With W = I, s = 1 and no bias the layer is x ↦ x M: its rows are peft's butterfly_oft_mat (get_delta_weight);
    and lf's generic merge equals peft's merge (W Mᵀ, rows scaled by s)."""
    W, b = make_layer(D_OUT, D_IN, seed=7)
    layer, p = _perturbed_peft_layer(cfg, W, b, seed=8)
    with torch.no_grad():
        M_peft, _ = layer.get_delta_weight("default")
        eye = torch.eye(D_IN)
        M = boft.apply({"R": p["R"], "s": torch.ones(D_IN)}, eye, eye)
        assert rel_err(M, M_peft) <= 1e-5
        Wm, bm = variants.dense_weights(variants.get("boft"), p, W, b)
        layer.merge()
        assert bm is not None and torch.equal(bm, b)  # the bias is not scaled
        assert rel_err(Wm, layer.base_layer.weight) <= 1e-5


# ---------------------------------------------------------------- float64 reference (the paper's definition, not peft)


def _butterfly_perm(d_in, H, i):
    """Factor i's permutation as a list (P v = v[perm]): each group of 2^i·H features, cut into 2^(i+1) chunks of
    H/2, is read even chunks first, then odd ones; factor 0 leaves the order alone (plain block-diagonal OFT)."""
    if i == 0:
        return list(range(d_in))
    group, half = 2**i * H, H // 2
    perm = []
    for start in range(0, d_in, group):
        chunks = [list(range(start + c * half, start + (c + 1) * half)) for c in range(group // half)]
        for c in list(range(0, len(chunks), 2)) + list(range(1, len(chunks), 2)):
            perm += chunks[c]
    return perm


def _dense_rotation(R):
    """M_{m−1} ⋯ M_0 with M_i = P_i blockdiag(Q_{i,k}) P_iᵀ, Q = (I − S)(I + S)⁻¹, S = ½(R − Rᵀ), as dense matrices."""
    m, D, H, _ = R.shape
    d_in, eye = D * H, torch.eye(H, dtype=R.dtype)
    total = torch.eye(d_in, dtype=R.dtype)
    for i in range(m):
        Qs = []
        for k in range(D):
            S = 0.5 * (R[i, k] - R[i, k].T)
            Qs.append((eye - S) @ torch.linalg.inv(eye + S))
        P = torch.zeros(d_in, d_in, dtype=R.dtype)
        for row, col in enumerate(_butterfly_perm(d_in, H, i)):
            P[row, col] = 1.0
        total = (P @ torch.block_diag(*Qs) @ P.T) @ total
    return total


@pytest.mark.parametrize("cfg", PARITY, ids=str)
def test_float64_reference(cfg):
    """y = (x M Wᵀ) ⊙ s + b with M = M_{m−1} ⋯ M_0 (x rotated, then the layer, then the output scale)."""
    W, b = (t.double() for t in make_layer(D_OUT, D_IN, seed=2))
    p = boft.init(0, W, cfg)
    g = torch.Generator().manual_seed(9)
    p = {k: v.detach() + 0.4 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p.items()}
    x = torch.randn(4, 3, D_IN, generator=g, dtype=torch.float64)
    M = _dense_rotation(p["R"])
    assert rel_err(boft.apply(p, W, x, b), (x @ M @ W.T) * p["s"] + b) <= 1e-12
    assert rel_err(boft.apply(p, W, x), (x @ M @ W.T) * p["s"]) <= 1e-12
    assert rel_err(M.T @ M, torch.eye(D_IN, dtype=torch.float64)) <= 1e-12  # orthogonal
    if cfg.n_butterfly_factor > 1:  # the order of the factors matters, and we would notice
        flipped = _dense_rotation(p["R"].flip(0))
        assert rel_err(boft.apply(p, W, x, b), (x @ flipped @ W.T) * p["s"] + b) > 1e-2


def test_enough_butterfly_factors_give_a_dense_rotation():
    """The paper's point (§4): log2(D) + 1 factors of 2×2 blocks connect every input to every output; one factor
    is block-diagonal."""
    d_in = 16
    eye = torch.eye(d_in, dtype=torch.float64)
    for m, dense in ((1, False), (3, False), (4, True)):
        R = torch.randn(m, d_in // 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
        M = boft.apply({"R": R, "s": torch.ones(d_in, dtype=torch.float64)}, eye, eye)
        assert bool((M.abs() > 1e-12).all()) == dense, m
        assert rel_err(M.T @ M, eye) <= 1e-12


def test_apply_never_builds_a_d_in_square_matrix():
    d_in = 64
    W, b = make_layer(16, d_in)
    p = boft.init(0, W, BOFTConfig(block_size=4, n_butterfly_factor=3))
    p = {"R": torch.randn(p["R"].shape), "s": p["s"].detach()}
    with NewTensorSizes() as rec:
        boft.apply(p, W, torch.randn(3, d_in), b)
    assert max(rec.numels) < d_in * d_in // 2, max(rec.numels)  # largest: W·x products and the blocks (3·16·4·4)


# ---------------------------------------------------------------- stacking


def test_vmap_equals_loop_with_three_factors():
    W, b = make_layer(D_OUT, D_IN)
    cfg = BOFTConfig(block_size=2, n_butterfly_factor=3)
    ps = [{k: v.detach() + 0.3 * torch.randn(v.shape) for k, v in boft.init(0, W, cfg).items()} for _ in range(3)]
    stacked = {k: torch.stack([p[k] for p in ps]) for k in ps[0]}
    xs = torch.randn(3, 4, D_IN)
    got = vmap(boft.apply, in_dims=(0, None, 0, None))(stacked, W, xs, b)
    assert rel_err(got, torch.stack([boft.apply(p, W, x, b) for p, x in zip(ps, xs)])) <= 1e-6


def _tiny_params(cfg, targets, seed):
    base = tiny("llama")
    return base, moved(lf.init(seed, base, cfg, targets=targets), seed)


def test_pad_fills_missing_layers_with_the_identity_and_refuses_other_layouts():
    base, a = _tiny_params(BOFTConfig(block_size=4, n_butterfly_factor=2), r"(q_proj|o_proj)$", 0)
    _, c = _tiny_params(BOFTConfig(block_size=4, n_butterfly_factor=2), r"q_proj$", 1)
    filled = lf.unstack(lf.stack([a, c], pad=True))[1]["model.layers.0.self_attn.o_proj"]["boft"]
    assert not filled["R"].any() and torch.equal(filled["s"], torch.ones_like(filled["s"]))
    stacked = lf.stack([a, c], pad=True)
    with torch.no_grad():
        both = vmap(lambda p: logits(lf.call(base, p, IDS)))(stacked)
        for k, p in enumerate((a, c)):
            assert rel_err(both[k], logits(lf.call(base, p, IDS))) <= 1e-6
    _, other = _tiny_params(BOFTConfig(block_num=4), r"q_proj$", 2)
    with pytest.raises(ValueError, match=r"cannot pad boft at .*q_proj.*different block layouts.*\(2, 8, 4, 4\).*\(1, 4, 8, 8\)"):
        lf.stack([a, other], pad=True)


# ---------------------------------------------------------------- peft files, both ways


def _peft_out(base, path):
    return out(from_pretrained(base, path), IDS)


LOAD = {
    "block_size": dict(boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "block_num": dict(boft_block_size=0, boft_block_num=4, target_modules=["k_proj", "up_proj", "down_proj"]),
    "butterfly-2": dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"]),
    "butterfly-3-block_num": dict(
        boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3, target_modules=["o_proj", "gate_proj"]
    ),
    "dropout-ignored": dict(boft_block_size=2, boft_dropout=0.2, target_modules=["v_proj"]),
}


@pytest.mark.usefixtures("_multi_factor")
@pytest.mark.parametrize("case", list(LOAD))
def test_load_reproduces_peft_from_pretrained(case, tmp_path):
    base = tiny("llama")
    moved_peft(base, peft.BOFTConfig(**LOAD[case])).save_pretrained(tmp_path / "a")
    params = lf.load_peft(tmp_path / "a", model=base)
    assert {n for bv in params.values() for n in bv} == {"boft"}
    got, want = lite_out(base, params), _peft_out(base, tmp_path / "a")
    assert rel_err(got, want) <= 1e-5 and rel_err(want, out(base, IDS)) > 1e-3
    for bv in params.values():
        assert all(v.requires_grad for v in bv["boft"].values())


def test_load_a_one_factor_file_peft_wrote_without_its_extension(tmp_path):
    """peft's CPU fallback trains one factor whatever boft_n_butterfly_factor says: the file holds boft_R of (1, …)
    under a config saying 2; lite_fn loads the one factor, as peft (on that path) computes."""
    base = tiny("llama")
    moved_peft(base, peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "a"
    )
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    params = lf.load_peft(tmp_path / "a", model=base)
    assert params["model.layers.0.self_attn.q_proj"]["boft"]["R"].shape == (1, 8, 4, 4)
    assert rel_err(lite_out(base, params), _peft_out(base, tmp_path / "a")) <= 1e-5


SAVE = {
    "block_size": [(BOFTConfig(block_size=4), r"(q_proj|down_proj)$")],  # one H, block counts 8 and 16
    "block_num": [(BOFTConfig(block_num=4), r"(q_proj|down_proj)$")],  # one D, block sizes 8 and 16
    "butterfly-2": [(BOFTConfig(block_size=2, n_butterfly_factor=2), r"(k_proj|up_proj)$")],
    "butterfly-3": [(BOFTConfig(block_num=8, n_butterfly_factor=3), r"(o_proj|down_proj)$")],
}


@pytest.mark.usefixtures("_multi_factor")
@pytest.mark.parametrize("case", list(SAVE))
def test_save_loads_in_peft_and_reproduces_call(case, tmp_path):
    base = tiny("llama")
    params = {}
    for i, (cfg, targets) in enumerate(SAVE[case]):
        params.update(lf.init(i, base, cfg, targets=targets))
    params = moved(params, 3, 0.2)
    lf.save_peft(tmp_path / "out", params, model=base)
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    cfg = SAVE[case][0][0]
    assert written["peft_type"] == "BOFT" and written["boft_n_butterfly_factor"] == cfg.n_butterfly_factor
    assert (written["boft_block_size"], written["boft_block_num"]) == (cfg.block_size, cfg.block_num)
    mine = lite_out(base, params)
    assert rel_err(_peft_out(base, tmp_path / "out"), mine) <= 1e-5 and rel_err(mine, out(base, IDS)) > 1e-3
    back = lf.load_peft(tmp_path / "out", model=base)
    assert rel_err(lite_out(base, back), mine) <= 1e-6


def test_save_refusals_name_what_peft_cannot_hold(tmp_path):
    base = tiny("llama")
    mixed = {
        **lf.init(0, base, BOFTConfig(block_size=4), targets=r"q_proj$"),  # d_in 32: 8 blocks of 4
        **lf.init(0, base, BOFTConfig(block_num=4), targets=r"down_proj$"),  # d_in 64: 4 blocks of 16
    }
    with pytest.raises(ValueError, match=r"one boft_block_size or one boft_block_num.*block sizes 4 .*16 .*block counts 8 .*4 "):
        lf.save_peft(tmp_path / "a", mixed, model=base)
    factors = {
        **lf.init(0, base, BOFTConfig(block_size=4), targets=r"q_proj$"),
        **lf.init(0, base, BOFTConfig(block_size=4, n_butterfly_factor=2), targets=r"v_proj$"),
    }
    with pytest.raises(ValueError, match=r"one boft_n_butterfly_factor per adapter.*1 \(e\.g\..*2 \(e\.g\."):
        lf.save_peft(tmp_path / "b", factors, model=base)
    gpt2 = tiny("gpt2")
    with pytest.raises(ValueError, match=r"peft's BOFT adapts torch.nn.Linear and Conv2d only.*Conv1D"):
        lf.save_peft(tmp_path / "c", lf.init(0, gpt2, BOFTConfig(block_size=4), targets=r"c_attn$"), model=gpt2)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(boft_block_size=3), r"boft_block_size=3.*block_size=3 does not fit d_in=32.*use block_size=2 or 4"),
        (dict(boft_block_size=4, boft_block_num=8), r"boft_block_size=4, boft_block_num=8.*set exactly one"),
        (dict(boft_n_butterfly_factor=0), r"boft_n_butterfly_factor=0; expected a positive int"),
        (dict(boft_block_size=8), r"boft_R has shape \(1, 8, 4, 4\), but .* gives \(1, 4, 8, 8\)"),
    ],
)
def test_load_refuses_configs_naming_the_field(fields, match, tmp_path):
    base = tiny("llama")
    moved_peft(base, peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **fields}))
    with pytest.raises(ValueError, match=match):
        lf.load_peft(tmp_path / "a", model=base)


def test_peft_parity_on_a_4bit_base(tmp_path):
    """The installed peft adapts bitsandbytes layers with BOFT too (its generic quantization backends): the same
    adapter on the same nf4 base, peft's BOFT layer vs lf.load_peft + lf.call (the rotated x through the 4-bit kernel).
    Both models fresh and in train mode, as in test_quantized's QLoRA parity (no CPU repacking, no deepcopy)."""
    pytest.importorskip("bitsandbytes")
    from test_quantized import quantized, tokens

    x = tokens()
    pm = peft.get_peft_model(
        quantized("nf4", train=True), peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "down_proj"])
    )
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__module__ == peft_boft.__name__
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, t in pm.named_parameters():
            if t.requires_grad:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    pm.save_pretrained(tmp_path / "a")
    base = quantized("nf4", train=True)
    params = lf.load_peft(tmp_path / "a", model=base)
    with torch.no_grad():
        want, got, plain = pm(x).logits, lf.call(base, params, x).logits, base(x).logits
    assert rel_err(got, want) <= 1e-5 and rel_err(want, plain) > 1e-3
