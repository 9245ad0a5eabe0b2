"""Adapter arithmetic (lite_fn.merging.merge_adapters) against the installed peft's add_weighted_adapter, float64
references written from the TIES / DARE / Eckart–Young formulas, vmapped sweeps over merge weights, gradients with
respect to the weights, and every refusal.

Every adapter is non-trivial: peft's LoRA / IA3 tensors are moved off their init before saving, and each parity test
checks that the merged adapter changes the model's output."""

import copy
import doctest
import itertools
import math

import peft
import pytest
import torch
from helpers import rel_err
from models import logits, tiny, tokens
from peft.utils import merge_utils

import lite_fn as lf
from lite_fn import merging
from lite_fn.merging import keep_mask, merge_adapters
from lite_fn.variants import ia3, ia3_ff, lora

IDS = tokens(2, 6)
KEY = 7
DENSITY = 0.6
WEIGHTS = [0.7, -0.4, 1.3]
SWEEP = torch.tensor([[1.0, 0.5, -0.5], [0.2, -1.0, 0.9], [-0.7, 0.3, 1.1]])  # weight rows of the vmapped sweeps
Q = "model.layers.0.self_attn.q_proj"


# ----------------------------------------------------------------------------- peft models with three adapters
def _moved(pm, seed, marks):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(m in name for m in marks):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return pm.eval()


