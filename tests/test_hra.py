"""HRA: parity with peft's HRAConfig, reflection order vs a float64 reference, orthogonality, no d×d matrix, errors."""

import peft
import pytest
import torch
from helpers import NewTensorSizes, assert_config_refused, assert_matches_reference, make_layer, peft_linear, rel_err

import lite_fn as lf
from lite_fn.variants import hra

D_OUT, D_IN = 20, 12


def _peft_layer(cfg, W, b):
    return peft_linear(W, b, peft.HRAConfig, r=cfg.r)


def _dense_R(U):
    """R = H_0 H_1 ⋯ H_{r−1}, H_i = I − 2 u_i u_iᵀ/‖u_i‖² (SPEC §3), as a dense matrix."""
    R = torch.eye(U.shape[1], dtype=U.dtype)
    for u in U:
        u = u / u.norm()
        R = R @ (torch.eye(U.shape[1], dtype=U.dtype) - 2.0 * torch.outer(u, u))
    return R


@pytest.mark.parametrize("r", [2, 4, 6])
def test_peft_parity_outputs_and_grads(r):
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(lf.HRAConfig(r=r), W, b)
    u_ref = layer.hra_u["default"]  # peft stores the vectors as columns: (d_in, r)
    with torch.no_grad():
        u_ref.copy_(torch.randn(u_ref.shape, generator=torch.Generator().manual_seed(4)))  # no pairs: R ≠ I
    U = u_ref.detach().T.clone().requires_grad_(True)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    y_ref, _ = assert_matches_reference(
        layer, lambda h: hra.apply({"U": U}, W, h, b), x, [("U", U, u_ref)], cotangent=6, to_ours=lambda name, g: g.T
    )  # peft's columns are our rows
    assert rel_err(y_ref, torch.nn.functional.linear(x, W, b)) > 1e-2  # really not the identity


def test_reflection_order_float64():
    """y = x (W R)ᵀ + b with R = H_0 ⋯ H_{r−1} (peft's W·(H_0⋯H_{r−1})), not the reversed product."""
    g = torch.Generator().manual_seed(0)
    W, b = (t.double() for t in make_layer(D_OUT, D_IN, seed=1))
    U = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    x = torch.randn(7, D_IN, generator=g, dtype=torch.float64)
    y = hra.apply({"U": U}, W, x, b)
    assert rel_err(y, x @ (W @ _dense_R(U)).T + b) <= 1e-12
    assert rel_err(y, x @ (W @ _dense_R(U.flip(0))).T + b) > 1e-2  # the order matters and we would notice


def test_rotation_is_orthogonal_float64():
    """With W = I the layer is x ↦ x Rᵀ: the reconstructed R is orthogonal and equals the dense product."""
    U = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eye = torch.eye(D_IN, dtype=torch.float64)
    Rt = hra.apply({"U": U}, eye, eye)
    assert rel_err(Rt.T @ Rt, eye) <= 1e-12
    assert rel_err(Rt.T, _dense_R(U)) <= 1e-12


def test_apply_never_builds_a_d_in_square_matrix():
    d_in = 64
    W, b = make_layer(16, d_in)
    U = torch.randn(8, d_in)
    x = torch.randn(3, d_in)
    with NewTensorSizes() as rec:
        hra.apply({"U": U}, W, x, b)
    assert max(rec.numels) < d_in * d_in // 4, max(rec.numels)  # largest: U normalised, (8, 64)


def test_init_like_peft_pairs_cancel():
    cfg = lf.HRAConfig(r=6)
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(cfg, W, b)
    u_ref = layer.hra_u["default"].detach().T  # (r, d_in)
    U = hra.init(0, W, cfg)["U"]
    assert U.shape == (6, D_IN) and U.requires_grad
    for V in (U.detach(), u_ref):  # both: r/2 vectors, each repeated in a row
        assert torch.equal(V[0::2], V[1::2])
        assert len({tuple(v.tolist()) for v in V[0::2]}) == 3
    # peft's kaiming_uniform_ sees a (d_in, r/2) tensor, so its fan-in is r/2: U(±1/√(r/2)), not ±1/√d_in
    bound = (cfg.r // 2) ** -0.5
    for V in (U.detach(), u_ref):
        assert V.abs().max() <= bound and V.abs().max() > 0.5 * bound
    x = torch.randn(5, D_IN)
    base = torch.nn.functional.linear(x, W, b)
    with torch.no_grad():
        assert rel_err(hra.apply({"U": U}, W, x, b), base) <= 1e-6
        assert rel_err(layer(x), base) <= 1e-6


@pytest.mark.parametrize("r,hint", [(7, "use r=8 or r=6"), (3, "use r=4 or r=2"), (1, "use r=2")])
def test_odd_rank_is_refused(r, hint):
    assert_config_refused(lf.HRAConfig, dict(r=r), f"r={r} must be even for HRA's identity init.*{hint}")


@pytest.mark.parametrize("r", [0, -2, 2.0, True])
def test_non_positive_int_rank(r):
    assert_config_refused(lf.HRAConfig, dict(r=r), f"r={r!r} must be a positive int")


def test_rank_above_d_in():
    W, _ = make_layer(40, 10)
    with pytest.raises(ValueError, match="r=12 exceeds d_in=10.*r <= 10"):
        hra.init(0, W, lf.HRAConfig(r=12))
    hra.init(0, W, lf.HRAConfig(r=10))  # d_out does not limit r, only d_in does
    W, _ = make_layer(6, 40)
    assert hra.init(0, W, lf.HRAConfig(r=10))["U"].shape == (10, 40)
