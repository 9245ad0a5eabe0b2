"""Contract tests, parametrised over the variant registry (SPEC.md §2)."""

import pytest
import torch
from cases import D_IN, D_OUT, all_cases, case_id
from helpers import assert_rank_above_min_dim_refused, layer_params, make_layer, perturb, rel_err, with_steering
from torch.func import vmap

from lite_fn import variants

CASES = all_cases()
IDS = [case_id(c) for c in CASES]


def x_in(dtype=torch.float32, seed=5, n=(3, 7)):
    return torch.randn(*n, D_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def perturbed_layer(case, seed):
    """The case's variant module, a (D_OUT, D_IN) layer W, b, and its params moved off init (steering leaf at 1)."""
    name, cfg = case
    W, b = make_layer(D_OUT, D_IN)
    return variants.get(name), W, b, with_steering(name, perturb(layer_params(name, cfg, W), seed=seed), 1.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init(case):
    name, cfg = case
    W, b = make_layer(D_OUT, D_IN)
    p = with_steering(name, layer_params(name, cfg, W), 0.0)  # AntiPaSTO: alpha = 0 for any params
    y = variants.get(name).apply(p, W, x_in(), b)
    base = torch.nn.functional.linear(x_in(), W, b)
    # PiSSA's s·(BA − B₀A₀) and AntiPaSTO at alpha=0 cancel exactly; the rest are exact by construction.
    assert rel_err(y, base) <= 1e-6, rel_err(y, base)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_antipasto_alpha_zero_exact_for_any_params(case):
    name, cfg = case
    mod = variants.get(name)
    if mod.STEERING_LEAF is None:
        pytest.skip("no steering leaf")
    W, b = make_layer(D_OUT, D_IN)
    p = with_steering(name, perturb(layer_params(name, cfg, W), seed=3, scale=1.0), 0.0)
    assert torch.equal(mod.apply(p, W, x_in(), b), torch.nn.functional.linear(x_in(), W, b))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_key_same_params_and_w_untouched(case):
    name, cfg = case
    mod = variants.get(name)
    W, b = make_layer(D_OUT, D_IN)
    W0, rng0 = W.clone(), torch.get_rng_state()
    p1, p2 = layer_params(name, cfg, W, key=7), layer_params(name, cfg, W, key=7)
    assert p1.keys() == p2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
        assert p1[k].requires_grad == p2[k].requires_grad
    p3 = layer_params(name, cfg, W, key=8)
    differs = any(not torch.equal(p1[k], p3[k]) for k in p1)
    assert differs == mod.random_init(cfg)
    mod.apply(perturb(p1, 0), W, x_in(), b)
    assert torch.equal(W, W0), "W was mutated"
    assert torch.equal(torch.get_rng_state(), rng0), "global RNG state was consumed"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_equals_loop(case):
    name, cfg = case
    mod = variants.get(name)
    W, b = make_layer(D_OUT, D_IN)
    base = layer_params(name, cfg, W)
    ps = [with_steering(name, perturb(base, seed=s), 0.5 + s) for s in range(4)]
    stacked = {k: torch.stack([p[k].detach() for p in ps]) for k in base}
    x = x_in()
    got = vmap(mod.apply, in_dims=(0, None, None, None))(stacked, W, x, b)
    want_shared = torch.stack([mod.apply(p, W, x, b) for p in ps])
    assert rel_err(got, want_shared) <= 1e-5
    # also vmapped over x together with params (the routed case)
    xs = torch.randn(4, 5, D_IN)
    got = vmap(mod.apply, in_dims=(0, None, 0, None))(stacked, W, xs, b)
    want = torch.stack([mod.apply(p, W, xi, b) for p, xi in zip(ps, xs)])
    assert rel_err(got, want) <= 1e-5
    spec = variants.get(name)
    if spec.prepare is not None:  # per-call weight math for all layers at once: the same outputs, vmapped too
        done = spec.prepare({str(k): p for k, p in enumerate(ps)})
        assert all(rel_err(mod.apply(done[str(k)], W, x, b), want_k) <= 1e-5 for k, want_k in enumerate(want_shared))
        alphas = torch.linspace(-1.0, 1.0, 3)
        leaf = spec.STEERING_LEAF or "alpha"
        swept = vmap(lambda a: mod.apply(spec.prepare({"l": {**ps[0], leaf: a}})["l"], W, x, b))(alphas)
        assert rel_err(swept, torch.stack([mod.apply(with_steering(name, ps[0], float(a)), W, x, b) for a in alphas])) <= 1e-5
    if spec.apply_runs is not None:  # the routed fast path: K adapters on K runs of rows, no vmap
        runs = torch.randn(4, 2, 3, D_IN)
        want = torch.stack([mod.apply(p, W, xi, b) for p, xi in zip(ps, runs)])
        assert rel_err(spec.apply_runs(stacked, W, runs, b), want) <= 1e-5
        grads = torch.func.grad(lambda st: spec.apply_runs(st, W, runs, b).square().sum())(stacked)
        grads_loop = torch.func.grad(lambda st: vmap(mod.apply, in_dims=(0, None, 0, None))(st, W, runs, b).square().sum())(
            stacked
        )
        assert all(rel_err(grads[k], grads_loop[k]) <= 1e-5 for k in grads)
        leaves = {k: v.clone().requires_grad_(k in spec.TRAINABLE) for k, v in stacked.items()}  # plain autograd: in place
        names = sorted(spec.TRAINABLE & leaves.keys())  # TRAINABLE may name optional leaves (LoRA's bias)
        trained = [leaves[k] for k in names]
        eager = torch.autograd.grad(spec.apply_runs(leaves, W, runs, b).square().sum(), trained)
        assert all(rel_err(g, grads_loop[k]) <= 1e-5 for g, k in zip(eager, names))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_reach_trainable_leaves_only(case):
    mod, W, b, p = perturbed_layer(case, seed=1)
    trainable = [k for k, v in p.items() if v.requires_grad]
    assert trainable, "a variant with nothing to train"
    loss = mod.apply(p, W, x_in(), b).pow(2).sum()
    grads = torch.autograd.grad(loss, [p[k] for k in trainable])
    for k, g in zip(trainable, grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"no gradient reached {k}"
    for v in p.values():
        if not v.requires_grad:
            assert v.grad_fn is None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_equals_apply(case):
    mod, W, b, p = perturbed_layer(case, seed=2)
    for bias in (b, None):
        Wm, bm = variants.dense_weights(mod, p, W, bias)
        y = mod.apply(p, W, x_in(), bias)
        assert rel_err(torch.nn.functional.linear(x_in(), Wm, bm), y) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_close_to_fp32(case):
    name, cfg = case
    mod, W, b, p32 = perturbed_layer(case, seed=4)
    p16 = {k: v.detach().to(torch.bfloat16) for k, v in p32.items()}
    y16 = mod.apply(p16, W.bfloat16(), x_in().bfloat16(), b.bfloat16())
    y32 = mod.apply(p32, W, x_in(), b)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert rel_err(y16.float(), y32) <= 3e-2
    # and init straight from a bf16 weight gives bf16 leaves
    p = layer_params(name, cfg, W.bfloat16())
    assert all(v.dtype == torch.bfloat16 for v in p.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_weight_and_input_errors(case):
    name, cfg = case
    mod = variants.get(name)
    W, b = make_layer(D_OUT, D_IN)
    with pytest.raises(ValueError, match="2-D"):
        layer_params(name, cfg, W[0])
    with pytest.raises(TypeError, match="floating-point"):
        layer_params(name, cfg, (W * 10).to(torch.int64))
    Wnan = W.clone()
    Wnan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer_params(name, cfg, Wnan)
    p = layer_params(name, cfg, W)
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        mod.apply(p, W, torch.randn(3, D_IN + 1), b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rank_errors(case):
    name, cfg = case
    if not hasattr(cfg, "r"):
        pytest.skip("no rank")
    with pytest.raises(ValueError, match="r=0"):
        type(cfg)(**{**_fields(cfg), "r": 0})
    W, _ = make_layer(D_OUT, D_IN)
    big = type(cfg)(**{**_fields(cfg), "r": 2 * D_IN})
    with pytest.raises(ValueError, match=f"r={2 * D_IN}"):
        layer_params(name, big, W)


def _fields(cfg):
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiles_without_graph_breaks(case):
    """A loss + torch.func.grad over apply traces with fullgraph=True (dynamo only: backend="eager")."""
    import torch._dynamo

    mod, W, b, p = perturbed_layer(case, seed=6)
    train = {k: v for k, v in p.items() if v.requires_grad}
    frozen = {k: v for k, v in p.items() if not v.requires_grad}

    weights = torch.randn(x_in().shape[:-1] + (D_OUT,), generator=torch.Generator().manual_seed(7))

    def loss(t, x):  # a random projection: pow(2) would give RoAd's angles an exactly zero gradient (rotations keep norms)
        return (mod.apply({**frozen, **t}, W, x, b) * weights).sum()

    torch._dynamo.reset()
    step = torch.compile(torch.func.grad(loss), fullgraph=True, backend="eager")
    got, want = step(train, x_in()), torch.func.grad(loss)(train, x_in())
    for k in train:
        assert rel_err(got[k], want[k]) <= 1e-5, k


@pytest.mark.parametrize("name", ["delora", "dora", "pissa"])
def test_rank_above_min_dim_refused(name):
    mod = variants.get(name)
    assert_rank_above_min_dim_refused(mod, mod.Config, D_OUT, D_IN)