def _three(tmp_path_factory, configs, marks, tag):
    """peft model holding adapters a0, a1, a2 (moved off their init), and their lite_fn trees via lf.load_peft."""
    base = tiny("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), configs[0], adapter_name="a0")
    for i, cfg in enumerate(configs[1:], 1):
        pm.add_adapter(f"a{i}", cfg)
    pm = _moved(pm, 0, marks)
    folder = tmp_path_factory.mktemp(tag)
    pm.save_pretrained(folder)
    trees = [lf.load_peft(folder, model=base, adapter_name=f"a{i}") for i in range(len(configs))]
    return pm, trees


TARGETS = (["q_proj", "v_proj"], ["q_proj", "v_proj"], ["q_proj", "down_proj"])  # union q, v, down; v not in a2


@pytest.fixture(scope="module")
def equal_ranks(tmp_path_factory):
    alphas = (8, 4, 16)
    cfgs = [peft.LoraConfig(r=4, lora_alpha=a, target_modules=t) for a, t in zip(alphas, TARGETS)]
    return _three(tmp_path_factory, cfgs, ("lora_A", "lora_B"), "equal")


@pytest.fixture(scope="module")
def mixed_ranks(tmp_path_factory):
    cfgs = [peft.LoraConfig(r=r, lora_alpha=a, target_modules=t) for r, a, t in zip((2, 4, 6), (8, 4, 3), TARGETS)]
    return _three(tmp_path_factory, cfgs, ("lora_A", "lora_B"), "mixed")


def _peft_merge(pm, name, method, weights=WEIGHTS, **kwargs):
    if name not in pm.peft_config:
        pm.add_weighted_adapter(["a0", "a1", "a2"], weights, name, combination_type=method, **kwargs)
    pm.set_adapter(name)
    with torch.no_grad():
        return logits(pm(IDS))


def _lite_out(params):
    with torch.no_grad():
        return logits(lf.call(tiny("llama"), params, IDS))


def _peft_layers(pm, name):
    """{path: (A, B, scaling)} of peft's adapter ``name``."""
    out = {}
    for path, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[path] = (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach(), module.scaling[name])
    return out


def _aligned(ours, theirs):
    """ours' B columns / A rows flipped to theirs' signs (an SVD's singular pairs are defined up to sign)."""
    A, B = ours
    s = torch.sign((B * theirs[1]).sum(0))
    return A * s[:, None], B * s


def _total(terms) -> torch.Tensor:
    """Σ of tensors of one shape (typed: the builtin sum starts from the int 0)."""
    return torch.stack(list(terms)).sum(0)


DARE_FREE = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
DARE = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
EQUAL_RANK_METHODS = ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"]


def _kwargs(method, sign="total"):
    out = {}
    if method not in ("linear", "cat", "svd"):
        out["density"] = DENSITY
    if "ties" in method:
        out["majority_sign_method"] = sign
    return out


def _check_leaves(pm, name, merged, method, trees):
    theirs = _peft_layers(pm, name)
    assert (
        set(theirs)
        == set(merged)
        == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    )
    for path, (A_p, B_p, s_p) in theirs.items():
        leaves = merged[path][lora.NAME]
        assert float(leaves["scale"]) == 1.0 == s_p
        A, B = leaves["A"], leaves["B"]
        if method.endswith("svd"):
            A, B = _aligned((A, B), (A_p, B_p))
        elif method == "cat":  # peft pads every layer to Σ r of the configs; here only the adapters present count
            r = A.shape[0]
            assert r == sum(t[path][lora.NAME]["A"].shape[0] for t in trees if path in t)
            assert not A_p[r:].any() and not B_p[:, r:].any()
            A_p, B_p = A_p[:r], B_p[:, :r]
        assert rel_err(A, A_p) <= 1e-5 and rel_err(B, B_p) <= 1e-5, (path, rel_err(A, A_p), rel_err(B, B_p))


# ----------------------------------------------------------------------------- parity with peft
@pytest.mark.parametrize("method", EQUAL_RANK_METHODS[:3] + ["cat", "svd", "ties_svd", "magnitude_prune_svd"])
def test_matches_peft_on_equal_ranks_and_different_targets(equal_ranks, method):
    pm, trees = equal_ranks
    ref = _peft_merge(pm, f"m_{method}", method, **_kwargs(method))
    merged = merge_adapters(trees, WEIGHTS, method=method, **_kwargs(method))
    ours = _lite_out(merged)
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    assert rel_err(ours, _lite_out({})) > 1e-3  # the merge changes the model
    _check_leaves(pm, f"m_{method}", merged, method, trees)


@pytest.mark.parametrize("method", ["ties", "ties_svd"])
def test_matches_peft_with_frequency_sign_election(equal_ranks, method):
    pm, trees = equal_ranks
    ref = _peft_merge(pm, f"f_{method}", method, **_kwargs(method, "frequency"))
    merged = merge_adapters(trees, WEIGHTS, method=method, **_kwargs(method, "frequency"))
    assert rel_err(_lite_out(merged), ref) <= 1e-5
    _check_leaves(pm, f"f_{method}", merged, method, trees)
    total = merge_adapters(trees, WEIGHTS, method=method, **_kwargs(method, "total"))
    assert rel_err(_lite_out(total), _lite_out(merged)) > 1e-4  # the election method matters here


@pytest.mark.parametrize(
    "method, options",
    [
        ("cat", {}),
        ("svd", {}),
        ("svd", {"svd_rank": 3}),
        ("svd", {"svd_rank": 5, "svd_clamp": 0.9}),
        ("svd", {"svd_full_matrices": False}),
        ("ties_svd", {"svd_rank": 8, "density": 0.4}),
        ("magnitude_prune_svd", {"density": 0.3}),
    ],
)
def test_matches_peft_on_different_ranks(mixed_ranks, method, options):
    pm, trees = mixed_ranks
    name = f"m_{method}_" + "_".join(f"{k}{v}" for k, v in options.items()).replace(".", "p")
    ref = _peft_merge(pm, name, method, **options)
    merged = merge_adapters(trees, WEIGHTS, method=method, **options)
    assert rel_err(_lite_out(merged), ref) <= 1e-5, rel_err(_lite_out(merged), ref)
    _check_leaves(pm, name, merged, method, trees)
    if method.endswith("svd"):  # svd_rank's default: the largest rank of the inputs (peft: of the configs)
        assert merged[Q][lora.NAME]["A"].shape[0] == options.get("svd_rank", 6)


def test_linear_family_refuses_different_ranks_at_a_layer(mixed_ranks):
    pm, trees = mixed_ranks
    with pytest.raises(ValueError, match="same r value"):
        pm.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "bad", combination_type="linear")
    for method in EQUAL_RANK_METHODS:
        with pytest.raises(ValueError, match=rf"method='{method}' adds the factors.*ranks are \{{0: 2, 1: 4, 2: 6\}}.*'cat'"):
            merge_adapters(trees, WEIGHTS, method=method, density=0.5, key=0)


