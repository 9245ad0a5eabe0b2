"""Streaming calibration through a whole model: memory flat in tokens, q/k/v share work, clear errors."""

import pytest
import torch
from models import tiny, tokens

import lite_fn as lf
from lite_fn import calibration, variants

QKV = r"self_attn\.(q_proj|k_proj|v_proj)$"


def _stats(model, cfg, targets):
    mod = variants.module_for(cfg)
    modules = dict(model.named_modules())
    return {p: mod.stat(cfg, modules[p].weight.detach()) for p in lf.target_paths(model, targets)}


def _batches(n, batch=2, seq=8, seed=0):
    for i in range(n):  # a generator: nothing is held beyond the current batch
        yield tokens(batch, seq, seed=seed + i)


@pytest.mark.parametrize(
    "cfg", [lf.EVAConfig(r=4, tau=1.0), lf.AntiPaSTOConfig(r=8, block_size=4, select="data")], ids=["eva", "antipasto"]
)
def test_statistics_do_not_grow_with_tokens(cfg):
    model = tiny("llama")
    sizes = {}
    for n in (1, 20):
        stats = calibration.collect(model, _stats(model, cfg, r"(q_proj|o_proj|down_proj)$"), _batches(n), progress=False)
        assert min(s.tokens for s in stats.values()) == n * 16
        sizes[n] = sum(s.nbytes for s in {id(s): s for s in stats.values()}.values())
    assert sizes[1] == sizes[20] > 0


def test_qkv_share_one_statistic_and_progress_bar(capsys):
    model = tiny("llama")
    stats = _stats(model, lf.EVAConfig(r=4, tau=1.0), QKV)
    calls = {}
    for p, s in stats.items():
        orig = s.update
        s.update = (lambda o, p: lambda x: (calls.__setitem__(p, calls.get(p, 0) + 1), o(x)))(orig, p)
    stats = calibration.collect(model, stats, list(_batches(3)), progress=True)
    for layer in (0, 1):
        q, k, v = (stats[f"model.layers.{layer}.self_attn.{n}_proj"] for n in "qkv")
        assert q is k is v
    assert sum(calls.values()) == 2 * 3  # one update per distinct input per batch, not 3
    assert "lite_fn calibration" in capsys.readouterr().err


def test_eva_init_redistributes_ranks_within_budget():
    model = tiny("llama")
    cfg = lf.EVAConfig(r=4, rho=2.0, tau=1.0)
    params = lf.init(0, model, cfg, targets=r"(q_proj|o_proj|down_proj|up_proj)$", calibration=list(_batches(4)), progress=False)
    ranks = {p: v["eva"]["A"].shape[0] for p, v in params.items()}
    assert sum(ranks.values()) <= 4 * 8 and max(ranks.values()) <= 8
    for v in params.values():  # alpha adjusted with the rank: scale stays alpha / r
        assert torch.allclose(v["eva"]["scale"], torch.tensor(cfg.alpha / cfg.r))


def test_early_stop_when_directions_converge():
    model = tiny("llama")
    consumed = []

    def data():
        for i in range(50):
            consumed.append(i)
            yield tokens(2, 8, seed=i)

    lf.init(0, model, lf.EVAConfig(r=2, tau=0.0), targets=QKV, calibration=data(), progress=False)
    assert len(consumed) == 2  # tau=0: converged as soon as two batches agree on anything


def test_too_few_tokens_and_nan_raise_clearly():
    model = tiny("llama")
    with pytest.raises(ValueError, match="fewer than r"):
        lf.init(0, model, lf.EVAConfig(r=4, rho=1.0), targets=QKV, calibration=[tokens(1, 2)], progress=False)
    embeds = torch.randn(1, 4, 32)
    embeds[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        lf.init(0, model, lf.EVAConfig(r=2), targets=QKV, calibration=[{"inputs_embeds": embeds}], progress=False)
    with pytest.raises(ValueError, match="calibration"):
        lf.init(0, model, lf.EVAConfig(r=2), targets=QKV)
    for cfg in (lf.LoRAConfig(r=2), lf.AntiPaSTOConfig(r=8, block_size=4)):  # data given, none used: refuse
        with pytest.raises(ValueError, match="does not use calibration data"):
            lf.init(0, model, cfg, targets=QKV, calibration=[tokens(1, 8)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        lf.init(0, model, lf.EVAConfig(r=2), targets=QKV, calibration=[], progress=False)


def test_calibration_accepts_tuples_and_kwargs_and_leaves_model_untouched():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens(2, 8)
    a = lf.init(0, model, lf.EVAConfig(r=2), targets=QKV, calibration=[x], progress=False)
    b = lf.init(0, model, lf.EVAConfig(r=2), targets=QKV, calibration=[(x,)], progress=False)
    c = lf.init(0, model, lf.EVAConfig(r=2), targets=QKV, calibration=[{"input_ids": x}], progress=False)
    for p in a:
        assert torch.equal(a[p]["eva"]["A"], b[p]["eva"]["A"]) and torch.equal(a[p]["eva"]["A"], c[p]["eva"]["A"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())
