"""DoRA: parity with peft's LoraConfig(use_dora=True), the detached norm, the dense-free norm, bias, config errors."""

import peft
import pytest
import torch
from helpers import NewTensorSizes, assert_config_refused, assert_matches_reference, make_layer, peft_linear, rel_err

import lite_fn as lf
from lite_fn.variants import dora

D_OUT, D_IN = 20, 12


def _peft_layer(cfg, W, b):
    """A peft LoRA-DoRA layer around an nn.Linear holding copies of W and b."""
    return peft_linear(
        W, b, peft.LoraConfig, r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora, use_dora=True, lora_dropout=0.0
    )


def _randomised(layer, seed):
    """Make peft's adapter non-trivial (B ≠ 0, m ≠ ‖W‖) and return the same values as our params."""
    g = torch.Generator().manual_seed(seed)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        A.copy_(torch.randn(A.shape, generator=g) * 0.3)
        B.copy_(torch.randn(B.shape, generator=g) * 0.3)
        m.mul_(1.0 + 0.5 * torch.rand(m.shape, generator=g))
    return A, B, m


def _ours_from(A, B, m, scale):
    return {
        "A": A.detach().clone().requires_grad_(True),
        "B": B.detach().clone().requires_grad_(True),
        "scale": torch.tensor(scale),
        "m": m.detach().clone().requires_grad_(True),
    }


@pytest.mark.parametrize("cfg", [lf.DoRAConfig(r=4, alpha=8), lf.DoRAConfig(r=3, alpha=5, use_rslora=True)], ids=str)
def test_peft_parity_outputs_and_grads(cfg):
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(cfg, W, b)
    A, B, m = _randomised(layer, seed=4)
    p = _ours_from(A, B, m, cfg.scale)
    assert float(p["scale"]) == pytest.approx(layer.scaling["default"], rel=1e-7)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(5))
    leaves = [("A", p["A"], A), ("B", p["B"], B), ("m", p["m"], m)]
    assert_matches_reference(layer, lambda h: dora.apply(p, W, h, b), x, leaves, cotangent=6)


def test_init_matches_peft():
    W, b = make_layer(D_OUT, D_IN, seed=3)
    cfg = lf.DoRAConfig(r=4, alpha=8)
    layer = _peft_layer(cfg, W, b)
    p = dora.init(0, W, cfg)
    assert set(p) == {"A", "B", "scale", "m"}
    assert [k for k, v in p.items() if v.requires_grad] == ["A", "B", "m"]
    assert p["A"].shape == (4, D_IN) and p["B"].shape == (D_OUT, 4) and p["m"].shape == (D_OUT,) and p["scale"].shape == ()
    assert torch.equal(p["B"], torch.zeros(D_OUT, 4))
    assert p["A"].abs().max() <= D_IN**-0.5  # kaiming-uniform(a=√5) bound, as peft
    assert rel_err(p["m"], layer.lora_magnitude_vector["default"].weight) <= 1e-6
    x = torch.randn(7, D_IN)
    assert torch.equal(dora.apply(p, W, x, b), dora.apply(p, W, x, None) + b)
    assert rel_err(dora.apply(p, W, x, b), layer(x)) <= 1e-6


