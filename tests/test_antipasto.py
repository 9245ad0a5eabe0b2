"""AntiPaSTO (no peft equivalent): float64 reference from SPEC.md §3, Cayley properties, exact alpha=0,
±alpha antisymmetry, data-aware selection, streaming statistic, errors."""

import math

import pytest
import torch
from helpers import assert_config_refused, assert_stat_refuses_bad_batches, make_layer, rel_err
from torch.func import vmap

import lite_fn as lf
from lite_fn import linalg
from lite_fn.variants import antipasto

D_OUT, D_IN = 20, 12
CFGS = [
    lf.AntiPaSTOConfig(r=8, block_size=4),
    lf.AntiPaSTOConfig(r=8, block_size=2, rotate_u=True, rotate_v=False),
    lf.AntiPaSTOConfig(r=12, block_size=3, rotate_u=True, max_angle=1.2),
]
IDS = ["v", "u-bs2", "uv-bs3"]


def calib_stat(cfg, W, n=3, seed=0):
    st = antipasto.stat(cfg, W)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        st.update(torch.randn(4, 8, W.shape[1], generator=g).to(W.dtype))
    return st


def random_params(cfg, W, seed, big=1.0, alpha=1.0):
    """init, then every trainable leaf replaced by N(0, big²) so the tanh clamp is active."""
    p = antipasto.init(0, W, cfg, calib_stat(cfg, W) if cfg.select == "data" else None)
    g = torch.Generator().manual_seed(seed)
    for k, v in list(p.items()):
        if v.requires_grad:
            p[k] = (big * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype).requires_grad_(True)
    p["alpha"] = torch.tensor(alpha, dtype=W.dtype)
    return p


# --------------------------------------------------------------------------- float64 reference
def ref_rotation(p, alpha, max_angle, bs):
    """Dense blockdiag(R_0, …) written from SPEC.md §3 with explicit loops and a matrix inverse."""
    blocks = []
    for pb in p:
        P = torch.zeros(bs, bs, dtype=torch.float64)
        k = 0
        for i in range(bs):
            for j in range(i + 1, bs):
                P[i, j] = pb[k]
                k += 1
        A = 0.5 * (P - P.T)
        a = 2 * math.tan(max_angle / 2)
        A = a * torch.tanh(A / a)
        X = alpha * A / 2
        eye = torch.eye(bs, dtype=torch.float64)
        blocks.append(torch.linalg.inv(eye - X) @ (eye + X))
    return torch.block_diag(*blocks)


def ref_apply(p, W, x, b):
    p = {k: v.double() for k, v in p.items()}
    U, S, V, alpha, theta = p["U"], p["S"], p["V"], float(p["alpha"]), float(p["max_angle"])
    r = S.numel()
    Vr, Ur = V, U
    if "rot_v" in p:
        Vr = V @ ref_rotation(p["rot_v"], alpha, theta, r // p["rot_v"].shape[0])
    if "rot_u" in p:
        Ur = U @ ref_rotation(p["rot_u"], alpha, theta, r // p["rot_u"].shape[0])
    Sr = S + alpha * p["delta_s"]
    x, W, b = x.double(), W.double(), b.double()
    return x @ W.T + b + ((x @ Vr) * Sr) @ Ur.T - ((x @ V) * S) @ U.T


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
@pytest.mark.parametrize("alpha", [1.0, -0.7, 2.3])
def test_apply_equals_float64_reference_from_spec(cfg, alpha):
    W, b = make_layer(D_OUT, D_IN, dtype=torch.float64)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    p = random_params(cfg, W, seed=1, alpha=alpha)
    assert rel_err(antipasto.apply(p, W, x, b), ref_apply(p, W, x, b)) <= 1e-12


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_fp32_outputs_and_gradients_match_float64_reference(cfg):
    W, b = make_layer(D_OUT, D_IN)
    p = random_params(cfg, W, seed=2, big=0.3)
    x = torch.randn(3, 4, D_IN).requires_grad_(True)
    y = antipasto.apply(p, W, x, b)
    p64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in p.items()}
    x64 = x.detach().double().requires_grad_(True)
    y64 = ref_apply(p64, W, x64, b)
    assert rel_err(y, y64) <= 1e-5
    w = torch.randn(y.shape, dtype=torch.float64)
    names = [k for k, v in p.items() if v.requires_grad]
    got = torch.autograd.grad((y * w.float()).sum(), [p[k] for k in names] + [x])
    want = torch.autograd.grad((y64 * w).sum(), [p64[k] for k in names] + [x64])
    for name, a, bb in zip(names + ["x"], got, want):
        assert rel_err(a, bb) <= 1e-4, name


# --------------------------------------------------------------------------- Cayley blocks
def test_cayley_blocks_orthogonal_inverse_under_negation_and_identity_at_zero():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 6, generator=g, dtype=torch.float64) * 3  # 5 blocks of 4×4; clamp active
    th = torch.tensor(1.0, dtype=torch.float64)
    for a in (0.3, 1.0, -2.5):
        R = antipasto.rotation(p, torch.tensor(a, dtype=torch.float64), th, 4)
        eye = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
        assert (R.transpose(-1, -2) @ R - eye).abs().max() <= 1e-12
        R_neg = antipasto.rotation(p, torch.tensor(-a, dtype=torch.float64), th, 4)
        assert (R_neg @ R - eye).abs().max() <= 1e-12  # R(−α) = R(α)⁻¹
        assert (torch.linalg.det(R) - 1).abs().max() <= 1e-12  # proper rotations
    R0 = antipasto.rotation(p.float(), torch.tensor(0.0), torch.tensor(1.0), 4)
    assert torch.equal(R0, torch.eye(4).expand(5, 4, 4))