def _masks_for_peft(trees, method):
    """(tensor -> our mask) for peft's random_pruning: the factors (dare_linear, dare_ties) or ΔW_i (*_svd)."""
    candidates = []
    for i, tree in enumerate(trees):
        for path, bv in tree.items():
            lv = bv[lora.NAME]
            parts = {"delta": (lv["B"] @ lv["A"]) * lv["scale"]} if method.endswith("svd") else {"A": lv["A"], "B": lv["B"]}
            candidates += [(path, i, part, t.detach()) for part, t in parts.items()]

    def random_pruning(tensor, density, rescale):
        found = [
            (path, i, part)
            for path, i, part, t in candidates
            if t.shape == tensor.shape and torch.allclose(t, tensor, rtol=1e-6, atol=1e-7)
        ]
        assert len(found) == 1, found
        path, i, part = found[0]
        m = keep_mask(KEY, path, i, part, tensor.shape, density)
        assert rescale
        return tensor * m / density

    return random_pruning


@pytest.mark.parametrize("method", DARE)
def test_dare_matches_peft_given_the_same_masks(equal_ranks, mixed_ranks, method, monkeypatch):
    """peft draws DARE's masks from torch's global RNG; here peft's random_pruning is handed lite_fn's masks (found by
    the tensor it prunes), so everything else — rescale, weights, TIES election, SVD — is peft's own code."""
    pm, trees = mixed_ranks if method.endswith("svd") else equal_ranks
    monkeypatch.setattr(merge_utils, "random_pruning", _masks_for_peft(trees, method))
    ref = _peft_merge(pm, f"m_{method}", method, **_kwargs(method))
    merged = merge_adapters(trees, WEIGHTS, method=method, key=KEY, **_kwargs(method))
    assert rel_err(_lite_out(merged), ref) <= 1e-5, rel_err(_lite_out(merged), ref)
    _check_leaves(pm, f"m_{method}", merged, method, trees)


def test_one_adapter_is_linear_in_peft_and_here(equal_ranks):
    """peft turns any method into linear for one adapter: exactly w·ΔW (negation and scaling of one task vector)."""
    pm, trees = equal_ranks
    if "one" not in pm.peft_config:
        pm.add_weighted_adapter(["a1"], [-0.6], "one", combination_type="svd")
    pm.set_adapter("one")
    with torch.no_grad():
        ref = logits(pm(IDS))
    for method in ("svd", "cat", "dare_ties"):  # no density or key needed: it is linear
        merged = merge_adapters([trees[1]], [-0.6], method=method)
        assert rel_err(_lite_out(merged), ref) <= 1e-5
        for path, bv in trees[1].items():
            lv, out = bv[lora.NAME], merged[path][lora.NAME]
            assert rel_err(out["scale"] * out["B"] @ out["A"], -0.6 * lv["scale"] * lv["B"] @ lv["A"]) <= 1e-6


def test_rslora_adapters_merge_to_the_exact_update(tmp_path_factory):
    """peft's merged adapter keeps use_rslora with lora_alpha = r, so it scales the merged factors by √r; the
    factors are the same as here, where the scale is 1 and cat gives Σ w_i ΔW_i exactly."""
    cfgs = [peft.LoraConfig(r=r, lora_alpha=4, use_rslora=True, target_modules=["q_proj"]) for r in (2, 4, 8)]
    pm, trees = _three(tmp_path_factory, cfgs, ("lora_A", "lora_B"), "rslora")
    pm.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, "m", combination_type="cat")
    merged = merge_adapters(trees, WEIGHTS, method="cat")
    for path, (A_p, B_p, _) in _peft_layers(pm, "m").items():
        out = merged[path][lora.NAME]
        assert rel_err(out["A"], A_p) <= 1e-6 and rel_err(out["B"], B_p) <= 1e-6
        exact = _total(
            w * t[path][lora.NAME]["scale"] * t[path][lora.NAME]["B"] @ t[path][lora.NAME]["A"] for w, t in zip(WEIGHTS, trees)
        )
        assert rel_err(out["scale"] * out["B"] @ out["A"], exact) <= 1e-6


