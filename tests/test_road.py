"""RoAd: config/shape errors, parity with peft's RoadConfig for road_1/2/4, and a float64 reference from SPEC.md."""

import copy

import peft
import pytest
import torch
from helpers import assert_config_refused, assert_matches_reference, make_layer, rel_err
from torch import nn

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import road

VARIANTS = ("road_1", "road_2", "road_4")


# ---------------------------------------------------------------- configuration errors


def test_bad_variant():
    assert_config_refused(lf.ROADConfig, dict(variant="road_3"), r"variant='road_3'.*road_1")


@pytest.mark.parametrize("gs,hint", [(7, "group_size=6 or 8"), (1, "group_size=2")])
def test_odd_group_size(gs, hint):
    assert_config_refused(lf.ROADConfig, dict(group_size=gs), f"group_size={gs} must be even.*{hint}")


@pytest.mark.parametrize("gs", [0, -4, 2.0])
def test_non_positive_int_group_size(gs):
    assert_config_refused(lf.ROADConfig, dict(group_size=gs), f"group_size={gs!r} must be a positive int")


@pytest.mark.parametrize("d_out,gs,valid", [(24, 16, 12), (12, 64, 12), (20, 8, 4), (30, 4, 2)])
def test_group_size_must_divide_d_out(d_out, gs, valid):
    W, _ = make_layer(d_out, 6)
    with pytest.raises(ValueError, match=f"group_size={gs} does not divide d_out={d_out}.*group_size={valid}$"):
        road.init(0, W, lf.ROADConfig(group_size=gs))
    road.init(0, W, lf.ROADConfig(group_size=valid))  # the suggestion works


def test_odd_d_out():
    W, _ = make_layer(15, 6)
    with pytest.raises(ValueError, match="d_out=15 is odd"):
        road.init(0, W, lf.ROADConfig(group_size=2))


def test_params_from_another_width():
    p = road.init(0, make_layer(16, 6)[0], lf.ROADConfig(group_size=8))
    W, b = make_layer(24, 6)
    with pytest.raises(ValueError, match=r"covers 16 output features but W has d_out=24"):
        road.apply(p, W, torch.randn(2, 6), b)


# ---------------------------------------------------------------- leaves


@pytest.mark.parametrize(
    "variant,shape,peft_size", [("road_1", (3, 1, 4), 12), ("road_2", (3, 2, 4), 24), ("road_4", (3, 2, 2, 4), 48)]
)
def test_leaves(variant, shape, peft_size):
    W, _ = make_layer(24, 6)
    p = road.init(0, W, lf.ROADConfig(variant=variant, group_size=8))
    assert set(p) == {"theta", "alpha"}
    for k, v in p.items():
        assert v.shape == shape and v.numel() == peft_size and v.requires_grad, k
    assert torch.equal(p["theta"], torch.zeros(shape)) and torch.equal(p["alpha"], torch.ones(shape))
    assert not hasattr(road, "STEERING_LEAF")  # alpha here is a magnitude, not a steering coefficient


# ---------------------------------------------------------------- peft parity


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 24)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _peft_and_ours(variant, seed=0, group_size=8):
    torch.manual_seed(seed)
    base = Tiny()
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.RoadConfig(variant=variant, group_size=group_size, target_modules=["a", "b"])
    )
    g = torch.Generator().manual_seed(seed + 1)
    params = {}
    for name in ("a", "b"):
        layer = ref.base_model.model.get_submodule(name)
        theta, alpha = layer.road_theta["default"], layer.road_alpha["default"]
        with torch.no_grad():  # move peft's tensors off their identity init
            theta.copy_(0.7 * torch.randn(theta.shape, generator=g))
            alpha.copy_(1.0 + 0.5 * torch.randn(alpha.shape, generator=g))
        p = road.init(0, getattr(base, name).weight, lf.ROADConfig(variant=variant, group_size=group_size))
        params[name] = {
            "theta": theta.detach().reshape(p["theta"].shape).clone().requires_grad_(True),
            "alpha": alpha.detach().reshape(p["alpha"].shape).clone().requires_grad_(True),
        }
    return base, ref, params