def test_max_angle_bounds_each_plane_rotation():
    """bs=2: one plane per block; Cayley angle 2·atan(t/2) with |t| < a = 2·tan(θmax/2) at α=1."""
    p = torch.tensor([[50.0], [-50.0], [0.6], [1e4]], dtype=torch.float64)
    R = antipasto.rotation(p, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64), 2)
    angles = torch.atan2(R[:, 1, 0], R[:, 0, 0]).abs()
    assert (angles <= 0.4 + 1e-12).all() and (angles[[0, 1, 3]] >= 0.4 - 1e-9).all()  # saturates at θmax
    a = 2 * math.tan(0.2)
    assert angles[2] == pytest.approx(2 * math.atan(a * math.tanh(0.3 / a) / 2), rel=1e-12)  # A = ½(P − Pᵀ) = 0.3


def test_block_rotation_on_projection_equals_dense_block_diagonal():
    g = torch.Generator().manual_seed(3)
    R = antipasto.rotation(
        torch.randn(3, 6, generator=g, dtype=torch.float64),
        torch.tensor(0.8, dtype=torch.float64),
        torch.tensor(1.0, dtype=torch.float64),
        4,
    )
    h = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    assert rel_err(linalg.block_rotate(h, R), h @ torch.block_diag(*R)) <= 1e-14


# --------------------------------------------------------------------------- alpha = 0 and ±alpha
@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_alpha_zero_is_bit_exact_base_for_random_params(cfg, dtype):
    W, b = make_layer(D_OUT, D_IN, dtype=dtype)
    x = torch.randn(3, 5, D_IN).to(dtype)
    base = torch.nn.functional.linear(x, W, b)
    for seed in range(4):
        p = random_params(cfg, W, seed=seed, big=[1e-3, 1.0, 30.0, 1e3][seed], alpha=0.0)
        assert torch.equal(antipasto.apply(p, W, x, b), base)
    # and inside a vmapped alpha sweep
    alphas = torch.tensor([-1.0, 0.0, 0.5], dtype=dtype)
    ys = vmap(lambda a: antipasto.apply({**p, "alpha": a}, W, x, b))(alphas)
    assert torch.equal(ys[1], base)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_plus_and_minus_alpha_move_output_in_opposite_directions(cfg):
    W, b = make_layer(D_OUT, D_IN, dtype=torch.float64)
    x = torch.randn(4, D_IN, dtype=torch.float64)
    p = random_params(cfg, W, seed=5, big=0.5)
    y0 = torch.nn.functional.linear(x, W, b)

    def move(a):
        return antipasto.apply({**p, "alpha": torch.tensor(a, dtype=torch.float64)}, W, x, b) - y0

    for a in (1e-2, 1e-3):
        d_plus, d_minus = move(a), move(-a)
        # y(α) − y0 = α·J + O(α²): the even part is second order
        assert (d_plus + d_minus).norm() <= 10 * a * d_plus.norm()
        assert torch.nn.functional.cosine_similarity(d_plus.flatten(), d_minus.flatten(), dim=0) < -0.99
    assert move(1e-3).norm() > 1e-5  # and the adapter does move the output