# ----------------------------------------------------------------------------- IA3
@pytest.fixture(scope="module")
def ia3_three(tmp_path_factory):
    targets = ["k_proj", "v_proj", "down_proj"]
    cfgs = [
        peft.IA3Config(target_modules=t, feedforward_modules=["down_proj"]) for t in (targets, targets, ["k_proj", "down_proj"])
    ]
    return _three(tmp_path_factory, cfgs, ("ia3_l",), "ia3")


def test_ia3_matches_peft_where_every_adapter_targets_the_layer(ia3_three):
    pm, trees = ia3_three
    pm.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, "m")
    merged = merge_adapters(trees, WEIGHTS)
    assert {n for bv in merged.values() for n in bv} == {ia3.NAME, ia3_ff.NAME}
    missing = WEIGHTS[2]  # a2 does not target v_proj: it counts with g = 1 here, with 0 in peft
    for path, module in pm.base_model.model.named_modules():
        if hasattr(module, "ia3_l") and "m" in module.ia3_l:
            (g,) = merged[path].values()
            g_p = module.ia3_l["m"].detach().reshape(-1)
            shift = missing if "v_proj" in path else 0.0
            assert rel_err(g["g"], g_p + shift) <= 1e-6, path
    with torch.no_grad():  # outputs agree once peft's v_proj gains get the missing adapter's identity
        for path, module in pm.base_model.model.named_modules():
            if "v_proj" in path and hasattr(module, "ia3_l"):
                module.ia3_l["m"].add_(missing)
    pm.set_adapter("m")
    with torch.no_grad():
        ref = logits(pm(IDS))
    assert rel_err(_lite_out(merged), ref) <= 1e-5
    assert rel_err(_lite_out(merged), _lite_out({})) > 1e-3


def test_ia3_vmapped_sweep_equals_the_loop(ia3_three):
    _, trees = ia3_three
    base = tiny("llama")
    with torch.no_grad():
        swept = torch.func.vmap(lambda w: logits(lf.call(base, merge_adapters(trees, w), IDS)))(SWEEP)
        loop = torch.stack([logits(lf.call(base, merge_adapters(trees, w), IDS)) for w in SWEEP])
    assert rel_err(swept, loop) <= 1e-5 and rel_err(loop[0], loop[1]) > 1e-3


def test_ia3_methods_other_than_linear_are_refused(ia3_three):
    _, trees = ia3_three
    with pytest.raises(
        ValueError, match=r"method='svd' does not apply to layer .*gain leaves \['g'\]\); its methods are \['linear'\]"
    ):
        merge_adapters(trees, WEIGHTS, method="svd")


# ----------------------------------------------------------------------------- float64 references from the papers
def _tree(A, B, s):
    return {"layer": {lora.NAME: {"A": A, "B": B, "scale": torch.tensor(s, dtype=torch.float64)}}}


def _random_trees(n=3, r=3, d_out=5, d_in=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        _tree(
            torch.randn(r, d_in, generator=g, dtype=torch.float64),
            torch.randn(d_out, r, generator=g, dtype=torch.float64),
            0.5 + i,
        )
        for i in range(n)
    ]


def _trim_ref(t, density):
    """Keep the ⌊density·numel⌋ entries of largest magnitude (TIES §3 'trim'), entry by entry."""
    flat = [float(x) for x in t.reshape(-1)]
    k = int(density * len(flat))
    keep = sorted(range(len(flat)), key=lambda j: -abs(flat[j]))[:k]
    return torch.tensor([x if j in keep else 0.0 for j, x in enumerate(flat)], dtype=torch.float64).reshape(t.shape)


def _ties_ref(tensors, v, sign="total"):
    """TIES elect + disjoint merge, entry by entry (sgn 0 counts as +, zeros never agree)."""
    out = torch.zeros_like(tensors[0]).reshape(-1)
    flat = [t.reshape(-1) for t in tensors]
    for j in range(out.numel()):
        vals = [float(t[j]) for t in flat]
        total = sum(vals) if sign == "total" else sum(math.copysign(1, x) if x else 0 for x in vals)
        gamma = 1.0 if total >= 0 else -1.0
        agree = [i for i, x in enumerate(vals) if x and math.copysign(1, x) == gamma]
        out[j] = sum(float(v[i]) * vals[i] for i in agree) / max(1, len(agree))
    return out.reshape(tensors[0].shape)


