"""EVA: streaming PCA vs a float64 reference, parity with peft's EVA machinery, plan(), errors."""

import copy
import warnings

import pytest
import torch
from helpers import assert_config_refused, assert_matches_reference, assert_stat_refuses_bad_batches, rel_err
from torch import nn

import lite_fn as lf
from lite_fn.variants import eva

D = 16


def affine(n, variances, d=D, seed=0, scale=10.0):
    """n rows in a len(variances)-dim affine subspace of R^d whose centred scatter is exactly
    M diag(scale²·variances) Mᵀ (orthonormal, zero-mean sample directions) — known spectrum."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, len(variances), generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(Z - Z.mean(0)).Q
    M = torch.linalg.qr(torch.randn(d, len(variances), generator=g, dtype=torch.float64)).Q
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    return mu + (Q * scale * torch.tensor(variances, dtype=torch.float64).sqrt()) @ M.T


def ref_pca(X):
    """Float64 PCA from the definition: SVD of the centred data; rows sign-fixed like peft's svd_flip."""
    Xc = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    signs = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
    return Vh * signs, S


def fed(cfg, W, *batches):
    st = eva.stat(cfg, W)
    for x in batches:
        st.update(x)
    return st


# --------------------------------------------------------------------------- exact streaming PCA
def test_streaming_stat_equals_float64_pca_of_all_data():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) * torch.logspace(0, -2, D, dtype=torch.float64)
    batches = [
        torch.randn(*shape, D, generator=g, dtype=torch.float64) @ mix.T + 3.0
        for shape in [(40,), (2, 7), (1,), (3, 5, 4), (25,)]
    ]
    X = torch.cat([b.reshape(-1, D) for b in batches])
    W = torch.randn(24, D, dtype=torch.float64)
    Vh, S = ref_pca(X)
    for whiten in (False, True):
        cfg = lf.EVAConfig(r=5, alpha=8, whiten=whiten)
        st = fed(cfg, W, *batches)
        assert st.tokens == X.shape[0]
        A = eva.init(0, W, cfg, st)["A"]
        want = Vh[:5] / (S[:5, None].sqrt() if whiten else 1.0)  # peft: u /= singular_values_.sqrt()
        assert rel_err(A, want) <= 1e-10  # same rows, same signs
    assert rel_err(st.explained_variance_ratio(), S**2 / (S**2).sum()) <= 1e-10


def test_stat_float32_inputs_accumulate_in_float64():
    X = affine(64, [0.5, 0.3, 0.2], seed=3)
    Vh, _ = ref_pca(X.float().double())
    st = fed(lf.EVAConfig(r=2), torch.zeros(4, D), X.float()[:30], X.float()[30:])
    assert st.scatter.dtype == torch.float64
    assert rel_err(st.components[:3], Vh[:3]) <= 1e-9


# --------------------------------------------------------------------------- peft parity
def test_peft_incremental_pca_parity_on_distinct_batches():
    """peft's IncrementalPCA (as its SVDHook builds it) over distinct batches of data spanning
    exactly n_components directions — the case where its truncation between batches is exact."""
    from peft.utils.incremental_pca import IncrementalPCA

    X = affine(6 * 32, [0.45, 0.3, 0.15, 0.1], seed=7)
    batches = X.float().split(32)
    ipca = IncrementalPCA(n_components=4, copy=True, lowrank=True, lowrank_seed=42)
    for b in batches:
        ipca.partial_fit(b)
    W = torch.zeros(8, D, dtype=torch.float64)
    st = fed(lf.EVAConfig(r=2, rho=2.0), W, *batches)
    cos = torch.nn.functional.cosine_similarity(st.components[:4], ipca.components_.double(), dim=1)
    assert (cos >= 1 - 1e-4).all(), cos  # signed: our sign convention is peft's
    assert rel_err(st.explained_variance_ratio()[:4], ipca.explained_variance_ratio_) <= 1e-4
    # whiten: peft's get_eva_state_dict divides each row by √(singular value)
    A = eva.init(0, W, lf.EVAConfig(r=4, whiten=True), st)["A"]
    want = ipca.components_.double() / ipca.singular_values_.double().sqrt()[:, None]
    assert rel_err(A, want) <= 1e-4