# --------------------------------------------------------------------------- selection
def known_svd_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)).Q
    S = torch.linspace(12.0, 1.0, D_IN, dtype=torch.float64)
    return U, S, V, ((U * S) @ V.T).float()


def test_data_selection_picks_best_scores_in_index_order():
    U, S, V, W = known_svd_layer()
    # calibration rows c_i·v_i: mean|x·v_j| = c_j / D_IN, so score_j ∝ S_j·c_j
    c = torch.ones(D_IN, dtype=torch.float64)
    want = [1, 4, 7, 10]
    c[want] = 100.0
    cfg = lf.AntiPaSTOConfig(r=4, block_size=2, select="data")
    st = antipasto.stat(cfg, W)
    X = (c[:, None] * V.T).float()
    st.update(X[:5])
    st.update(X[5:].reshape(1, -1, D_IN))
    p = antipasto.init(0, W, cfg, st)
    assert torch.allclose(p["S"].double(), S[want], rtol=1e-5)
    assert (torch.nn.functional.cosine_similarity(p["V"].double(), V[:, want], dim=0).abs() >= 1 - 1e-6).all()
    assert (torch.nn.functional.cosine_similarity(p["U"].double(), U[:, want], dim=0).abs() >= 1 - 1e-6).all()
    top = antipasto.init(0, W, lf.AntiPaSTOConfig(r=4, block_size=2), None)
    assert torch.allclose(top["S"].double(), S[:4], rtol=1e-5)


def test_data_scores_equal_direct_float64_computation():
    W, _ = make_layer(D_OUT, D_IN)
    cfg = lf.AntiPaSTOConfig(r=8, block_size=4, select="data")
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(n, D_IN, generator=g) * torch.linspace(3, 0.1, D_IN) for n in (7, 30, 1)]
    st = antipasto.stat(cfg, W)
    for x in xs:
        st.update(x)
    _, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    score = S * (torch.cat(xs).double() @ Vh.T).abs().mean(0)
    want = torch.topk(score, 8).indices.sort().values
    p = antipasto.init(0, W, cfg, st)
    assert torch.allclose(p["S"].double(), S[want], rtol=1e-5)
    assert st.tokens == 38


# --------------------------------------------------------------------------- statistic
def test_stat_memory_does_not_grow_with_tokens_and_top_needs_none():
    W, _ = make_layer(D_OUT, D_IN)
    cfg = lf.AntiPaSTOConfig(r=8, block_size=4, select="data")
    one, many = calib_stat(cfg, W, n=1), calib_stat(cfg, W, n=20)
    assert many.tokens == 20 * one.tokens
    assert one.nbytes == many.nbytes == antipasto.stat(cfg, W).nbytes > 0
    assert one.share_key is None and one.converged is False  # depends on W; no early stop
    assert antipasto.stat(lf.AntiPaSTOConfig(r=8, block_size=4), W) is None  # select="top": no data


def test_stat_update_errors():
    W, _ = make_layer(D_OUT, D_IN)
    st = antipasto.stat(lf.AntiPaSTOConfig(r=8, block_size=4, select="data"), W)
    wide, bad = torch.randn(3, D_IN + 2), torch.randn(3, D_IN)
    bad[0, 0] = float("nan")
    assert_stat_refuses_bad_batches(st, D_IN, wide, bad)