def _coefficients(trees, w):
    ws = [wi * float(t["layer"][lora.NAME]["scale"]) for wi, t in zip(w, trees)]
    return [math.copysign(math.sqrt(abs(x)), x) if x else 0.0 for x in ws], [math.sqrt(abs(x)) for x in ws]


def _combined_ref(kind, tensors, v, masks=None, sign="total", density=DENSITY):
    if kind in ("ties", "magnitude_prune"):
        tensors = [_trim_ref(t, density) for t in tensors]
    if kind.startswith("dare"):
        assert masks is not None
        tensors = [t * m / density for t, m in zip(tensors, masks)]
    if kind in ("ties", "dare_ties"):
        return _ties_ref(tensors, v, sign)
    return _total(vi * t for vi, t in zip(v, tensors))


def _dare_masks(trees, part, method):
    masks = []
    for i, t in enumerate(trees):
        lv = t["layer"][lora.NAME]
        shape = (lv["B"].shape[0], lv["A"].shape[1]) if part == "delta" else lv[part].shape
        masks.append(keep_mask(KEY, "layer", i, part, shape, DENSITY))
    return masks


@pytest.mark.parametrize(
    "method, sign", [(m, "total") for m in EQUAL_RANK_METHODS] + [("ties", "frequency"), ("dare_ties", "frequency")]
)
def test_factor_methods_match_a_float64_reference(method, sign):
    trees, w = _random_trees(), [0.8, -1.7, 0.35]
    a, b = _coefficients(trees, w)
    As = [t["layer"][lora.NAME]["A"] for t in trees]
    Bs = [t["layer"][lora.NAME]["B"] for t in trees]
    A_ref = _combined_ref(method, As, a, _dare_masks(trees, "A", method) if "dare" in method else None, sign)
    B_ref = _combined_ref(method, Bs, b, _dare_masks(trees, "B", method) if "dare" in method else None, sign)
    out = merge_adapters(trees, w, method=method, density=DENSITY, majority_sign_method=sign, key=KEY)["layer"][lora.NAME]
    assert out["A"].dtype == torch.float64 and float(out["scale"]) == 1.0
    assert rel_err(out["A"], A_ref) <= 1e-12 and rel_err(out["B"], B_ref) <= 1e-12
    if method == "linear":  # peft's linear: Σ w_i ΔW_i plus the cross terms b_i a_j B_i A_j
        exact = _total(wi * t["layer"][lora.NAME]["scale"] * B @ A for wi, t, A, B in zip(w, trees, As, Bs))
        cross = _total(b[i] * a[j] * Bs[i] @ As[j] for i, j in itertools.permutations(range(3), 2))
        assert rel_err(out["B"] @ out["A"], exact + cross) <= 1e-12