def test_weight_norm_equals_dense_row_norm_float64():
    """n from (d_out, r) and (r, r) pieces == ‖W + s·BA‖_row of the dense matrix (SPEC §3), incl. rsLoRA-like s."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    A = torch.randn(5, D_IN, generator=g, dtype=torch.float64)
    B = torch.randn(D_OUT, 5, generator=g, dtype=torch.float64)
    for s in (0.0, 0.37, 2.0, -1.5):
        dense = torch.linalg.vector_norm(W + s * B @ A, dim=1)
        got = dora.weight_norm(W, A, B, torch.tensor(s, dtype=torch.float64))
        assert rel_err(got, dense) <= 1e-12, s
        got32 = dora.weight_norm(W.float(), A.float(), B.float(), torch.tensor(s))
        assert rel_err(got32, dense) <= 1e-6, s


def test_norm_is_detached_analytic_grads_float64():
    """With n constant (paper §4.3, peft), y = c ⊙ (xWᵀ + s·xAᵀBᵀ) + b, c = m/n; the grads are then closed-form."""
    g = torch.Generator().manual_seed(1)
    W, b = (t.double() for t in make_layer(D_OUT, D_IN, seed=2))
    r, s = 4, 1.7
    A = (torch.randn(r, D_IN, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    B = (torch.randn(D_OUT, r, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    m = (torch.rand(D_OUT, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    x = torch.randn(9, D_IN, generator=g, dtype=torch.float64)
    G = torch.randn(9, D_OUT, generator=g, dtype=torch.float64)  # cotangent
    p = {"A": A, "B": B, "scale": torch.tensor(s, dtype=torch.float64), "m": m}
    dA, dB, dm = torch.autograd.grad((dora.apply(p, W, x, b) * G).sum(), [A, B, m])

    with torch.no_grad():
        n = torch.linalg.vector_norm(W + s * B @ A, dim=1)
        c = m / n
        Gc = G * c  # (t, o)
        h = x @ A.T  # (t, r)
        assert rel_err(dA, s * B.T @ Gc.T @ x) <= 1e-12
        assert rel_err(dB, s * Gc.T @ h) <= 1e-12
        assert rel_err(dm, (G * (x @ W.T + s * h @ B.T)).sum(0) / n) <= 1e-12

    # and the undetached norm would give a clearly different A gradient (the test can fail)
    y_live = (m / torch.linalg.vector_norm(W + s * B @ A, dim=1)) * (x @ W.T + s * x @ A.T @ B.T) + b
    dA_live = torch.autograd.grad((y_live * G).sum(), A)[0]
    assert rel_err(dA_live, dA) > 1e-2


def test_functorch_grad_equals_autograd():
    """detach works as a stop-gradient under torch.func.grad too."""
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(lf.DoRAConfig(r=4, alpha=8), W, b)
    p = _ours_from(*_randomised(layer, seed=7), 2.0)
    x = torch.randn(6, D_IN)
    trainable = {k: p[k] for k in ("A", "B", "m")}
    fn = lambda t: dora.apply({**p, **t}, W, x, b).pow(2).sum()
    g_func = torch.func.grad(fn)({k: v.detach() for k, v in trainable.items()})
    g_auto = torch.autograd.grad(fn(trainable), list(trainable.values()))
    for k, ga in zip(trainable, g_auto):
        assert rel_err(g_func[k], ga) <= 1e-6, k


def test_apply_never_builds_a_dense_update():
    W, b = make_layer(64, 48)
    p = dora.init(0, W, lf.DoRAConfig(r=4, alpha=8))
    p = {**p, "B": torch.randn(64, 4)}
    x = torch.randn(5, 48)
    with NewTensorSizes() as rec:
        dora.apply(p, W, x, b)
    assert max(rec.numels) < 64 * 48 // 4, max(rec.numels)  # largest: (5, 64) outputs, (64, 4) pieces


def test_bias_passes_through_unscaled():
    W, b = make_layer(D_OUT, D_IN, seed=3)
    layer = _peft_layer(lf.DoRAConfig(r=4, alpha=8), W, b)
    p = _ours_from(*_randomised(layer, seed=8), 2.0)
    x = torch.randn(6, D_IN)
    n = dora.weight_norm(W, p["A"], p["B"], p["scale"])
    assert (p["m"] / n - 1).abs().min() > 1e-3  # the rescaling is far from 1 ...
    assert rel_err(dora.apply(p, W, x, b) - dora.apply(p, W, x, None), b.expand(6, -1)) <= 1e-6  # ... yet b is added as is
    with torch.no_grad():  # peft too: its output with bias minus ours without is b itself
        assert rel_err(layer(x) - dora.apply(p, W, x, None), b.expand(6, -1)) <= 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r=0 must be a positive int"),
        (dict(r=2.0), "r=2.0 must be a positive int"),
        (dict(alpha=float("nan")), "alpha=nan must be a finite number"),
        (dict(alpha="16"), "alpha='16' must be a finite number"),
        (dict(init="orthogonal"), "init='orthogonal' is not one of"),
    ],
)
def test_bad_config(kwargs, match):
    assert_config_refused(lf.DoRAConfig, kwargs, match)
