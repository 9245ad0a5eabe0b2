"""One training step (forward + backward + AdamW step) per variant: lite_fn vs peft, same model, same data.

    .venv/bin/python benchmarks/bench_train_step.py            # the recorded setting
    .venv/bin/python benchmarks/bench_train_step.py --quick    # smoke run, prints only

Variants peft also has: LoRA, DoRA, DeLoRA, HRA, IA3 (+ IA3 feed-forward on down_proj), ROAD, PiSSA,
OFT, BOFT, LoHa, LoKr, VeRA, each against its matching peft config. Plus HRA on one d×d Linear at d=1024, where peft builds a
dense d×d rotation every forward and lite_fn applies the r reflections to x.
Time: median of interleaved repeats. Memory: peak bytes torch's CPU allocator has live during one
steady-state step above what was live before it (see RESULTS.md header).
"""

from __future__ import annotations

import copy
import time
import warnings

import _common as C
import torch
from torch import nn

import lite_fn as lf

T_ALL = C.LLAMA_TARGETS


def variants(r: int, hidden: int):
    """name -> (lite params builder(model), peft config builder). Same targets on both sides."""
    import peft

    lo = dict(r=r, lora_alpha=2 * r, target_modules=T_ALL, lora_dropout=0.0)
    ia3_re, ff_re = r"(k_proj|v_proj)$", r"down_proj$"
    return {
        "LoRA": (
            lambda m: lf.init(0, m, lf.LoRAConfig(r=r, alpha=2 * r), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.LoraConfig(**lo),
        ),
        "DoRA": (
            lambda m: lf.init(0, m, lf.DoRAConfig(r=r, alpha=2 * r), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.LoraConfig(**lo, use_dora=True),
        ),
        "DeLoRA": (
            lambda m: lf.init(0, m, lf.DeLoRAConfig(r=r, lam=15.0), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.DeloraConfig(r=r, delora_lambda=15.0, target_modules=T_ALL),
        ),
        "HRA": (
            lambda m: lf.init(0, m, lf.HRAConfig(r=r), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.HRAConfig(r=r, target_modules=T_ALL),
        ),
        "IA3": (
            lambda m: {**lf.init(0, m, lf.IA3Config(), targets=ia3_re), **lf.init(0, m, lf.IA3FFConfig(), targets=ff_re)},
            lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ),
        "ROAD": (
            lambda m: lf.init(0, m, lf.ROADConfig(variant="road_1", group_size=64), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.RoadConfig(variant="road_1", group_size=64, target_modules=T_ALL),
        ),
        "PiSSA": (
            lambda m: lf.init(0, m, lf.PiSSAConfig(r=r, alpha=2 * r), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.LoraConfig(**lo, init_lora_weights="pissa"),
        ),
        "OFT": (
            lambda m: lf.init(0, m, lf.OFTConfig(oft_block_size=32), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=T_ALL),
        ),
        "BOFT": (
            lambda m: lf.init(0, m, lf.BOFTConfig(block_size=16, n_butterfly_factor=2), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.BOFTConfig(boft_block_size=16, boft_n_butterfly_factor=2, target_modules=T_ALL),
        ),
        "LoHa": (
            lambda m: lf.init(0, m, lf.LoHaConfig(r=r, alpha=2 * r), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.LoHaConfig(r=r, alpha=2 * r, target_modules=T_ALL),
        ),
        "LoKr": (
            lambda m: lf.init(0, m, lf.LoKrConfig(r=r, alpha=2 * r), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.LoKrConfig(r=r, alpha=2 * r, target_modules=T_ALL),
        ),
        "VeRA": (
            lambda m: lf.init(0, m, lf.VeRAConfig(r=min(256, hidden)), targets=C.LLAMA_TARGETS_RE),
            lambda: peft.VeraConfig(r=min(256, hidden), target_modules=T_ALL),
        ),
    }


def limit_step(model, x):
    """The frozen base model's forward + backward down to the input embeddings: the least work
    any adapter's train step has to do (no adapter, no optimizer)."""
    emb = model.get_input_embeddings()

    def step():
        h = emb(x).detach().requires_grad_(True)
        model(inputs_embeds=h, labels=x).loss.backward()

    return step


def measure(fns: dict, repeats: int, wall: bool = False):
    clock = time.perf_counter if wall else time.process_time
    t = C.interleaved(fns, repeats, clock=clock)  # includes one warm-up call each (AdamW state then exists)
    mem = {n: C.peak_step_bytes(f) for n, f in fns.items()}
    return {n: t[n].median for n in fns}, mem


class OneLinear(nn.Module):
    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


def add_row(tab, name: str, t: dict, mem: dict, goal: str) -> None:
    """One table row: times of limit / lite_fn / peft, their ratios, peak memory of lite_fn and peft."""
    times = C.timing_cells(t, ["limit", "lite_fn", "peft"], [("lite_fn", "peft"), ("lite_fn", "limit")])
    tab.add(
        name,
        *times,
        C.fmt_bytes(mem["lite_fn"]),
        C.fmt_bytes(mem["peft"]),
        C.ratio(mem["lite_fn"] / mem["peft"]),
        goal,
    )


def main():
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="subset of variants (names as in the table)")
    p.add_argument("--wide", action="store_true", help="hidden 1024, intermediate 2816, 2 layers (own RESULTS section)")
    p.add_argument("--wall", action="store_true", help="time wall-clock (perf_counter) instead of process CPU time")
    args = C.finish_args(p.parse_args(), default_repeats=11)
    B, T = (2, 16) if args.quick else (4, 64)
    hidden, layers = (128, 2) if args.quick else ((1024, 2) if args.wide else (256, 4))
    inter, heads = (2816, 16) if args.wide and not args.quick else (None, 4)
    d_big, n_big = (256, 64) if args.quick else (1024, 512)
    r = 8
    C.banner("bench_train_step", args)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from peft import HRAConfig, get_peft_model

    base = C.llama(hidden=hidden, layers=layers, attn="sdpa", intermediate=inter, heads=heads)
    base.train()  # no dropout in this config; same mode on both sides
    for q in base.parameters():
        q.requires_grad_(False)
    x = C.tokens(B, T, base.config.vocab_size)
    lm_loss = C.causal_lm_loss(x)
    tab = C.Table(
        [
            "variant",
            "limit ms",
            "lite_fn ms",
            "peft ms",
            "lite/peft time",
            "lite/limit",
            "lite_fn peak",
            "peft peak",
            "lite/peft mem",
            "goal",
        ]
    )
    bars = {}
    for name, (make_lite, make_peft) in variants(r, hidden).items():
        if args.only and name not in args.only:
            continue
        print(f"  {name}", flush=True)
        lite_model = base  # untouched: lite_fn never modifies it
        params = make_lite(lite_model)
        pm = get_peft_model(copy.deepcopy(base), make_peft())
        pm.train()
        fns = {
            "limit": limit_step(base, x),
            "lite_fn": C.lite_train_step(lite_model, params, lm_loss),
            "peft": C.peft_train_step(pm, lm_loss),
        }
        t, mem = measure(fns, args.repeats, args.wall)
        g = C.goal(t["lite_fn"] / t["peft"], "<=", 0.8 if name == "DoRA" else 1.0) + " (time)"
        g += ", " + C.goal(mem["lite_fn"] / mem["peft"], "<=", 1.0) + " (memory)"
        add_row(tab, name, t, mem, g)
        bars[name] = (t["lite_fn"] / t["peft"], mem["lite_fn"] / mem["peft"])
        del pm, params

    # HRA on one big square Linear: peft materialises d×d per forward
    if not args.wide and (not args.only or "HRA d=1024" in args.only or "HRA" in args.only):
        print(f"  HRA d={d_big}", flush=True)
        net = OneLinear(d_big)
        for q in net.parameters():
            q.requires_grad_(False)
        xb = torch.randn(n_big, d_big, generator=torch.Generator().manual_seed(1))

        def sq_loss(f):
            return f(xb).square().mean()

        params = lf.init(0, net, lf.HRAConfig(r=r), targets=r"^proj$")
        pm = get_peft_model(copy.deepcopy(net), HRAConfig(r=r, target_modules=["proj"]))
        pm.train()

        def limit():
            xx = xb.detach().requires_grad_(True)  # backward to the input, like the Llama limit
            net(xx).square().mean().backward()

        fns = {"limit": limit, "lite_fn": C.lite_train_step(net, params, sq_loss), "peft": C.peft_train_step(pm, sq_loss)}
        t, mem = measure(fns, args.repeats, args.wall)
        speed = t["peft"] / t["lite_fn"]
        name = f"HRA d={d_big} (one Linear, {n_big} rows)"
        add_row(tab, name, t, mem, "peft/lite " + C.goal(speed, ">=", 3.0))
        bars[f"HRA d={d_big}"] = (t["lite_fn"] / t["peft"], mem["lite_fn"] / mem["peft"])

    tab.print("Train step (forward + backward + AdamW), median ms and peak step memory")
    body = f"""
Model: {C.model_desc(base)}; batch {B}×{T} tokens, causal-LM loss; base weights frozen on both sides.
r={r} (alpha=2r) for the low-rank variants, on every linear layer of the blocks ({", ".join(T_ALL)});
IA3 on k_proj, v_proj (output-side) and down_proj (feed-forward, input-side) as peft's Llama default;
ROAD road_1 with group size 64 (so the intermediate width is 704 = 11·64); OFT with block size 32 (peft's
default, Cayley–Neumann on both sides), BOFT block size 16 with 2 butterfly factors, LoHa and LoKr r={r}
alpha={2 * r}, VeRA r=256 (peft's default; the hidden width if smaller). peft configs: LoraConfig, LoraConfig(use_dora=True), DeloraConfig,
HRAConfig, IA3Config, RoadConfig, LoraConfig(init_lora_weights="pissa"), OFTConfig, BOFTConfig, LoHaConfig,
LoKrConfig, VeraConfig.
Median of {args.repeats} interleaved repeats (limit, lite_fn and peft alternate), after one warm-up step each;
{"wall-clock (`time.perf_counter`)" if args.wall else "process CPU time (`time.process_time`, all threads): on this shared machine it varies ~2% between runs where wall-clock medians swing ~10%"}.

- **limit**: the frozen base model's forward + backward down to the input embeddings, no adapter and no
  optimizer: the least work any adapter train step must do.
- **peak**: the highest number of bytes torch's CPU allocator had live during one steady-state step,
  above what was live when the step began (weights, adapter params, AdamW state); measured with
  `torch.profiler` (`profile_memory=True`), whose allocation events carry the allocator's running total.
  It counts activations saved for backward, gradients and temporaries; RSS is not used because the
  allocator's caching makes RSS deltas depend on what ran before.
- PiSSA: peft rewrites W into the residual W − s·B₀A₀ in place; lite_fn leaves W untouched (so K
  PiSSA adapters can share one base) and subtracts the frozen initial factors' branch instead (SPEC
  §2): each layer also projects x onto A₀ (an extra rank-r product) and keeps B − B₀ (d_out × r)
  for backward, which peft's rewritten W needs neither of.
- Goals (issue 11): lite/peft time ≤ 0.8 for DoRA and ≤ 1.0 for every variant, peak memory ≤ peft's;
  HRA at d={d_big}: lite_fn ≥ 3x faster than peft.

{tab.markdown()}
"""

    def draw(ax):
        names = list(bars)
        xs = range(len(names))
        ax.bar([i - 0.2 for i in xs], [bars[n][0] for n in names], width=0.4, label="time lite_fn/peft")
        ax.bar([i + 0.2 for i in xs], [bars[n][1] for n in names], width=0.4, label="peak memory lite_fn/peft")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), names, rotation=20, fontsize=8)

    title, ylabel = "One train step: lite_fn relative to peft", "lite_fn / peft (lower = lite_fn better)"
    key = "bench_train_step_wide" if args.wide else "bench_train_step"
    png = C.plot_png(key, args, draw, size=(8, 3.8), title=title, ylabel=ylabel, ylog=True)
    title = (
        "Train step per variant, hidden 1024 (bench_train_step.py --wide)"
        if args.wide
        else "Train step per variant (bench_train_step.py)"
    )
    C.write_section(key, title, body, args, png)


if __name__ == "__main__":
    main()