@pytest.mark.parametrize("method", ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("k", [2, 4, 100])
def test_svd_methods_give_the_best_rank_k_factors_of_the_combined_update(method, k):
    """Eckart–Young, checked without an SVD: ‖D − BA‖²_F equals the sum of the dropped eigenvalues of DᵀD, A has
    orthonormal rows, B orthogonal columns; k beyond min(d_out, d_in) = 5 keeps everything (BA = D)."""
    trees, w = _random_trees(), [0.8, -1.7, 0.35]
    deltas = [t["layer"][lora.NAME]["scale"] * t["layer"][lora.NAME]["B"] @ t["layer"][lora.NAME]["A"] for t in trees]
    kind = "linear" if method == "svd" else method.removesuffix("_svd")
    D = _combined_ref(kind, deltas, w, _dare_masks(trees, "delta", method) if "dare" in method else None)
    out = merge_adapters(trees, w, method=method, density=DENSITY, key=KEY, svd_rank=k)["layer"][lora.NAME]
    A, B = out["A"].detach(), out["B"].detach()
    kk = min(k, 5)
    assert A.shape == (kk, 7) and B.shape == (5, kk)
    lam = torch.linalg.eigvalsh(D @ D.T).flip(0)  # descending
    assert abs(float((D - B @ A).square().sum() - lam[kk:].sum())) <= 1e-10 * float(lam.sum())
    torch.testing.assert_close(A @ A.T, torch.eye(kk, dtype=torch.float64), rtol=0, atol=1e-12)
    gram = B.T @ B
    torch.testing.assert_close(gram, torch.diag(torch.diag(gram)), rtol=0, atol=1e-10)


def test_svd_clamp_clamps_at_the_quantile_of_both_factors():
    trees = _random_trees()
    free = merge_adapters(trees, WEIGHTS, method="svd", svd_rank=3)["layer"][lora.NAME]
    out = merge_adapters(trees, WEIGHTS, method="svd", svd_rank=3, svd_clamp=0.8)["layer"][lora.NAME]
    entries = torch.cat([free["B"].flatten(), free["A"].flatten()])
    c = torch.quantile(entries, 0.8)
    torch.testing.assert_close(out["B"], free["B"].clamp(-c, c), rtol=0, atol=0)
    torch.testing.assert_close(out["A"], free["A"].clamp(-c, c), rtol=0, atol=0)
    assert not torch.equal(out["B"], free["B"])  # B = U_k Σ_k holds the large entries


def test_cat_is_exact_for_any_signs_and_negation_cancels():
    trees, w = _random_trees(), [0.8, -1.7, 0.35]
    out = merge_adapters(trees, w, method="cat")["layer"][lora.NAME]
    exact = _total(
        wi * t["layer"][lora.NAME]["scale"] * t["layer"][lora.NAME]["B"] @ t["layer"][lora.NAME]["A"] for wi, t in zip(w, trees)
    )
    assert out["A"].shape == (9, 7) and rel_err(out["B"] @ out["A"], exact) <= 1e-14
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    p = lf.init(0, model, lf.LoRAConfig(r=2))
    p = {path: {n: {**lv, "B": torch.randn_like(lv["B"])} for n, lv in bv.items()} for path, bv in p.items()}
    x = torch.randn(5, 8)
    assert rel_err(lf.call(model, p, x), model(x)) > 1e-2
    assert rel_err(lf.call(model, merge_adapters([p, p], [1.0, -1.0], method="cat"), x), model(x)) <= 1e-6
    for s in (-1.0, 0.5):  # one adapter: scaling and negation of the task vector, exactly
        ((name, lv),) = merge_adapters([p], [s])["0"].items()
        src = p["0"][name]
        assert rel_err(lv["scale"] * lv["B"] @ lv["A"], s * src["scale"] * src["B"] @ src["A"]) <= 1e-6


def test_gain_merge_counts_a_missing_adapter_as_its_identity():
    g = [torch.tensor([1.5, 0.5, 2.0]), torch.tensor([0.25, 1.0, 3.0])]
    trees = [{"a": {ia3.NAME: {"g": g[0]}}, "b": {ia3_ff.NAME: {"g": g[1] + 1}}}, {"a": {ia3.NAME: {"g": g[1]}}}]
    out = merge_adapters(trees, [0.3, 0.7])
    torch.testing.assert_close(out["a"][ia3.NAME]["g"], 0.3 * g[0] + 0.7 * g[1])
    torch.testing.assert_close(out["b"][ia3_ff.NAME]["g"], 0.3 * (g[1] + 1) + 0.7)
    assert out["a"][ia3.NAME]["g"].requires_grad  # trainable, as declared


# ----------------------------------------------------------------------------- DARE's masks
def test_keep_masks_are_reproducible_and_have_the_density():
    m = keep_mask(KEY, "p", 0, "A", (128, 128), 0.3)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.3) < 0.01
    assert torch.equal(m, keep_mask(KEY, "p", 0, "A", (128, 128), 0.3))
    others = [keep_mask(KEY + 1, "p", 0, "A", (128, 128), 0.3), keep_mask(KEY, "q", 0, "A", (128, 128), 0.3)]
    others += [keep_mask(KEY, "p", 1, "A", (128, 128), 0.3), keep_mask(KEY, "p", 0, "B", (128, 128), 0.3)]
    for o in others:  # independent masks agree on about p² + (1 − p)² of the entries
        assert abs((o == m).float().mean().item() - (0.3**2 + 0.7**2)) < 0.02
    assert keep_mask(KEY, "p", 0, "A", (8, 8), 1.0).all()
    trees = _random_trees()
    same = [merge_adapters(trees, WEIGHTS, method="dare_ties", density=0.5, key=k)["layer"][lora.NAME]["A"] for k in (1, 1, 2)]
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])