# --------------------------------------------------------------------------- leaves and init
def test_leaves_shapes_trainability_and_init_distribution():
    W, _ = make_layer(D_OUT, D_IN)
    cfg = lf.AntiPaSTOConfig(r=8, block_size=4, rotate_u=True)
    p = antipasto.init(3, W, cfg)
    shapes = {k: (tuple(v.shape), v.requires_grad) for k, v in p.items()}
    assert shapes == {
        "U": ((D_OUT, 8), False),
        "S": ((8,), False),
        "V": ((D_IN, 8), False),
        "delta_s": ((8,), True),
        "rot_v": ((2, 6), True),
        "rot_u": ((2, 6), True),
        "alpha": ((), False),
        "max_angle": ((), False),
    }
    assert float(p["alpha"]) == 1.0 and float(p["max_angle"]) == 0.5
    many = [antipasto.init(key, W, cfg) for key in range(40)]  # 320 delta_s draws, 480 per rotation leaf
    ds = torch.cat([q["delta_s"].detach() for q in many])
    assert ds.min() >= 4e-4 - 8e-4 - 1e-9 and ds.max() <= 4e-4 + 8e-4 + 1e-9 and abs(ds.mean().item() - 4e-4) < 1e-4
    assert 2.5e-4 < ds.std() < 4e-4  # N(0,1) truncated at ±2σ has std 0.88σ
    for k in ("rot_v", "rot_u"):
        rot = torch.cat([q[k].detach().flatten() for q in many])
        assert rot.abs().max() <= 2e-4 + 1e-9 and 0.6e-4 < rot.std() < 1e-4 and abs(rot.mean()) < 2e-5
    # one key per leaf: switching rotate_u off changes nothing else
    q = antipasto.init(3, W, lf.AntiPaSTOConfig(r=8, block_size=4))
    assert all(torch.equal(p[k], q[k]) for k in q)
    # the chosen subspace reproduces W's top-r part
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert rel_err((p["U"] * p["S"]) @ p["V"].T, (U[:, :8] * S[:8]) @ Vh[:8]) <= 1e-5


# --------------------------------------------------------------------------- errors
def test_init_errors_name_the_fix():
    W, _ = make_layer(D_OUT, D_IN)
    cfg = lf.AntiPaSTOConfig(r=8, block_size=4, select="data")
    with pytest.raises(ValueError, match=r"pass calibration data to lf.init / build one with antipasto.stat\(cfg, W\)"):
        antipasto.init(0, W, cfg, None)
    st = antipasto.stat(cfg, W)
    st.update(torch.randn(5, D_IN))
    with pytest.raises(ValueError, match="calibration saw 5 tokens, fewer than r=8; give more calibration data"):
        antipasto.init(0, W, cfg, st)
    other = calib_stat(cfg, make_layer(D_OUT, D_IN + 4)[0])
    with pytest.raises(ValueError, match=f"d_in={D_IN + 4}"):
        antipasto.init(0, W, cfg, other)
    with pytest.raises(TypeError, match="not an AntiPaSTO"):
        antipasto.init(0, W, cfg, object())


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(r=10, block_size=4), r"r=10 is not a multiple of block_size=4; use r=8 or r=12"),
        (dict(r=2, block_size=4), r"r=2 is not a multiple of block_size=4; use r=4"),
        (dict(r=8, block_size=1), r"block_size=1 must be an int >= 2"),
        (dict(r=8, block_size=4, max_angle=0.0), r"max_angle=0.0 must be in \(0, π\)"),
        (dict(r=8, block_size=4, max_angle=3.2), r"max_angle=3.2 must be in \(0, π\)"),
        (dict(r=8, block_size=4, max_angle=float("nan")), r"max_angle=nan must be a finite number"),
        (dict(r=8, block_size=4, select="random"), r"select='random' is not one of \['data', 'top'\]"),
        (dict(r=8, block_size=4, rotate_v=False, rotate_u=False), r"nothing to rotate; set rotate_v=True"),
        (dict(r=8, block_size=4, alpha=float("inf")), r"alpha=inf must be a finite number"),
        (dict(r=0, block_size=4), r"r=0 must be a positive int"),
    ],
)
def test_bad_config_values(kw, msg):
    assert_config_refused(lf.AntiPaSTOConfig, kw, msg)