class Tiny(nn.Module):
    """q/k/v read the same input (peft groups them by hash); g and f read their own."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name in "qkvgf":
            lin = nn.Linear(D, D)
            lin.weight.data = torch.randn(D, D, generator=g) / 4
            lin.bias.data = torch.randn(D, generator=g) / 4
            setattr(self, name, lin)

    def forward(self, x1, x2, x3):
        return self.q(x1) + self.k(x1) + self.v(x1) + self.g(x2) + self.f(x3)


# Spectra chosen so every layer's rank is decided by a clear margin (no ties at the cut):
# qkv offer (.6, .35, .04, .01) each, g (.27, .26, .25, .22), f (.21, .205, .2, .195, .19: rank 5).
# budget = 2 · 5 layers = 10.  rho=2 (cap 4): q,k,v -> 2, g -> 4, f -> 0 (no adapter).
# rho=1.5 (cap 3): q,k,v -> 2, g -> 3, f -> 1.  Batches are row permutations of one sample,
# so peft's truncated incremental PCA is exact and its stopping point does not matter.
N = 64
SPECTRA = dict(x1=[0.6, 0.35, 0.04, 0.01], x2=[0.27, 0.26, 0.25, 0.22], x3=[0.21, 0.205, 0.2, 0.195, 0.19])
EXPECTED = {2.0: dict(q=2, k=2, v=2, g=4, f=0), 1.5: dict(q=2, k=2, v=2, g=3, f=1)}


@pytest.fixture(scope="module", params=[(2.0, False, False), (1.5, True, True)], ids=["rho2", "rho1.5-whiten-rslora"])
def peft_eva(request):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights

    rho, whiten, rslora = request.param
    data = {k: affine(N, v, seed=i).float() for i, (k, v) in enumerate(SPECTRA.items())}
    perms = [torch.randperm(N, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    loader = [{k: v[p] for k, v in data.items()} for p in perms]
    model = Tiny()
    pcfg = LoraConfig(
        r=2,
        lora_alpha=4,
        use_rslora=rslora,
        target_modules=list("qkvgf"),
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho, tau=0.99, whiten=whiten),
    )
    kw = dict(forward_fn=lambda m, i: m(**i), prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = get_eva_state_dict(copy.deepcopy(model), loader, peft_config=pcfg, **kw)
        pmodel = get_peft_model(copy.deepcopy(model), pcfg, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(pmodel, loader, **kw)

    # ours: q/k/v share one Stat (what the runtime does for identical inputs); one pass over the data
    cfg = lf.EVAConfig(r=2, alpha=4, rho=rho, tau=0.99, whiten=whiten, use_rslora=rslora)
    shared = eva.stat(cfg, model.q.weight)
    stats = dict(q=shared, k=shared, v=shared, g=eva.stat(cfg, model.g.weight), f=eva.stat(cfg, model.f.weight))
    for batch in loader:
        for st, key in ((shared, "x1"), (stats["g"], "x2"), (stats["f"], "x3")):
            st.update(batch[key])
    planned = eva.plan(stats, {k: cfg for k in stats})
    return dict(rho=rho, model=model, state=state, pmodel=pmodel, stats=stats, planned=planned, cfg=cfg, data=data)


def test_plan_gives_peft_rank_distribution(peft_eva):
    planned, state, cfg = peft_eva["planned"], peft_eva["state"], peft_eva["cfg"]
    ranks = {k: 0 if c is None else c.r for k, c in planned.items()}
    assert ranks == {k: v.shape[0] for k, v in state.items()}
    assert ranks == EXPECTED[peft_eva["rho"]]  # and the redistribution is not trivial
    for c in planned.values():
        if c is not None:  # adjust_scaling_factors: alpha · new_r / r
            assert c.alpha == cfg.alpha * (c.r / cfg.r)


def test_eva_rows_equal_peft_rows(peft_eva):
    model, state, stats = peft_eva["model"], peft_eva["state"], peft_eva["stats"]
    for name, c in peft_eva["planned"].items():
        if c is None:
            continue
        A = eva.init(0, getattr(model, name).weight, c, stats[name])["A"]
        cos = torch.nn.functional.cosine_similarity(A.double(), state[name].double(), dim=1)
        assert (cos >= 1 - 1e-4).all(), (name, cos)
        if not c.whiten:  # unit rows, same signs
            assert rel_err(A, state[name]) <= 1e-4, name
        # whitened row lengths are 1/√S with S the singular values of ALL data seen, so they depend on
        # where peft stopped (and peft divides the q/k/v rows it shares once per layer, in place);
        # their exact parity is checked on identical data in test_peft_incremental_pca_parity_*.


def test_layers_and_scaling_match_peft_model_after_eva_init(peft_eva):
    from peft.tuners.lora import LoraLayer

    base = peft_eva["pmodel"].base_model.model
    for name, c in peft_eva["planned"].items():
        module = getattr(base, name)
        if c is None:  # rank 0: peft swapped the plain base layer back in
            assert not isinstance(module, LoraLayer)
            continue
        p = eva.init(0, getattr(peft_eva["model"], name).weight, c, peft_eva["stats"][name])
        assert module.r["default"] == c.r
        assert float(p["scale"]) == pytest.approx(module.scaling["default"], rel=1e-7)
        assert torch.equal(module.lora_B["default"].weight, torch.zeros_like(module.lora_B["default"].weight))


def test_apply_and_grads_match_peft_lora_forward(peft_eva):
    """peft's A and randomised B copied into our params (scale from our plan): outputs and gradients."""
    base, model = peft_eva["pmodel"].base_model.model, peft_eva["model"]
    g = torch.Generator().manual_seed(11)
    for name, c in peft_eva["planned"].items():
        if c is None:
            continue
        module, lin = getattr(base, name), getattr(model, name)
        p = eva.init(0, lin.weight, c, peft_eva["stats"][name])
        with torch.no_grad():
            module.lora_B["default"].weight.copy_(torch.randn(D, c.r, generator=g))
        for leaf in "AB":
            p[leaf] = getattr(module, f"lora_{leaf}")["default"].weight.detach().clone().requires_grad_(True)
        x = torch.randn(3, 5, D, generator=g)
        leaves = [(leaf, p[leaf], getattr(module, f"lora_{leaf}")["default"].weight) for leaf in "AB"]
        assert_matches_reference(
            module, lambda h: eva.apply(p, lin.weight.detach(), h, lin.bias.detach()), x, leaves, cotangent=g, tag=(name,)
        )  # the cotangent is the next draw from g