# ----------------------------------------------------------------------------- vmap and gradients over the weights


@pytest.mark.parametrize("method", DARE_FREE + DARE)
def test_a_vmapped_sweep_over_weights_equals_the_loop(equal_ranks, method):
    _, trees = equal_ranks
    kw = {**_kwargs(method), "key": KEY}
    base = tiny("llama")
    with torch.no_grad():
        swept = torch.func.vmap(lambda w: logits(lf.call(base, merge_adapters(trees, w, method=method, **kw), IDS)))(SWEEP)
        loop = torch.stack([logits(lf.call(base, merge_adapters(trees, w, method=method, **kw), IDS)) for w in SWEEP])
    assert swept.shape == (3, *IDS.shape, 64)
    assert rel_err(swept, loop) <= 1e-5, rel_err(swept, loop)
    assert rel_err(loop[0], loop[1]) > 1e-3


def test_a_vmapped_sweep_with_svd_clamp_equals_the_loop(mixed_ranks):
    _, trees = mixed_ranks
    f = lambda w: merge_adapters(trees, w, method="svd", svd_rank=3, svd_clamp=0.95)
    swept = torch.func.vmap(f)(SWEEP)
    for s, w in enumerate(SWEEP):
        for path, bv in f(w).items():
            for leaf, v in bv[lora.NAME].items():
                assert rel_err(swept[path][lora.NAME][leaf][s], v) <= 1e-5, (path, leaf)


