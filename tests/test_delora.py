"""DeLoRA: parity with peft's DeloraConfig, a float64 reference from SPEC.md, gradients through the norms, config errors."""

import peft
import pytest
import torch
from helpers import assert_config_refused, assert_matches_reference, make_layer, peft_linear, rel_err

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import delora

D_OUT, D_IN = 20, 12


def _peft_layer(cfg, W, b):
    return peft_linear(W, b, peft.DeloraConfig, r=cfg.r, delora_lambda=cfg.lam)


def _randomised(layer, seed, zero_b_col=False):
    """Non-trivial A, B, λ in peft's layer (optionally one B column exactly 0, to hit the 1e-4 clamp)."""
    g = torch.Generator().manual_seed(seed)
    A, B, lam = layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]
    with torch.no_grad():
        A.copy_(torch.randn(A.shape, generator=g) * 0.3)
        B.copy_(torch.randn(B.shape, generator=g) * 0.3)
        if zero_b_col:
            B[:, 1] = 0.0
        lam.copy_(torch.tensor([3.7]))
    return A, B, lam


def _ours_from(A, B, lam, wnorm):
    return {
        "A": A.detach().clone().requires_grad_(True),
        "B": B.detach().clone().requires_grad_(True),
        "lam": lam.detach().reshape(()).clone().requires_grad_(True),
        "wnorm": wnorm.detach().clone(),
    }


def _dense_reference(p, W, b, x):
    """SPEC §3 in float64: ΔW = B diag(λ/r / (max(‖A_i‖,1e-4)·max(‖B_:,i‖,1e-4))) A diag(w)."""
    A, B, lam, w = (p[k].detach().double() for k in ("A", "B", "lam", "wnorm"))
    r = A.shape[0]
    d = lam / r / (A.norm(dim=1).clamp_min(1e-4) * B.norm(dim=0).clamp_min(1e-4))
    dW = (B * d) @ A * w
    return x.double() @ (W.double() + dW).T + b.double(), dW


@pytest.mark.parametrize("zero_b_col", [False, True], ids=["generic", "clamped"])
def test_peft_parity_outputs_and_grads(zero_b_col):
    cfg = lf.DeLoRAConfig(r=4, lam=15.0)
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(cfg, W, b)
    A, B, lam = _randomised(layer, seed=4, zero_b_col=zero_b_col)
    p = _ours_from(A, B, lam, layer.delora_w_norm["default"])
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    leaves = [("A", p["A"], A), ("B", p["B"], B), ("lam", p["lam"], lam)]
    _, y_our = assert_matches_reference(
        layer, lambda h: delora.apply(p, W, h, b), x, leaves, cotangent=6, to_ours=lambda name, g: g.reshape(p[name].shape)
    )  # peft's λ is (1,), ours ()
    assert rel_err(y_our, _dense_reference(p, W, b, x)[0]) <= 1e-5


def test_init_matches_peft():
    cfg = lf.DeLoRAConfig(r=4)
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(cfg, W, b)
    p = delora.init(0, W, cfg)
    assert {k: (tuple(v.shape), v.requires_grad) for k, v in p.items()} == {
        "A": ((4, D_IN), True),
        "B": ((D_OUT, 4), True),
        "lam": ((), True),
        "wnorm": ((D_IN,), False),
    }
    assert float(p["lam"].detach()) == float(layer.delora_lambda["default"].detach()) == 15.0
    assert rel_err(p["wnorm"], layer.delora_w_norm["default"]) <= 1e-6
    assert rel_err(p["wnorm"].double(), torch.linalg.vector_norm(W.double(), dim=0)) <= 1e-6
    assert torch.equal(p["B"], torch.zeros(D_OUT, 4)) and torch.equal(layer.delora_B["default"], torch.zeros(D_OUT, 4))
    bound = D_IN**-0.5  # kaiming-uniform(a=√5) on (r, d_in), as peft's A
    assert p["A"].abs().max() <= bound and layer.delora_A["default"].abs().max() <= bound
    x = torch.randn(7, D_IN)
    assert torch.equal(delora.apply(p, W, x, b), torch.nn.functional.linear(x, W, b))