# --------------------------------------------------------------------------- convergence (tau)
def test_converged_compares_components_between_successive_updates():
    X = affine(200, [0.5, 0.3, 0.15, 0.05], seed=1)
    cfg = lf.EVAConfig(r=2, rho=2.0, tau=0.99)
    st = eva.stat(cfg, torch.zeros(4, D))
    st.update(X[:100])
    assert not st.converged  # nothing to compare with yet
    st.update(X[:100])  # same statistics again: directions unchanged
    assert st.converged
    Y = affine(100, [0.05, 0.15, 0.3, 0.5], seed=2)  # other directions entirely
    st.update(Y * 10)
    assert not st.converged
    strict = fed(lf.EVAConfig(r=2, tau=1.0), torch.zeros(4, D), X[:50], X[50:])
    assert not strict.converged  # tau = 1 would need bit-identical directions


# --------------------------------------------------------------------------- plan by hand
def axis_stat(cfg, variances, n=64, seed=0):
    return fed(cfg, torch.zeros(4, len(variances)), affine(n, variances, d=len(variances), seed=seed))


def test_plan_by_hand_budget_cap_ties_and_scaling():
    cfg = lf.EVAConfig(r=2, alpha=6.0, rho=2.0)
    stats = {
        "a": axis_stat(cfg, [0.97, 0.01, 0.01, 0.01, 0.0]),
        "b": axis_stat(cfg, [0.3, 0.25, 0.25, 0.2, 0.0]),  # cap round(2·2)=4 even though it could use more
        "c": axis_stat(cfg, [0.5, 0.5, 0.0, 0.0, 0.0]),
    }
    # pooled top-6 of a(.97,.01,.01,.01) b(.3,.25,.25,.2) c(.5,.5,0,0): .97a .5c .5c .3b .25b .25b
    out = eva.plan(stats, {k: cfg for k in stats})
    assert {k: v.r for k, v in out.items()} == {"a": 1, "b": 3, "c": 2}
    assert out["a"].alpha == 3.0 and out["b"].alpha == 9.0 and out["c"] is cfg
    keep = lf.EVAConfig(r=2, alpha=6.0, rho=2.0, adjust_scaling_factors=False)
    out = eva.plan(stats, {k: keep for k in stats})
    assert out["a"].alpha == 6.0 and out["a"].scale == 6.0