@pytest.fixture(scope="module")
def double():
    """A float64 MLP (llama's RMSNorm and rotary embedding compute in float32, too coarse for finite differences) and
    three adapters on different target sets."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        *(m for d in (12, 16, 16) for m in (torch.nn.Linear(d, 16), torch.nn.Tanh())), torch.nn.Linear(16, 5)
    )
    net = net.double().eval()
    trees = []
    for k, targets in enumerate((r"^(0|2)$", r"^(0|2|4)$", r"^(2|4|6)$")):
        p = lf.init(k, net, lf.LoRAConfig(r=3, alpha=2.0 + k), targets=targets)
        trees.append({path: {n: {**lv, "B": torch.randn_like(lv["B"])} for n, lv in bv.items()} for path, bv in p.items()})
    return net, trees


@pytest.mark.parametrize("method, options", [(m, {}) for m in DARE_FREE + DARE] + [("svd", {"svd_clamp": 0.9, "svd_rank": 2})])
def test_gradient_with_respect_to_the_weights_matches_finite_differences(double, method, options):
    net, trees = double
    kw = {**_kwargs(method), "key": KEY, **options}
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cot = torch.randn(4, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def loss(w):
        return (lf.call(net, merge_adapters(trees, w, method=method, **kw), x) * cot).sum()

    w = torch.tensor(WEIGHTS, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(w), w)
    eps = 1e-6
    with torch.no_grad():
        fd = torch.stack([(loss(w + eps * e) - loss(w - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=torch.float64)])
    assert rel_err(g, fd) <= 1e-6, (g, fd)
    assert g.abs().min() > 0


def test_merged_tree_from_numbers_is_trainable_as_declared(equal_ranks):
    _, trees = equal_ranks
    merged = merge_adapters(trees, WEIGHTS, method="svd")
    leaves = merged[Q][lora.NAME]
    assert leaves["A"].requires_grad and leaves["B"].requires_grad and not leaves["scale"].requires_grad
    assert leaves["A"].is_leaf and len(lf.trainable(merged)) == 2 * len(merged)


# ----------------------------------------------------------------------------- refusals
def _bad_cases():
    t = _random_trees()
    other_width = _random_trees(d_in=9)
    hra_like = [{"layer": {lf.HRAConfig.variant_name: {"U": torch.randn(7, 2)}}}] * 2
    stacked = {"layer": {lora.NAME: {k: torch.stack([v, v]) for k, v in t[0]["layer"][lora.NAME].items()}}}
    mixed = [t[0], {"layer": {lf.EVAConfig.variant_name: t[1]["layer"][lora.NAME]}}]
    return [
        ([], [], {}, ValueError, "adapters is empty"),
        (t[0], [1.0], {}, TypeError, "got one tree"),
        (t, [1.0, 2.0], {}, ValueError, "2 weights for 3 adapters"),
        (t, torch.ones(2), {}, ValueError, "2 weights for 3 adapters"),
        (t, torch.ones(3, 1), {}, ValueError, r"1-D floating tensor of 3.*shape \(3, 1\)"),
        (t, [1.0, float("nan"), 1.0], {}, ValueError, r"weights\[1\]=nan must be a finite number"),
        (t, [1.0, True, 1.0], {}, ValueError, r"weights\[1\]=True"),
        (t, torch.tensor([1.0, float("inf"), 0.0]), {}, ValueError, "not all finite"),
        (t, WEIGHTS, {"method": "mean"}, ValueError, r"method='mean' is not one of \['linear', 'cat', 'svd'"),
        (t[:1], [1.0], {"method": "mean"}, ValueError, r"method='mean' is not one of"),
        (t, WEIGHTS, {"method": "ties"}, ValueError, r"method='ties' needs density="),
        (t, WEIGHTS, {"method": "ties", "density": 0.0}, ValueError, r"density=0.0 must be a number in \(0, 1\]"),
        (t, WEIGHTS, {"method": "ties", "density": 1.5}, ValueError, r"density=1.5 must be a number in \(0, 1\]"),
        (t, WEIGHTS, {"method": "ties", "density": 0.5, "majority_sign_method": "max"}, ValueError, "majority_sign_method='max'"),
        (t, WEIGHTS, {"method": "dare_linear", "density": 0.5}, ValueError, r"needs key= \(an int seed"),
        (t, WEIGHTS, {"method": "dare_linear", "density": 0.5, "key": 0.5}, TypeError, "key=0.5 is not a key"),
        (t, WEIGHTS, {"method": "svd", "svd_rank": 0}, ValueError, "svd_rank=0 must be a positive int"),
        (t, WEIGHTS, {"method": "svd", "svd_clamp": 1.2}, ValueError, r"svd_clamp=1.2 must be a quantile in \[0, 1\]"),
        (t, WEIGHTS, {"method": "svd", "svd_driver": "gesdd"}, ValueError, "svd_driver='gesdd' is not one of"),
        (t, WEIGHTS, {"method": "svd", "svd_driver": "gesvd"}, ValueError, "for CUDA tensors only; layer 'layer' is on cpu"),
        (t, WEIGHTS, {"method": "svd", "svd_full_matrices": 1}, TypeError, "svd_full_matrices=1 must be True or False"),
        (
            t[:2] + other_width[:1],
            WEIGHTS,
            {"method": "cat"},
            ValueError,
            r"has \(d_out, d_in\) \{0: \(5, 7\), 1: \(5, 7\), 2: \(5, 9\)\}",
        ),
        ([stacked, stacked], [1.0, 1.0], {}, ValueError, r"is stacked \(a leading axis of 2 adapters.*lf.unstack"),
        (mixed, [1.0, 1.0], {}, ValueError, r"layer 'layer' holds different variants across the adapters"),
        (
            hra_like,
            [1.0, 1.0],
            {},
            ValueError,
            r"holds variant 'hra' with leaves \['U'\], for which no adapter arithmetic.*\['A', 'B', 'scale'\]",
        ),
        ([{"layer": {"nope": {}}}], [1.0], {}, KeyError, "unknown variant 'nope'"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_name_the_value_and_the_fix(case):
    adapters, weights, kwargs, error, pattern = _bad_cases()[case]
    with pytest.raises(error, match=pattern):
        merge_adapters(adapters, weights, **kwargs)


def test_examples_run():
    assert doctest.testmod(merging, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE).failed == 0
