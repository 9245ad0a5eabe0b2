"""PiSSA: init and forward parity with peft's init_lora_weights="pissa"/"pissa_niter_K", the S/s division, config errors."""

import peft
import pytest
import torch
from helpers import assert_config_refused, assert_matches_reference, make_layer, peft_linear, rel_err

import lite_fn as lf
from lite_fn.variants import pissa

D_OUT, D_IN = 20, 12


def _peft_layer(cfg, W, b, init="pissa"):
    """peft's PiSSA on an nn.Linear holding copies of W and b (peft overwrites that weight with the residual)."""
    return peft_linear(
        W, b, peft.LoraConfig, r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora, init_lora_weights=init, lora_dropout=0.0
    )


def _peft_AB(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _peft_and_ours(cfg):
    """W, b (seed 3), peft's PiSSA layer for them and our init, both for cfg."""
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(cfg, W, b)
    return W, b, layer, pissa.init(0, W, cfg)


def _svd_signs(p, A_ref):
    """Per component, ±1 from peft's A to ours: SVD fixes each pair (u_i, v_i) only up to ±."""
    return torch.sign((p["A"] * A_ref).sum(1)).detach()


def _gapped(seed=0, top=(8.0, 6.0, 5.0, 4.0)):
    """W = U diag(S) Vᵀ with a clear gap after the top len(top) singular values."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D_OUT, D_IN, generator=g)).Q
    V = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g)).Q
    S = torch.cat([torch.tensor(top), 0.3 * torch.rand(D_IN - len(top), generator=g)])
    return (U * S) @ V.T


CFGS = [lf.PiSSAConfig(r=4, alpha=8), lf.PiSSAConfig(r=4, alpha=6), lf.PiSSAConfig(r=5, alpha=3, use_rslora=True)]


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_init_matches_peft_up_to_svd_signs(cfg):
    W, _, layer, p = _peft_and_ours(cfg)
    A_ref, B_ref = _peft_AB(layer)
    assert float(p["scale"]) == pytest.approx(layer.scaling["default"], rel=1e-7)
    assert rel_err(p["B"] @ p["A"], B_ref @ A_ref) <= 1e-5
    sign = _svd_signs(p, A_ref)
    assert rel_err(p["A"] * sign[:, None], A_ref) <= 1e-5
    assert rel_err(p["B"] * sign, B_ref) <= 1e-5
    # peft's residual base weight is our W − s·B₀A₀ (we keep W and subtract the frozen branch)
    assert float((W - p["scale"] * p["B0"] @ p["A0"] - layer.base_layer.weight).norm() / W.norm()) <= 1e-6


def test_leaves_and_identity():
    W, b = make_layer(D_OUT, D_IN, seed=3)
    p = pissa.init(0, W, lf.PiSSAConfig(r=4, alpha=8))
    assert {k: (tuple(v.shape), v.requires_grad) for k, v in p.items()} == {
        "A": ((4, D_IN), True),
        "B": ((D_OUT, 4), True),
        "scale": ((), False),
        "A0": ((4, D_IN), False),
        "B0": ((D_OUT, 4), False),
    }
    assert torch.equal(p["A"], p["A0"]) and torch.equal(p["B"], p["B0"])
    x = torch.randn(5, D_IN)
    assert torch.equal(pissa.apply(p, W, x, b), torch.nn.functional.linear(x, W, b))  # the branches cancel exactly


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_forward_and_grads_match_peft_residual_model(cfg):
    """peft: x W_resᵀ + b + s·xAᵀBᵀ with W_res = W − s·B₀A₀ overwritten; ours keeps W. Same output, same grads."""
    W, b, layer, p = _peft_and_ours(cfg)
    A_ref, B_ref = _peft_AB(layer)
    sign = _svd_signs(p, A_ref)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    for step in range(2):  # at init, then after moving A and B the same way in both
        if step:
            g = torch.Generator().manual_seed(6)
            dA, dB = 0.2 * torch.randn(A_ref.shape, generator=g), 0.2 * torch.randn(B_ref.shape, generator=g)
            with torch.no_grad():
                A_ref.add_(dA)
                B_ref.add_(dB)
            p = {
                **p,
                "A": (p["A"] + sign[:, None] * dA).detach().requires_grad_(True),
                "B": (p["B"] + sign * dB).detach().requires_grad_(True),
            }
        y_ref, _ = assert_matches_reference(
            layer,
            lambda h: pissa.apply(p, W, h, b),
            x,
            [("A", p["A"], A_ref), ("B", p["B"], B_ref)],
            cotangent=7,
            tag=(step,),
            to_ours=lambda name, g: g * (sign[:, None] if name == "A" else sign),
        )
        if step:
            assert rel_err(y_ref, torch.nn.functional.linear(x, W, b)) > 1e-2  # really moved off the identity


@pytest.mark.parametrize("r,alpha,rs", [(4, 4.0, False), (4, 12.0, False), (4, 1.0, False), (3, 7.0, True)])
def test_scale_division_float64(r, alpha, rs):
    """SPEC §3: S' = S_r/s, A = diag(√S')V_rᵀ, B = U_r diag(√S'), so s·BA = U_r S_r V_rᵀ for every alpha."""
    W, _ = make_layer(D_OUT, D_IN, seed=11)
    cfg = lf.PiSSAConfig(r=r, alpha=alpha, use_rslora=rs)
    p = pissa.init(0, W, cfg)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    s = alpha / (r**0.5 if rs else r)
    assert float(p["scale"]) == pytest.approx(s, rel=1e-7)
    # fp32 SVD vs a float64 reference: ~1e-5 from rounding; a missing or wrong 1/s would be an O(1) error
    assert rel_err(s * p["B"].double() @ p["A"].double(), (U[:, :r] * S[:r]) @ Vh[:r]) <= 1e-4
    want = (S[:r] / s).sqrt()  # ‖A_i‖ = ‖B_{:,i}‖ = √(S_i/s)
    assert rel_err(torch.linalg.vector_norm(p["A"].double(), dim=1), want) <= 1e-5
    assert rel_err(torch.linalg.vector_norm(p["B"].double(), dim=0), want) <= 1e-5


def test_randomized_svd_close_to_exact_and_to_peft():
    W, b = _gapped(), torch.zeros(D_OUT)
    cfg, cfg_exact = lf.PiSSAConfig(r=4, alpha=6, niter=4), lf.PiSSAConfig(r=4, alpha=6)
    p, p_exact = pissa.init(3, W, cfg), pissa.init(3, W, cfg_exact)
    assert rel_err(p["B"] @ p["A"], p_exact["B"] @ p_exact["A"]) <= 1e-5
    with torch.random.fork_rng():  # peft draws its sketch from the global RNG
        torch.manual_seed(0)
        layer = _peft_layer(cfg, W, b, init="pissa_niter_4")
    A_ref, B_ref = _peft_AB(layer)
    assert rel_err(p["B"] @ p["A"], B_ref @ A_ref) <= 1e-5
    assert float((W - p["scale"] * p["B0"] @ p["A0"] - layer.base_layer.weight).norm() / W.norm()) <= 1e-6


def test_key_matters_only_for_randomized_svd():
    W = _gapped(seed=1, top=(3.0, 2.5, 2.0, 1.5))
    exact, rnd = lf.PiSSAConfig(r=4, alpha=8), lf.PiSSAConfig(r=4, alpha=8, niter=1)
    assert not pissa.random_init(exact) and pissa.random_init(rnd)
    p0, p1 = pissa.init(0, W, exact), pissa.init(1, W, exact)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    q0, q0b, q1 = pissa.init(0, W, rnd), pissa.init(0, W, rnd), pissa.init(1, W, rnd)
    assert all(torch.equal(q0[k], q0b[k]) for k in q0)
    assert not torch.equal(q0["A"], q1["A"])
    assert rel_err(q0["B"] @ q0["A"], q1["B"] @ q1["A"]) <= 1e-3  # both approximate the same top-r part


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r=0 must be a positive int"),
        (dict(alpha=0), "alpha=0 must be > 0"),
        (dict(alpha=-8.0), "alpha=-8.0 must be > 0"),
        (dict(alpha=float("inf")), "alpha=inf must be a finite number"),
        (dict(niter=-1), "niter=-1 must be None"),
        (dict(niter=2.5), "niter=2.5 must be None"),
        (dict(niter=True), "niter=True must be None"),
    ],
)
def test_bad_config(kwargs, match):
    assert_config_refused(lf.PiSSAConfig, kwargs, match)


def test_bad_key():
    W, _ = make_layer(D_OUT, D_IN)
    with pytest.raises(TypeError, match="not a key"):
        pissa.init(0.5, W, lf.PiSSAConfig(r=4))
