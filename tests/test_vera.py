"""VeRA: the shared projections equal peft's bit for bit, parity with peft's VeraConfig (outputs and gradients, on
nn.Linear, Conv1D and a 4-bit base), a float64 reference from the paper's formula, peft files both ways, padding,
routing, and the errors."""

import copy
import json
import os

import peft
import pytest
import torch
from helpers import assert_config_refused, assert_matches_reference, make_layer, moved, rel_err
from models import logits, tiny, tokens
from safetensors.torch import load_file, save_file
from torch import nn

import lite_fn as lf
from lite_fn import variants
from lite_fn._contract import PeftLayer
from lite_fn.variants import vera
from lite_fn.variants.vera import VeRAConfig

IDS = tokens(2, 6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a busy machine: one intra-op thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def largest(model, paths):
    """(max d_out, max d_in) over the modules at ``paths`` (what peft sizes vera_A / vera_B by)."""
    shapes = [_dense_shape(model.get_submodule(p)) for p in paths]
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def _dense_shape(m) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or a Conv1D (which stores its weight as (d_in, d_out))."""
    rows, cols = int(m.weight.shape[0]), int(m.weight.shape[1])
    return (cols, rows) if type(m).__name__ == "Conv1D" else (rows, cols)


def moved_peft(base, cfg, seed=0, **kwargs):
    """peft's get_peft_model on a copy of base, with λ_b and λ_d of every layer moved off their init."""
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lambda_b" in name else 1.0))
    return pm.eval()


def out(model, x=IDS, **kwargs):
    with torch.no_grad():
        return logits(model(x, **kwargs))


def lite_out(base, params, x=IDS, **kwargs):
    with torch.no_grad():
        return logits(lf.call(base, params, x, **kwargs))


def peft_params(pm, paths):
    """lite_fn params holding the tensors of peft's model: per layer its slices of the shared projections."""
    params = {}
    for p in paths:
        layer = pm.base_model.model.get_submodule(p)
        A, B = layer.vera_A["default"], layer.vera_B["default"]
        params[p] = {
            "vera": {
                "A": A[:, : layer.in_features].detach().clone(),
                "B": B[: layer.out_features].detach().clone(),
                "lambda_d": layer.vera_lambda_d["default"].detach().clone().requires_grad_(True),
                "lambda_b": layer.vera_lambda_b["default"].detach().clone().requires_grad_(True),
            }
        }
    return params


def targeted(pm):
    return [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "vera_lambda_b")]


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), r"r=0 must be a positive int"),
        (dict(r=2.5), r"r=2.5"),
        (dict(d_initial=float("nan")), r"d_initial=nan must be a finite number"),
        (dict(d_initial="0.1"), r"d_initial='0.1'"),
        (dict(projection_prng_key=True), r"projection_prng_key=True must be an int seed.*projection_prng_key=0"),
        (dict(projection_prng_key=1.5), r"projection_prng_key=1.5"),
        (dict(projection_prng_key=2**64), r"projection_prng_key=18446744073709551616 .*2\*\*64"),
        (dict(projection_shape=(8,)), r"projection_shape=\(8,\) must be None or \(D_out, D_in\)"),
        (dict(projection_shape=(8, 0)), r"projection_shape's D_in=0 must be a positive int"),
        (dict(projection_shape="8x8"), r"projection_shape='8x8'"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_config_values(kwargs, match):
    assert_config_refused(VeRAConfig, kwargs, match)


def test_config_normalises_a_list_shape_and_is_hashable():
    cfg = VeRAConfig(r=4, projection_shape=[40, 30])  # pyright: ignore[reportArgumentType]  (a list on purpose)
    assert cfg.projection_shape == (40, 30) and hash(cfg) == hash(VeRAConfig(r=4, projection_shape=(40, 30)))


def test_projection_shape_smaller_than_the_layer_is_refused_with_a_shape_that_works():
    W, _ = make_layer(24, 16)
    with pytest.raises(ValueError, match=r"projection_shape=\(20, 30\) does not cover W of shape \(24, 16\).*\(24, 30\)"):
        vera.init(0, W, VeRAConfig(r=4, projection_shape=(20, 30)))
    vera.init(0, W, VeRAConfig(r=4, projection_shape=(24, 30)))  # the suggestion works


def test_params_from_another_width_are_refused_naming_both():
    p = vera.init(0, make_layer(16, 12)[0], VeRAConfig(r=4))
    W, b = make_layer(24, 12)
    with pytest.raises(ValueError, match=r"B of shape \(16, 4\) do not fit W of shape \(24, 12\).*B \(24, r\)"):
        vera.apply(p, W, torch.randn(2, 12), b)
    model = tiny("llama")
    small = lf.init(0, model, VeRAConfig(r=4), targets=r"layers\.0\.self_attn\.k_proj$")  # (16, 32)
    wrong = {"model.layers.0.self_attn.q_proj": small["model.layers.0.self_attn.k_proj"]}  # q_proj is (32, 32)
    with pytest.raises(ValueError, match=r"\['B'\] has shape \(16, 4\) but vera on W of shape \(32, 32\) needs \(32, 4\)"):
        lf.call(model, wrong, IDS)


# ----------------------------------------------------------------------------- init: peft's projections
def test_leaves_and_identity_at_init():
    W, b = make_layer(24, 16)
    p = vera.init(0, W, VeRAConfig(r=6, d_initial=0.3))
    assert {k: tuple(v.shape) for k, v in p.items()} == {"A": (6, 16), "B": (24, 6), "lambda_d": (6,), "lambda_b": (24,)}
    assert {k for k, v in p.items() if v.requires_grad} == vera.TRAINABLE == {"lambda_d", "lambda_b"}
    assert torch.equal(p["lambda_d"], torch.full((6,), 0.3)) and torch.equal(p["lambda_b"], torch.zeros(24))
    x = torch.randn(3, 5, 16)
    assert torch.equal(vera.apply(p, W, x, b), torch.nn.functional.linear(x, W, b))  # λ_b = 0: exact
    model = tiny("llama")
    assert torch.equal(lite_out(model, lf.init(0, model, VeRAConfig(r=4), targets=r"_proj$")), out(model))


@pytest.mark.parametrize("r,key", [(4, 0), (8, 123)])
def test_projections_equal_peft_bit_for_bit_on_one_layer(r, key):
    W, b = make_layer(24, 16)
    layer = peft_linear_vera(W, b, r=r, projection_prng_key=key)
    p = vera.init(7, W, VeRAConfig(r=r, projection_prng_key=key))
    assert torch.equal(p["A"], layer.vera_A["default"]) and torch.equal(p["B"], layer.vera_B["default"])
    # lite_fn's key plays no part (peft's projections come from projection_prng_key); another seed does
    assert torch.equal(vera.init(8, W, VeRAConfig(r=r, projection_prng_key=key))["A"], p["A"])
    assert not torch.equal(vera.init(7, W, VeRAConfig(r=r, projection_prng_key=key + 1))["A"], p["A"])


def peft_linear_vera(W, b, **kwargs):
    from helpers import peft_linear

    return peft_linear(W, b, peft.VeraConfig, **kwargs)


def test_projections_are_slices_of_peft_shared_pair_on_mixed_shapes():
    """all-linear on Llama: q/o (32, 32), k/v (16, 32), gate/up (64, 32), down (32, 64): peft's vera_A is (r, 64)
    and vera_B (64, r); each layer's A, B are its slices, and lf.init with that projection_shape gives them exactly."""
    base = tiny("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules="all-linear", projection_prng_key=9))
    paths = targeted(pm)
    assert len({_dense_shape(base.get_submodule(p)) for p in paths}) == 4
    ours = lf.init(0, base, VeRAConfig(r=4, projection_prng_key=9, projection_shape=(64, 64)), targets=paths)
    theirs = peft_params(pm, paths)
    for p in paths:
        for leaf in ("A", "B"):
            assert torch.equal(ours[p]["vera"][leaf], theirs[p]["vera"][leaf]), (p, leaf)
    own_size = vera.init(0, torch.zeros(_dense_shape(base.get_submodule(paths[0]))), VeRAConfig(r=4, projection_prng_key=9))
    assert not torch.equal(own_size["A"], ours[paths[0]]["vera"]["A"])  # the slice depends on the full shape


def test_plan_gives_every_layer_the_largest_shape():
    cfgs = {"a": VeRAConfig(r=4), "b": VeRAConfig(r=4), "c": None, "d": VeRAConfig(r=4, projection_shape=(99, 99))}
    dims = {"a": (32, 16), "b": (8, 48), "c": (500, 500), "d": (4, 4)}
    got = vera.plan({}, cfgs, dims)
    assert got["a"] == got["b"] == VeRAConfig(r=4, projection_shape=(32, 48))  # "c" has no adapter: not counted
    assert got["c"] is None and got["d"] is cfgs["d"]
    assert variants.get("vera").plan is vera.plan


def test_lf_init_sizes_the_projections_over_all_targets_like_peft():
    base = tiny("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules="all-linear"))
    ours = lf.init(0, base, VeRAConfig(r=4), targets=r"_proj$")
    theirs = peft_params(pm, targeted(pm))
    assert all(torch.equal(ours[p]["vera"]["A"], theirs[p]["vera"]["A"]) for p in theirs)


# ----------------------------------------------------------------------------- parity with peft (perturbed)
class Tiny(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.a, self.b = nn.Linear(12, 16, bias=bias), nn.Linear(16, 24, bias=bias)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kwargs", [dict(r=4), dict(r=8, d_initial=0.5, projection_prng_key=3), dict(r=2, bias=False)], ids=str)
def test_peft_parity_outputs_and_grads(kwargs):
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", True)
    torch.manual_seed(0)
    base = Tiny(bias)
    ref = moved_peft(base, peft.VeraConfig(target_modules=["a", "b"], **kwargs), seed=1)
    assert tuple(ref.base_model.vera_A["default"].shape) == (kwargs["r"], 16)  # shared: the largest d_in over a, b
    params = peft_params(ref, ["a", "b"])

    def ours(x):
        h = torch.tanh(vera.apply(params["a"]["vera"], base.a.weight, x, base.a.bias))
        return vera.apply(params["b"]["vera"], base.b.weight, h, base.b.bias)

    leaves = []
    for name in ("a", "b"):
        layer = ref.base_model.model.get_submodule(name)
        leaves += [((name, "lambda_d"), params[name]["vera"]["lambda_d"], layer.vera_lambda_d["default"])]
        leaves += [((name, "lambda_b"), params[name]["vera"]["lambda_b"], layer.vera_lambda_b["default"])]
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(2))
    y_ref, _ = assert_matches_reference(ref, ours, x, leaves, cotangent=3, tag=(kwargs,))
    assert rel_err(y_ref, base(x)) > 1e-2  # the perturbed adapter acts


def test_merge_matches_peft_merge():
    torch.manual_seed(1)
    base = Tiny()
    ref = moved_peft(base, peft.VeraConfig(r=4, target_modules=["a", "b"]), seed=2)
    params = peft_params(ref, ["a", "b"])
    merged = copy.deepcopy(ref).merge_and_unload()
    for name in ("a", "b"):
        layer = getattr(base, name)
        W, b = variants.dense_weights(variants.get("vera"), params[name]["vera"], layer.weight, layer.bias)
        assert rel_err(W, merged.get_submodule(name).weight) <= 1e-6, name
        assert b is not None and torch.equal(b, layer.bias), name  # VeRA leaves the bias alone


def test_conv1d_gpt2_matches_peft():
    """GPT-2's Conv1D stores (d_in, d_out); lite_fn hands VeRA W as (d_out, d_in), so the slices are the same."""
    base = tiny("gpt2")
    pm = moved_peft(base, peft.VeraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]), seed=3)
    paths = targeted(pm)
    shape = largest(base, paths)
    assert shape == (128, 128)
    ours = lf.init(0, base, VeRAConfig(r=4, projection_shape=shape), targets=paths)
    theirs = peft_params(pm, paths)
    for p in paths:
        assert torch.equal(ours[p]["vera"]["A"], theirs[p]["vera"]["A"]) and torch.equal(
            ours[p]["vera"]["B"], theirs[p]["vera"]["B"]
        )
    got, want = lite_out(base, theirs), out(pm)
    assert rel_err(got, want) <= 1e-5 and rel_err(want, out(base)) > 1e-3


# ----------------------------------------------------------------------------- float64 reference (paper eq. 2)
def _reference(W, b, A, B, lam_d, lam_b, x):
    """h = W0 x + Λ_b B Λ_d A x per token, Λ = diag(λ), as the paper writes it (column vectors), in float64."""
    dW = torch.diag(lam_b) @ B @ torch.diag(lam_d) @ A
    return torch.stack([W @ xi + dW @ xi + b for xi in x.reshape(-1, x.shape[-1])]).reshape(*x.shape[:-1], -1)


def test_float64_reference():
    g = torch.Generator().manual_seed(4)
    W, b = (t.double() for t in make_layer(20, 12, seed=5))
    p = {k: v.detach().double() for k, v in vera.init(0, W, VeRAConfig(r=6)).items()}
    p["lambda_d"] = torch.randn(6, generator=g, dtype=torch.float64)
    p["lambda_b"] = torch.randn(20, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, 12, generator=g, dtype=torch.float64)
    want = _reference(W, b, p["A"], p["B"], p["lambda_d"], p["lambda_b"], x)
    assert rel_err(vera.apply(p, W, x, b), want) <= 1e-12
    swapped = {**p, "lambda_d": p["lambda_d"].flip(0)}  # λ_d acts on the rank axis: order matters
    assert rel_err(vera.apply(swapped, W, x, b), want) > 1e-3


def test_projection_distribution_is_kaiming_gain_sqrt2():
    """A* ~ U(±√(6/D_in)), B* ~ U(±√(6/r)): bounds, and means/variances close to the uniform's."""
    r, D_out, D_in = 64, 300, 200
    W, _ = make_layer(D_out, D_in)
    p = vera.init(0, W, VeRAConfig(r=r))
    for t, bound in ((p["A"], (6 / D_in) ** 0.5), (p["B"], (6 / r) ** 0.5)):
        assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.99 * bound
        assert abs(float(t.var()) - bound**2 / 3) < 0.03 * bound**2 / 3


def test_dropout_acts_on_the_adapter_input_only():
    W, b = make_layer(20, 12, seed=1)
    p = moved({"l": {"vera": vera.init(0, W, VeRAConfig(r=4, dropout=0.25))}}, seed=2)["l"]["vera"]
    assert float(p["dropout"]) == 0.25 and not p["dropout"].requires_grad
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(5, 12, generator=torch.Generator().manual_seed(4))
    xd = torch.where(noise >= 0.25, x / 0.75, torch.zeros(()))
    dropped = {k: v.detach().double() for k, v in p.items()}
    want = _reference(W.double(), b.double(), dropped["A"], dropped["B"], dropped["lambda_d"], dropped["lambda_b"], xd.double())
    want = want - xd.double() @ W.double().T + x.double() @ W.double().T  # the base product sees x itself
    assert rel_err(vera.apply(p, W, x, b, noise), want) <= 1e-6
    assert torch.equal(vera.apply(p, W, x, b), vera.apply({k: v for k, v in p.items() if k != "dropout"}, W, x, b))


# ----------------------------------------------------------------------------- many adapters: pad, route, vmap
def _adapters():
    base = tiny("llama")
    a = moved(lf.init(0, base, VeRAConfig(r=4), targets=r"(q_proj|down_proj)$"), 1)
    b = moved(lf.init(0, base, VeRAConfig(r=8, projection_prng_key=5, projection_shape=(64, 64)), targets=r"q_proj$"), 2)
    return base, [a, b]


def test_pad_is_exact_across_ranks_and_target_sets():
    base, adapters = _adapters()
    stacked = lf.stack(adapters, pad=True)
    q = stacked["model.layers.0.self_attn.q_proj"]["vera"]
    assert tuple(q["A"].shape) == (2, 8, 32) and tuple(q["lambda_d"].shape) == (2, 8)
    x = tokens(2, 6, seed=3)
    routed = lite_out(base, stacked, x, route=torch.tensor([0, 1]))
    for k, a in enumerate(adapters):
        assert rel_err(routed[k], lite_out(base, a, x[k : k + 1])[0]) <= 1e-5, k
    for k, a in enumerate(lf.unstack(stacked)):  # each padded adapter alone computes what it did
        assert rel_err(lite_out(base, a, x), lite_out(base, adapters[k], x)) <= 1e-5, k


def test_route_runs_and_vmap_equal_the_loop():
    base = tiny("llama")
    adapters = [moved(lf.init(0, base, VeRAConfig(r=4), targets=r"_proj$"), s) for s in range(3)]
    stacked = lf.stack(adapters)
    x = tokens(6, 5, seed=4)
    loop = [lite_out(base, a, x) for a in adapters]
    runs = lite_out(base, stacked, x, route=torch.arange(3).repeat_interleave(2))  # apply_runs
    mixed = lite_out(base, stacked, x, route=torch.tensor([2, 0, 1, 1, 0, 2]))  # per example
    for i, k in enumerate([0, 0, 1, 1, 2, 2]):
        assert rel_err(runs[i], loop[k][i]) <= 1e-5
    for i, k in enumerate([2, 0, 1, 1, 0, 2]):
        assert rel_err(mixed[i], loop[k][i]) <= 1e-5
    with torch.no_grad():
        vm = torch.func.vmap(lambda p: logits(lf.call(base, p, x)))(stacked)
    assert max(rel_err(vm[k], loop[k]) for k in range(3)) <= 1e-5


def test_training_moves_only_the_vectors():
    base = tiny("llama")
    params = lf.init(0, base, VeRAConfig(r=4), targets=r"(q_proj|v_proj)$")
    frozen = {p: {k: v.clone() for k, v in bv["vera"].items() if not v.requires_grad} for p, bv in params.items()}
    loss = logits(lf.call(base, params, IDS)).square().mean()
    grads = torch.autograd.grad(loss, [v for bv in params.values() for v in bv["vera"].values() if v.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # λ_b gets a gradient at init (λ_d = d_initial ≠ 0)
    assert all(torch.equal(params[p]["vera"][k], v) for p, f in frozen.items() for k, v in f.items())


# ----------------------------------------------------------------------------- peft files
def _peft_dir(tmp_path, base, cfg, seed=0, name="adapter"):
    pm = moved_peft(base, cfg, seed=seed)
    d = tmp_path / name
    pm.save_pretrained(d)
    return pm, d


def _from_pretrained(base, d):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()


class _Cfg:
    """The peft config as the proposed room gives it to codecs (lite_fn._contract.PeftConfig, plus ``dims``)."""

    def __init__(self, fields, dims):
        self.fields, self.dims, self.where, self.file = fields, dims, "peft config 'test'", "adapter_model.safetensors"

    def get(self, field, default=None):
        return self.fields.get(field, default)

    def per_path(self, pattern, field, default, path):
        return self.fields.get(field, default)

    def rank(self, path, found, what):
        if found != self.fields["r"]:
            raise ValueError(f"{path}.{what} has rank {found} but r={self.fields['r']}")
        return found


class _Writer:
    """lite_fn._contract.PeftWriter (VeRA's config writes no patterns)."""

    def pattern(self, wanted, default):
        raise AssertionError("VeRA writes no *_pattern")

    def number(self, x):
        return x


def _codec_read(d, model):
    """The codec's reading of a peft directory, fed as the proposed room feeds it: the model-level
    base_model.vera_A / vera_B in every layer's tensors, every target's (d_out, d_in) in cfg.dims."""
    with open(os.path.join(d, "adapter_config.json")) as f:
        fields = json.load(f)
    stored = load_file(os.path.join(d, "adapter_model.safetensors"))
    shared = {
        k.removeprefix("base_model."): t for k, t in stored.items() if k.removeprefix("base_model.") in ("vera_A", "vera_B")
    }
    layers = {}
    for k, t in stored.items():
        if k.startswith("base_model.model."):
            path, suffix = k.removeprefix("base_model.model.").rsplit(".", 1)
            layers.setdefault(path, dict(shared))[suffix] = t
    dims = {p: _dense_shape(model.get_submodule(p)) for p in layers}
    cfg = _Cfg(fields, dims)
    params = {}
    for p, tensors in layers.items():
        W = torch.zeros(dims[p])  # the codec reads W's shape only
        layer = PeftLayer(p, type(model.get_submodule(p)).__name__, W, tensors)
        assert set(tensors) == set(vera._peft_tensors(cfg, layer)), p
        leaves = vera._peft_read(cfg, layer)
        params[p] = {"vera": {k: v.clone().requires_grad_(k in vera.TRAINABLE) for k, v in leaves.items()}}
    return params


@pytest.mark.parametrize("save_projection", [True, False])
def test_codec_reads_peft_files(save_projection, tmp_path):
    base = tiny("llama")
    _, d = _peft_dir(
        tmp_path, base, peft.VeraConfig(r=4, target_modules="all-linear", projection_prng_key=2, save_projection=save_projection)
    )
    stored = load_file(os.path.join(d, "adapter_model.safetensors"))
    assert ("base_model.vera_A" in stored) == save_projection  # model-level keys: no module path
    params = _codec_read(d, base)
    assert rel_err(lite_out(base, params), out(_from_pretrained(base, d))) <= 1e-5
    assert rel_err(lite_out(base, params), out(base)) > 1e-3


def test_codec_writes_files_peft_loads(tmp_path):
    base = tiny("llama")
    paths = [n for n, _ in base.named_modules() if n.endswith(("k_proj", "o_proj", "down_proj"))]
    params = moved(lf.init(0, base, VeRAConfig(r=4, projection_shape=largest(base, paths)), targets=paths), 4)
    layers, facts, tensors = [], [], {}
    for p, bv in params.items():
        layer = PeftLayer(p, "Linear", bv["vera"]["A"].new_empty(_dense_shape(base.get_submodule(p))), {})
        written, fact = vera._peft_write(bv["vera"], layer)
        tensors.update({f"base_model.model.{p}.{s}": t.contiguous() for s, t in written.items()})
        layers.append(layer)
        facts.append(fact)
    cfg = {"peft_type": "VERA", "target_modules": paths, **vera._peft_config(layers, facts, _Writer())}
    tensors.update({f"base_model.{k}": t.contiguous() for k, t in vera._peft_shared(layers, facts).items()})
    d = tmp_path / "written"
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert tuple(tensors["base_model.vera_A"].shape) == (4, 64) and tuple(tensors["base_model.vera_B"].shape) == (32, 4)
    assert rel_err(out(_from_pretrained(base, d)), lite_out(base, params)) <= 1e-5


def test_codec_refuses_projections_that_are_not_one_shared_pair():
    base = tiny("llama")
    a = lf.init(0, base, VeRAConfig(r=4), targets=r"layers\.0\.self_attn\.q_proj$")
    b = lf.init(0, base, VeRAConfig(r=4, projection_prng_key=1), targets=r"layers\.1\.self_attn\.q_proj$")
    layers = [PeftLayer(p, "Linear", torch.zeros(32, 32), {}) for p in (*a, *b)]
    facts = [vera._peft_write(bv["vera"], layer)[1] for bv, layer in zip([*a.values(), *b.values()], layers)]
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj.*not slices.*one shared pair per adapter"):
        vera._peft_shared(layers, facts)
    c = lf.init(0, base, VeRAConfig(r=8), targets=r"layers\.1\.self_attn\.q_proj$")
    facts[1] = vera._peft_write(next(iter(c.values()))["vera"], layers[1])[1]
    with pytest.raises(ValueError, match=r"one r per adapter"):
        vera._peft_config(layers, facts, _Writer())


LOAD = {
    "all-linear": ("llama", dict(r=4, target_modules="all-linear")),
    "no-projection-saved": (
        "llama",
        dict(r=4, target_modules=["k_proj", "down_proj"], projection_prng_key=7, save_projection=False),
    ),
    "layers_to_transform": (
        "llama",
        dict(r=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "dropout-d_initial-ignored": ("llama", dict(r=4, target_modules=["v_proj"], vera_dropout=0.3, d_initial=0.7)),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"])),
}


@pytest.mark.parametrize("case", list(LOAD))
def test_load_peft_equals_from_pretrained(case, tmp_path):
    kind, kwargs = LOAD[case]
    base = tiny(kind)
    _, d = _peft_dir(tmp_path, base, peft.VeraConfig(**kwargs))
    params = lf.load_peft(d, model=base)
    assert {n for bv in params.values() for n in bv} == {"vera"}
    assert rel_err(lite_out(base, params), out(_from_pretrained(base, d))) <= 1e-5
    assert rel_err(lite_out(base, params), out(base)) > 1e-3
    for bv in params.values():
        assert {k for k, v in bv["vera"].items() if v.requires_grad} == vera.TRAINABLE


@pytest.mark.parametrize("kind,targets", [("llama", r"(k_proj|o_proj|down_proj)$"), ("gpt2", r"(c_attn|c_fc)$")])
def test_save_peft_loads_in_peft_and_round_trips(kind, targets, tmp_path):
    base = tiny(kind)
    paths = [n for n, _ in base.named_modules() if n and __import__("re").search(targets, n)]
    params = moved(lf.init(0, base, VeRAConfig(r=4, projection_shape=largest(base, paths)), targets=targets), 5)
    lf.save_peft(tmp_path / "out", params, model=base)
    stored = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(stored)
    assert rel_err(out(_from_pretrained(base, tmp_path / "out")), lite_out(base, params)) <= 1e-5
    back = lf.load_peft(tmp_path / "out", model=base)
    for p, bv in params.items():
        for k, v in bv["vera"].items():
            assert torch.equal(back[p]["vera"][k], v), (p, k)


def test_load_peft_refuses_what_it_cannot_reproduce(tmp_path):
    base = tiny("llama")
    _, d = _peft_dir(tmp_path, base, peft.VeraConfig(r=4, target_modules=["q_proj"]), name="cut")
    stored = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v for k, v in stored.items() if k != "base_model.vera_B"}, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) \['vera_B'\]"):
        lf.load_peft(d, model=base)


# ----------------------------------------------------------------------------- a 4-bit base
def test_parity_with_peft_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    import warnings

    import transformers as tf
    from models import small_config

    torch.manual_seed(0)
    config = small_config(
        tf.LlamaConfig, hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64
    )
    tf.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama")

    def quantized():
        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=q, device_map="cpu").train()

    ours_model = quantized()
    pm = moved_peft(quantized(), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=6).train()
    paths = targeted(pm)
    params = lf.init(0, ours_model, VeRAConfig(r=8, projection_shape=(64, 128)), targets=paths)  # peft: (max d_out, max d_in)
    theirs = peft_params(pm, paths)
    for p in paths:
        assert torch.equal(params[p]["vera"]["A"], theirs[p]["vera"]["A"]) and torch.equal(
            params[p]["vera"]["B"], theirs[p]["vera"]["B"]
        )
    x = tokens(3, 6, seed=1)
    ref, ours = pm(x).logits, lf.call(ours_model, theirs, x).logits
    assert rel_err(ours, ref) <= 1e-5 and rel_err(ref, ours_model(x).logits) > 1e-3
    ref.square().mean().backward()
    ours.square().mean().backward()
    for p in paths:
        layer = pm.base_model.model.get_submodule(p)
        for leaf in ("lambda_d", "lambda_b"):
            assert rel_err(theirs[p]["vera"][leaf].grad, getattr(layer, f"vera_{leaf}")["default"].grad) <= 1e-4, (p, leaf)


def test_stacked_adapters_share_the_projections():
    """K VeRA adapters of one projection key hold A, B once when stacked (stride 0 on K): the point of VeRA's
    shared random pair; vmap and route still equal the loop."""
    net = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16))
    gen = torch.Generator().manual_seed(0)
    ps = []
    for k in range(6):
        p = lf.init(k, net, VeRAConfig(r=8))
        ps.append(
            {
                q: {"vera": {**lv["vera"], "lambda_b": torch.randn(lv["vera"]["lambda_b"].shape, generator=gen)}}
                for q, lv in p.items()
            }
        )
    stacked = lf.stack(ps)
    for q in stacked:
        leaves = stacked[q]["vera"]
        assert leaves["A"].stride(0) == 0 and leaves["B"].stride(0) == 0, q
        assert leaves["lambda_b"].stride(0) != 0 and leaves["lambda_d"].stride(0) != 0, q
    x = torch.randn(6, 3, 24, generator=gen)
    loop = torch.stack([lf.call(net, p, x[k]) for k, p in enumerate(ps)])
    assert torch.allclose(torch.func.vmap(lambda p, xk: lf.call(net, p, xk))(stacked, x), loop, atol=1e-6)
    routed = lf.call(net, stacked, x[:, 0], route=torch.arange(6))
    assert torch.allclose(routed, loop[:, 0], atol=1e-6)
