"""The model runtime on tiny Hugging Face models (Llama, Qwen2, GPT-2 with Conv1D, BERT)."""

import pytest
import torch
from cases import all_cases, case_id
from helpers import moved, needs_calibration, rel_err, steered
from models import logits, tiny, tokens
from torch.func import vmap

import lite_fn as lf

CASES = all_cases()
IDS = [case_id(c) for c in CASES]
CALIB = [tokens(2, 6, seed=100 + i) for i in range(3)]


def model_params(cfg, model, key=0, **kw):
    return lf.init(key, model, cfg, calibration=CALIB if needs_calibration(cfg, model) else None, progress=False, **kw)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
def test_call_is_model_and_leaves_it_untouched(kind):
    model, x = tiny(kind), tokens()
    before, n_modules = snapshot(model), len(list(model.modules()))
    params = lf.init(0, model, lf.LoRAConfig(r=4), progress=False)
    assert params, "default targets found nothing"
    assert all(not p.endswith(("lm_head", "classifier")) for p in params)
    out = lf.call(model, moved(params, 1), x)
    assert not torch.equal(logits(out), logits(model(x)))  # the adapters did act
    assert torch.equal(logits(lf.call(model, params, x)), logits(model(x)))  # identity at init
    with pytest.raises(IndexError):
        lf.call(model, params, torch.full((1, 3), 10_000))  # raises inside the forward
    assert_untouched(model, before)
    assert len(list(model.modules())) == n_modules


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_variant_identity_through_model(case):
    _, cfg = case
    model, x = tiny("llama"), tokens()
    params = steered(model_params(cfg, model), 0.0)
    assert rel_err(logits(lf.call(model, params, x)), logits(model(x))) <= 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_many_adapters_and_routed_batch(case):
    _, cfg = case
    model, x = tiny("llama"), tokens(3, 5)
    base = steered(model_params(cfg, model), 1.0)
    ps = [moved(base, 10 * k) for k in range(3)]
    stacked = lf.stack(ps)
    got = vmap(lambda p: logits(lf.call(model, p, x)))(stacked)
    want = torch.stack([logits(lf.call(model, p, x)) for p in ps])
    assert rel_err(got, want) <= 1e-5
    x6 = tokens(6, 5, seed=2)
    each = [[logits(lf.call(model, p, x6[i : i + 1]))[0] for p in ps] for i in range(6)]
    # per-example copies (runs of unequal length), runs of adapters 0..K−1 in order (the stack itself),
    # runs in another order, one adapter for all
    for route in ([2, 0, 2, 1, 1, 0], [0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2], [2] * 6):
        mixed = logits(lf.call(model, stacked, x6, route=torch.tensor(route)))
        for i, k in enumerate(route):
            assert rel_err(mixed[i], each[i][k]) <= 1e-5, (route, i)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_moves_trainable_leaves_only(case):
    _, cfg = case
    model, x = tiny("llama"), tokens()
    before = snapshot(model)
    params = steered(model_params(cfg, model), 1.0)
    start = {id(v): v.detach().clone() for v in lf.trainable(params)}
    frozen0 = [v.clone() for v in lf.partition(params)[1] and _leaves(lf.partition(params)[1])]
    opt = torch.optim.AdamW(lf.trainable(params), lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(logits(lf.call(model, params, x)).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for v in lf.trainable(params):
        assert not torch.equal(v, start[id(v)]), "a trainable leaf did not move"
    for v0, v in zip(frozen0, _leaves(lf.partition(params)[1])):
        assert torch.equal(v0, v) and v.grad is None
    assert all(p.grad is None for p in model.parameters()), "base weights received gradients"
    assert_untouched(model, before)


def _leaves(tree):
    return [v for bv in tree.values() for lv in bv.values() for v in lv.values()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip(case, tmp_path):
    _, cfg = case
    model = tiny("llama")
    params = steered(moved(model_params(cfg, model), 3), 0.7)
    f = tmp_path / "adapter.safetensors"
    lf.save(f, params, config=cfg)
    back = lf.load(f, model=model)
    assert back.keys() == params.keys()
    for p in params:
        for n in params[p]:
            for k, v in params[p][n].items():
                w = back[p][n][k]
                assert torch.equal(w, v.detach()) and w.dtype == v.dtype and w.requires_grad == v.requires_grad
    meta = lf.load_metadata(f)
    assert meta["lite_fn_version"] == lf.__version__
    some = next(iter(meta["layers"].values()))
    assert some["config"]["class"] == type(cfg).__name__
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_equals_call(case, kind):
    _, cfg = case
    model, x = tiny(kind), tokens()
    if kind == "gpt2" and lf.variants.module_for(cfg).NAME == "road":
        cfg = type(cfg)(variant=cfg.variant, group_size=8)
    params = steered(moved(model_params(cfg, model), 5), 0.8)
    merged = lf.merge(model, params)
    dense = torch.func.functional_call(model, merged, (x,))
    assert rel_err(logits(dense), logits(lf.call(model, params, x))) <= 1e-4


def test_alpha_sweep_vmap_equals_sequential():
    model, x = tiny("llama"), tokens()
    params = moved(lf.init(0, model, lf.AntiPaSTOConfig(r=8, block_size=4), progress=False), 1)
    alphas = torch.linspace(-1, 1, 5)
    got = vmap(lambda a: logits(lf.call(model, lf.with_alpha(params, a), x)))(alphas)
    want = torch.stack([logits(lf.call(model, lf.with_alpha(params, float(a)), x)) for a in alphas])
    assert rel_err(got, want) <= 1e-5
    y0 = logits(model(x))
    assert torch.equal(got[2], y0)  # alpha = 0 is the base model exactly
    # +alpha and -alpha steer in opposite directions (exactly so to first order in alpha)
    d_plus, d_minus = (got[3] - y0).flatten(), (got[1] - y0).flatten()
    assert torch.nn.functional.cosine_similarity(d_plus, d_minus, dim=0) < -0.5
    small = [logits(lf.call(model, lf.with_alpha(params, a), x)) - y0 for a in (0.01, -0.01)]
    assert torch.nn.functional.cosine_similarity(small[0].flatten(), small[1].flatten(), dim=0) < -0.99


def test_partition_combine_with_torch_func_grad():
    model, x = tiny("llama"), tokens()
    params = moved(
        lf.init(0, model, lf.DoRAConfig(r=4), progress=False)
        if hasattr(lf, "DoRAConfig")
        else lf.init(0, model, lf.LoRAConfig(r=4), progress=False),
        2,
    )
    train, frozen = lf.partition(params)
    assert all(v.requires_grad for v in _leaves(train)) and not any(v.requires_grad for v in _leaves(frozen))

    def loss(t):
        return logits(lf.call(model, lf.combine(t, frozen), x)).pow(2).mean()

    g = torch.func.grad(loss)(train)
    ref = torch.autograd.grad(loss(train), _leaves(train))
    for a, b in zip(_leaves(g), ref):
        assert rel_err(a, b) <= 1e-5


def test_compile_fullgraph_train_step_no_recompile_on_scale_change():
    import torch._dynamo

    torch._dynamo.reset()
    model, x = tiny("llama"), tokens()
    params = moved(lf.init(0, model, lf.LoRAConfig(r=4), progress=False), 4)

    def loss_fn(p, x):
        return logits(lf.call(model, p, x)).pow(2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(params, x)
    loss.backward()
    assert rel_err(loss, loss_fn(params, x)) <= 1e-5
    rescaled = {p: {n: {**lv, "scale": torch.tensor(3.0)} for n, lv in bv.items()} for p, bv in params.items()}
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert rel_err(compiled(rescaled, x), loss_fn(rescaled, x)) <= 1e-5


def test_bad_paths_shapes_and_targets():
    model, x = tiny("llama"), tokens()
    params = lf.init(0, model, lf.LoRAConfig(r=4), targets=r"q_proj$", progress=False)
    bad = {"model.layers.0.self_attn.nope": next(iter(params.values()))}
    with pytest.raises(KeyError, match="nope"):
        lf.call(model, bad, x)
    wrong = {"model.layers.0.mlp.down_proj": next(iter(params.values()))}  # q_proj shapes on down_proj
    with pytest.raises(ValueError, match="down_proj"):
        lf.call(model, wrong, x)
    with pytest.raises(TypeError, match="RMSNorm"):
        lf.init(0, model, lf.LoRAConfig(r=4), targets=r"model\.norm$")
    with pytest.raises(ValueError, match="matches no module"):
        lf.init(0, model, lf.LoRAConfig(r=4), targets=r"no_such_layer$")


def test_init_key_per_layer_independent_of_other_targets():
    model = tiny("llama")
    a = lf.init(0, model, lf.LoRAConfig(r=4), targets=r"q_proj$", progress=False)
    b = lf.init(0, model, lf.LoRAConfig(r=4), targets=r"(q_proj|v_proj)$", progress=False)
    for p in a:
        assert torch.equal(a[p]["lora"]["A"], b[p]["lora"]["A"])


def test_combined_inits_ia3_and_ia3ff():
    model, x = tiny("llama"), tokens()
    p = {
        **lf.init(0, model, lf.IA3Config(), targets=r"(k_proj|v_proj)$", progress=False),
        **lf.init(0, model, lf.IA3FFConfig(), targets=r"down_proj$", progress=False),
    }
    assert {next(iter(bv)) for bv in p.values()} == {"ia3", "ia3_ff"}
    assert torch.equal(logits(lf.call(model, p, x)), logits(model(x)))
    out = logits(lf.call(model, moved(p, 1), x))
    assert not torch.equal(out, logits(model(x)))


def test_load_names_every_mismatch(tmp_path):
    llama, qwen = tiny("llama"), tiny("gpt2")
    params = lf.init(0, llama, lf.LoRAConfig(r=4), progress=False)
    f = tmp_path / "a.safetensors"
    lf.save(f, params)
    with pytest.raises(ValueError) as e:
        lf.load(f, model=qwen)
    assert all(p in str(e.value) for p in params)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        lf.load(f)


def test_checkpoint_readable_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    model = tiny("llama")
    params = lf.init(0, model, lf.LoRAConfig(r=4), progress=False)
    f = tmp_path / "a.safetensors"
    lf.save(f, params)
    flat = load_file(str(f))
    for p, bv in params.items():
        assert torch.equal(flat[f"{p}.lora.A"], bv["lora"]["A"].detach())


@pytest.mark.parametrize("how", ["alpha sweep (vmap, prepare hook)", "routed call (apply_runs)", "routed call (vmap)"])
def test_many_adapter_calls_compile_fullgraph_without_recompiling(how):
    model, x = tiny("llama"), tokens(4, 5)
    if how.startswith("alpha"):
        params = lf.init(0, model, lf.AntiPaSTOConfig(r=4, block_size=2), targets=r"(q_proj|down_proj)$", progress=False)

        def fn(p, values):
            return vmap(lambda a: logits(lf.call(model, lf.with_alpha(p, a), x)))(values)

        args, other = (params, torch.linspace(-1.0, 1.0, 3)), (params, torch.linspace(-2.0, 0.5, 3))
    else:
        ps = [moved(lf.init(k, model, lf.LoRAConfig(r=4), progress=False), k + 1) for k in range(4)]
        route = torch.arange(4) if "apply_runs" in how else torch.tensor([3, 0, 3, 1])

        def fn(p, r):
            return logits(lf.call(model, p, x, route=r))

        args, other = (lf.stack(ps), route), (lf.stack(ps[::-1]), route)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(*args), fn(*args)) <= 1e-5
        with torch._dynamo.config.patch(error_on_recompile=True):  # new values, same shapes: no recompile
            assert rel_err(compiled(*other), fn(*other)) <= 1e-5


def test_stack_holds_a_frozen_leaf_equal_in_all_adapters_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    steer = [lf.with_alpha(lf.init(k, model, lf.AntiPaSTOConfig(r=8, block_size=4)), 0.7) for k in range(4)]
    stacked = lf.stack(steer)["0"]["antipasto"]
    for leaf in ("U", "S", "V", "alpha", "max_angle"):  # frozen and equal in all four: one copy, stride 0 on K
        assert (
            stacked[leaf].stride(0) == 0
            and stacked[leaf].untyped_storage().nbytes() == steer[0]["0"]["antipasto"][leaf].untyped_storage().nbytes()
        )
        assert (
            stacked[leaf].untyped_storage().data_ptr() != steer[0]["0"]["antipasto"][leaf].untyped_storage().data_ptr()
        )  # a private copy
    assert stacked["rot_v"].stride(0) != 0  # trainable leaves are always K copies
    lora = [lf.init(k, model, lf.LoRAConfig(r=2)) for k in range(3)]
    assert lf.stack(lora)["0"]["lora"]["B"].stride(0) != 0  # trainable, even though all zero: the optimizer writes it
    x = torch.randn(4, 16)
    both = lf.stack(steer)
    got = torch.func.vmap(lambda p: lf.call(model, p, x))(both)
    assert torch.equal(got, torch.stack([lf.call(model, p, x) for p in steer]))
    assert torch.equal(lf.call(model, both, x, route=torch.tensor([3, 1, 0, 2]))[0], lf.call(model, steer[3], x)[0])
    other = lf.with_alpha(steer[1], -0.7)
    assert lf.stack([steer[0], other])["0"]["antipasto"]["alpha"].stride(0) != 0  # values differ: stacked as usual
    assert all(torch.equal(a["0"]["antipasto"]["U"], b["0"]["antipasto"]["U"]) for a, b in zip(lf.unstack(both), steer))