def test_update_is_scale_invariant_and_bounded():
    """Rescaling A_i or B_{:,i} by c > 0 leaves the output unchanged; ‖ΔW‖_F ≤ |λ|·max w (the 'decoupled' bound)."""
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(lf.DeLoRAConfig(r=4), W, b)
    p = _ours_from(*_randomised(layer, seed=4), layer.delora_w_norm["default"])
    x = torch.randn(6, D_IN)
    c = torch.tensor([0.5, 2.0, 7.0, 0.1])
    q = {**p, "A": p["A"] * c[:, None], "B": p["B"] / c.flip(0)}
    assert rel_err(delora.apply(q, W, x, b), delora.apply(p, W, x, b)) <= 1e-6
    dW = variants.dense_weights(delora, p, W)[0] - W
    assert rel_err(dW.double(), _dense_reference(p, W, b, x)[1]) <= 1e-5
    assert float(dW.detach().norm()) <= abs(float(p["lam"].detach())) * float(p["wnorm"].max())


def test_gradients_flow_through_the_norms():
    """Scale invariance ⇒ ⟨∂L/∂A_i, A_i⟩ = 0 and ⟨∂L/∂B_:,i, B_:,i⟩ = 0 — true only if the norms are differentiated
    (with detached norms these inner products would be the nonzero ⟨G, branch⟩). And ∂L/∂λ = ⟨G, branch⟩/λ."""
    W, _ = (t.double() for t in make_layer(D_OUT, D_IN, seed=3))
    g = torch.Generator().manual_seed(2)
    p = {
        "A": torch.randn(4, D_IN, generator=g, dtype=torch.float64).requires_grad_(True),
        "B": torch.randn(D_OUT, 4, generator=g, dtype=torch.float64).requires_grad_(True),
        "lam": torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
        "wnorm": torch.linalg.vector_norm(W, dim=0),
    }
    x = torch.randn(9, D_IN, generator=g, dtype=torch.float64)
    G = torch.randn(9, D_OUT, generator=g, dtype=torch.float64)
    branch = delora.apply(p, W, x, None) - x @ W.T
    dA, dB, dlam = torch.autograd.grad((branch * G).sum(), [p["A"], p["B"], p["lam"]])
    inner = float((branch * G).sum().detach())
    assert abs(inner) > 1e-1  # so the checks below are not trivially zero
    assert (dA * p["A"]).sum(1).abs().max() <= 1e-10 * abs(inner)
    assert (dB * p["B"]).sum(0).abs().max() <= 1e-10 * abs(inner)
    assert float(dlam) == pytest.approx(inner / 2.5, rel=1e-12)


def test_lam_zero_really_kills_every_gradient():
    """Why DeLoRAConfig(lam=0) is refused (SPEC §4): at B = 0 and λ = 0 nothing receives a gradient."""
    W, b = make_layer(D_OUT, D_IN, seed=3)
    p = delora.init(0, W, lf.DeLoRAConfig(r=4))
    p = {**p, "lam": torch.tensor(0.0, requires_grad=True)}
    loss = delora.apply(p, W, torch.randn(5, D_IN), b).pow(2).sum()
    grads = torch.autograd.grad(loss, [p["A"], p["B"], p["lam"]])
    assert all(float(gr.abs().max()) == 0.0 for gr in grads)
    with pytest.raises(ValueError, match=r"lam=0 would make every gradient zero.*lam=15\.0"):
        lf.DeLoRAConfig(lam=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r=0 must be a positive int"),
        (dict(r=-2), "r=-2 must be a positive int"),
        (dict(lam=0.0), "lam=0.0 would make every gradient zero"),
        (dict(lam=float("nan")), "lam=nan must be a finite number"),
        (dict(lam="15"), "lam='15' must be a finite number"),
    ],
)
def test_bad_config(kwargs, match):
    assert_config_refused(lf.DeLoRAConfig, kwargs, match)
