"""AntiPaSTO steering sweep: 9 alphas in one vmapped call vs 9 sequential calls vs the limit.

  .venv/bin/python benchmarks/bench_steering.py            # the recorded setting
  .venv/bin/python benchmarks/bench_steering.py --quick    # smoke run, prints only

vmapped     vmap(lambda a: lf.call(model, lf.with_alpha(p, a), x))(alphas)
sequential  [lf.call(model, lf.with_alpha(p, a), x) for a in alphas]
limit       model(x repeated 9 times)      the base model at 9x the batch, no adapters
"""

from __future__ import annotations

import warnings

import _common as C
import torch
from torch.func import vmap

import lite_fn as lf


def main():
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--attn", nargs="*", default=["sdpa", "eager"])
    args = C.finish_args(p.parse_args(), default_repeats=7)
    B, T = (1, 16) if args.quick else (2, 64)
    hidden, layers = (128, 2) if args.quick else (256, 4)
    n_alpha, r, bs = 9, 8, 4
    C.banner("bench_steering", args)
    warnings.filterwarnings("ignore", message=".*batching rule.*")

    alphas = torch.linspace(-2.0, 2.0, n_alpha)
    tab = C.Table(
        [
            "attn",
            "tokens/alpha",
            "limit ms",
            "vmapped ms",
            "sequential ms",
            "vmapped/limit",
            "sequential/limit",
            "sequential/vmapped",
            "goal vmapped/limit <= 1.15",
        ]
    )
    checks, bars = [], {}
    params = None
    for attn in args.attn:
        model = C.llama(hidden=hidden, layers=layers, attn=attn)
        desc = C.model_desc(model)
        if params is None:  # the same weights for every attn (same seed)
            params = lf.init(0, model, lf.AntiPaSTOConfig(r=r, block_size=bs), targets=C.LLAMA_TARGETS_RE)
        x = C.tokens(B, T, model.config.vocab_size)
        x9 = x.repeat(n_alpha, 1)
        fns = {
            "limit": lambda: model(x9).logits,
            "vmapped": lambda: vmap(lambda a: lf.call(model, lf.with_alpha(params, a), x).logits)(alphas),
            "sequential": lambda: torch.stack([lf.call(model, lf.with_alpha(params, float(a)), x).logits for a in alphas]),
        }
        with torch.no_grad():
            diff = float((fns["vmapped"]() - fns["sequential"]()).abs().max())
            spread = float((fns["sequential"]()[0] - fns["sequential"]()[-1]).abs().max())
            checks.append(f"{attn}: max |vmapped − sequential| = {diff:.1e} (alpha=-2 vs +2 logits differ by up to {spread:.1e})")
            print("  check:", checks[-1], flush=True)
            t = C.interleaved(fns, args.repeats)
        m = {n: t[n].median for n in fns}
        tab.add(
            attn,
            B * T,
            C.ms(m["limit"]),
            C.ms(m["vmapped"]),
            C.ms(m["sequential"]),
            C.ratio(m["vmapped"] / m["limit"]),
            C.ratio(m["sequential"] / m["limit"]),
            C.ratio(m["sequential"] / m["vmapped"]),
            C.goal(m["vmapped"] / m["limit"], "<=", 1.15),
        )
        bars[attn] = {n: m[n] / m["limit"] for n in ("vmapped", "sequential")}

    tab.print(f"AntiPaSTO, {n_alpha} alphas (median ms)")
    body = f"""
Model: {desc}. AntiPaSTO r={r}, block size {bs} (input-basis rotation, top-r singular dims) on every
linear layer of the blocks ({", ".join(C.LLAMA_TARGETS)}). {n_alpha} alphas in [-2, 2]; each alpha
sees the same {B}×{T} tokens; forward only (no_grad), full logits. The limit is the base model on the
{n_alpha}× repeated batch. Median of {args.repeats} interleaved repeats. Under vmap the input is shared,
so the first projections of x (before any adapter output mixes in) are computed once, not {n_alpha} times.
SDPA attention has no vmap batching rule on CPU (torch falls back to a loop for that kernel); eager does.

{tab.markdown()}

Check: {"; ".join(checks)}.
"""
    png = None
    if args.write:
        plt = C.pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.6))
        names = ["vmapped", "sequential"]
        for i, attn in enumerate(bars):
            ax.bar([j + 0.35 * i for j in range(len(names))], [bars[attn][n] for n in names], width=0.35, label=f"attn={attn}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.15, color="gray", ls="--", lw=0.8, label="goal 1.15x")
        ax.set_xticks([j + 0.175 for j in range(len(names))], names)
        ax.set_ylabel("time / limit (base at 9x batch)")
        ax.set_title(f"AntiPaSTO: {n_alpha} alphas")
        ax.legend(fontsize=8)
        png = C.save_plot(fig, "bench_steering", args)
    C.write_section("bench_steering", "Steering sweep (bench_steering.py)", body, args, png)


if __name__ == "__main__":
    main()