def _ours(model, params, x):
    a, b = model.a, model.b
    return road.apply(params["b"], b.weight, torch.tanh(road.apply(params["a"], a.weight, x, a.bias)), b.bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_parity_outputs_and_grads(variant):
    base, ref, params = _peft_and_ours(variant)
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(9))
    leaves = []
    for name in ("a", "b"):
        layer = ref.base_model.model.get_submodule(name)
        for ours, theirs in (("theta", layer.road_theta), ("alpha", layer.road_alpha)):
            leaves.append(((name, ours), params[name][ours], theirs["default"]))
    _, y_our = assert_matches_reference(
        ref,
        lambda h: _ours(base, params, h),
        x,
        leaves,
        cotangent=10,
        to_ours=lambda key, g: g.reshape(params[key[0]][key[1]].shape),
    )  # peft: flat
    assert rel_err(y_our, base(x)) > 1e-2  # the randomised adapter does something


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_matches_peft_merge(variant):
    """peft merges R·W and R·b: the bias is rotated too."""
    base, ref, params = _peft_and_ours(variant, seed=4)
    merged = ref.merge_and_unload()
    for name, p in params.items():
        layer = getattr(base, name)
        W, b = variants.dense_weights(road, p, layer.weight, layer.bias)
        assert rel_err(W, merged.get_submodule(name).weight) <= 1e-5, name
        assert rel_err(b, merged.get_submodule(name).bias) <= 1e-5, name


# ---------------------------------------------------------------- float64 reference (SPEC.md §3, not peft)


def _reference(variant, theta, alpha, y, group_size):
    """Per group, pair element j of the first half with element j of the second half:
    y'_k = y_k c₁_k + rot_half(y)_k c₂_k,  rot_half(y) = (−y_second, y_first)."""
    d_out, h = y.shape[-1], group_size // 2
    out = torch.empty_like(y)
    for g in range(d_out // group_size):
        for s in range(2):
            for j in range(h):
                k = g * group_size + s * h + j
                partner = g * group_size + (1 - s) * h + j
                rot = -y[..., partner] if s == 0 else y[..., partner]
                if variant == "road_1":  # one (θ, α) per pair
                    c1 = alpha[g, 0, j] * torch.cos(theta[g, 0, j])
                    c2 = alpha[g, 0, j] * torch.sin(theta[g, 0, j])
                elif variant == "road_2":  # one (θ, α) per element
                    c1 = alpha[g, s, j] * torch.cos(theta[g, s, j])
                    c2 = alpha[g, s, j] * torch.sin(theta[g, s, j])
                else:  # road_4: separate (θ, α) for the two columns
                    c1 = alpha[g, 0, s, j] * torch.cos(theta[g, 0, s, j])
                    c2 = alpha[g, 1, s, j] * torch.sin(theta[g, 1, s, j])
                out[..., k] = y[..., k] * c1 + rot * c2
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_reference(variant):
    gs = 6
    W, b = make_layer(12, 5, dtype=torch.float64)
    p = road.init(0, W, lf.ROADConfig(variant=variant, group_size=gs))
    g = torch.Generator().manual_seed(2)
    p = {k: v.detach() + 0.8 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p.items()}
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    want = _reference(variant, p["theta"], p["alpha"], x @ W.T + b, gs)
    assert rel_err(road.apply(p, W, x, b), want) <= 1e-12


def test_rotation_preserves_norm_when_alpha_is_one():
    """road_1 with α = 1 is a pure rotation of each pair: ‖y'‖ = ‖y‖ per group."""
    W, b = make_layer(16, 5, dtype=torch.float64)
    p = road.init(0, W, lf.ROADConfig(variant="road_1", group_size=8))
    p = {"theta": torch.randn(p["theta"].shape, dtype=torch.float64) * 2, "alpha": p["alpha"].detach()}
    x = torch.randn(3, 5, dtype=torch.float64)
    y, y0 = road.apply(p, W, x, b), x @ W.T + b
    assert torch.allclose(y.norm(dim=-1), y0.norm(dim=-1)) and rel_err(y, y0) > 1e-2