def test_plan_rank_zero_is_none_and_ties_go_to_the_earlier_layer():
    cfg = lf.EVAConfig(r=1, alpha=2.0, rho=2.0)
    same = [0.4, 0.3, 0.2, 0.1]
    stats = {"low": axis_stat(cfg, [0.25, 0.25, 0.25, 0.25]), "x": axis_stat(cfg, same), "y": axis_stat(cfg, same)}
    # top-3 of low(.25,.25) x(.4,.3) y(.4,.3): .4x .4y then a tie .3x/.3y -> x (earlier)
    out = eva.plan(stats, {k: cfg for k in stats})
    assert out["low"] is None and out["x"].r == 2 and out["y"] is cfg


def test_plan_rho_one_keeps_every_rank():
    cfg = lf.EVAConfig(r=2, rho=1.0)
    stats = {"a": axis_stat(cfg, [0.9, 0.05, 0.05]), "b": axis_stat(cfg, [0.34, 0.33, 0.33])}
    assert eva.plan(stats, {k: cfg for k in stats}) == {"a": cfg, "b": cfg}


# --------------------------------------------------------------------------- memory, sharing
def test_memory_does_not_grow_with_tokens():
    W = torch.zeros(8, D)
    g = torch.Generator().manual_seed(0)
    one = fed(lf.EVAConfig(r=4), W, torch.randn(100, D, generator=g))
    many = fed(lf.EVAConfig(r=4), W, *[torch.randn(100, D, generator=g) for _ in range(20)])
    assert many.tokens == 20 * one.tokens
    assert one.nbytes == many.nbytes == eva.stat(lf.EVAConfig(r=4), W).nbytes


def test_share_key_depends_on_input_width_and_components_not_on_w():
    cfg = lf.EVAConfig(r=4)
    a, b = eva.stat(cfg, torch.randn(8, D)), eva.stat(cfg, torch.randn(32, D))
    assert a.share_key == b.share_key and a.share_key is not None
    assert eva.stat(cfg, torch.randn(8, D + 1)).share_key != a.share_key
    assert eva.stat(lf.EVAConfig(r=2), torch.randn(8, D)).share_key != a.share_key


# --------------------------------------------------------------------------- errors
def test_init_errors_name_the_fix():
    W = torch.randn(8, D)
    cfg = lf.EVAConfig(r=4)
    with pytest.raises(ValueError, match=r"pass calibration data to lf.init / build one with eva.stat\(cfg, W\)"):
        eva.init(0, W, cfg, None)
    with pytest.raises(ValueError, match=r"calibration saw 3 tokens, fewer than r=4; give more calibration data"):
        eva.init(0, W, cfg, fed(cfg, W, torch.randn(3, D)))
    with pytest.raises(ValueError, match=r"d_in=17.*d_in=16"):
        eva.init(0, W, cfg, fed(cfg, torch.zeros(8, 17), torch.randn(9, 17)))
    with pytest.raises(TypeError, match="not an EVA statistic"):
        eva.init(0, W, cfg, object())


def test_update_errors():
    st = eva.stat(lf.EVAConfig(r=4), torch.zeros(8, D))
    wide, bad = torch.randn(5, D + 1), torch.randn(5, D)
    bad[1, 2] = float("inf")
    assert_stat_refuses_bad_batches(st, D, wide, bad)


def test_plan_errors():
    cfg = lf.EVAConfig(r=2)
    st = fed(cfg, torch.zeros(4, D), torch.randn(10, D))
    with pytest.raises(ValueError, match=r"only in cfgs: \['b'\]"):
        eva.plan({"a": st}, {"a": cfg, "b": cfg})
    with pytest.raises(ValueError, match=r"eva.plan\['b'\].*pass calibration data"):
        eva.plan({"a": st, "b": None}, {"a": cfg, "b": cfg})


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(rho=0.5), r"rho=0.5 must be >= 1.0"),
        (dict(tau=1.5), r"tau=1.5 must be in \[0, 1\]"),
        (dict(tau=-0.1), r"tau=-0.1 must be in \[0, 1\]"),
        (dict(alpha=float("nan")), r"alpha=nan must be a finite number"),
        (dict(r=0), r"r=0 must be a positive int"),
        (dict(rho=float("inf")), r"rho=inf must be a finite number"),
    ],
)
def test_bad_config_values(kw, msg):
    assert_config_refused(lf.EVAConfig, kw, msg)
