"""torch.compile (inductor) vs eager for a LoRA train step with lite_fn, same model and data.

    .venv/bin/python benchmarks/bench_compile.py            # the recorded setting
    .venv/bin/python benchmarks/bench_compile.py --quick    # smoke run, prints only

The compiled part is the loss, lf.call(model, params, x, labels=x).loss, with fullgraph=True (a graph
break would raise, so a finished run shows the call has none); its backward is compiled through
AOTAutograd. AdamW's step runs eagerly in both (foreach implementation). Compile time is reported
separately: the first compiled step's time minus the median compiled step.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

if "--warm-cache" not in sys.argv:  # measure a cold compile: no on-disk inductor/FX caches from earlier runs
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import _common as C
import torch

import lite_fn as lf


def main():
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--warm-cache", action="store_true", help="allow inductor's on-disk caches (default: cold compile)")
    args = C.finish_args(p.parse_args(), default_repeats=9)
    B, T = (2, 16) if args.quick else (4, 64)
    hidden, layers = (128, 2) if args.quick else (256, 4)
    r = 8
    C.banner("bench_compile", args)
    warnings.filterwarnings("ignore", category=UserWarning)

    model = C.llama(hidden=hidden, layers=layers, attn=args.attn)
    model.train()
    for q in model.parameters():
        q.requires_grad_(False)
    x = C.tokens(B, T, model.config.vocab_size)

    def loss_fn(params, x):
        return lf.call(model, params, x, labels=x).loss

    compiled_loss = torch.compile(loss_fn, backend="inductor", fullgraph=True)

    def make_step(f):
        params = lf.init(0, model, lf.LoRAConfig(r=r, alpha=2 * r), targets=C.LLAMA_TARGETS_RE)
        opt = torch.optim.AdamW(lf.trainable(params), lr=1e-4)

        def step():
            loss = f(params, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        step.params = params
        return step

    eager, compiled = make_step(loss_fn), make_step(compiled_loss)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    first_loss = compiled()
    first = time.perf_counter() - t0
    eager_first = eager()
    print(
        f"  first compiled step {first:.1f}s; loss compiled {float(first_loss):.6f} vs eager {float(eager_first):.6f}", flush=True
    )
    # parity after a few identical steps (same init, same data, same optimizer)
    for _ in range(2):
        compiled(), eager()
    parity = max(float((a - b).abs().max()) for a, b in zip(lf.trainable(compiled.params), lf.trainable(eager.params)))
    moved = max(float(b.abs().max()) for b in lf.trainable(eager.params) if b.shape[-1] == r)  # B left zero

    t = C.interleaved({"eager": eager, "compiled": compiled}, args.repeats)
    m = {n: v.median for n, v in t.items()}
    compile_s = first - m["compiled"]
    breakeven = compile_s / max(m["eager"] - m["compiled"], 1e-9) if m["compiled"] < m["eager"] else float("inf")

    tab = C.Table(
        [
            "attn",
            "eager ms",
            "compiled ms",
            "speed-up eager/compiled",
            "compile time s",
            "steps to amortise",
            "max abs param diff after 3 steps",
        ]
    )
    tab.add(
        args.attn,
        C.ms(m["eager"]),
        C.ms(m["compiled"]),
        C.ratio(m["eager"] / m["compiled"]),
        f"{compile_s:.1f}",
        f"{breakeven:.0f}" if breakeven != float("inf") else "never",
        f"{parity:.1e}",
    )
    tab.print("LoRA train step: torch.compile vs eager")
    body = f"""
Model: {C.model_desc(model)}, attn={args.attn}; LoRA r={r}, alpha={2 * r} on every linear layer of the
blocks; batch {B}×{T} tokens, causal-LM loss, AdamW. `torch.compile(loss, backend="inductor",
fullgraph=True)` around `lf.call(model, params, x, labels=x).loss` (so no graph breaks), backward via
AOTAutograd, optimizer step eager in both. The last column compares the adapter params of the compiled
and the eager run after 3 identical steps (B has moved from 0 to up to {moved:.1e} by then). Compiled cold (`TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`,
unless `--warm-cache`). Median of {args.repeats} interleaved repeats after the first
(compiling) step. Compile time = first compiled step − median compiled step.

{tab.markdown()}
"""
    png = None
    if args.write:
        plt = C.pyplot()
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.bar(["eager", "compiled"], [m["eager"] * 1e3, m["compiled"] * 1e3], color=["C0", "C1"])
        ax.set_ylabel("ms per train step (median)")
        ax.set_title(f"LoRA train step (compile {compile_s:.0f}s once)")
        png = C.save_plot(fig, "bench_compile", args)
    C.write_section("bench_compile", "torch.compile speed-up (bench_compile.py)", body, args, png)


if __name__ == "__main__":
    main()
