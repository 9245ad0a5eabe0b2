"""K adapters trained in one step (vmap over stacked LoRAs, one AdamW) vs K sequential train steps,
with lite_fn and with peft, on a Llama-shaped model: CPU time and peak step memory.

    .venv/bin/python benchmarks/bench_train_many.py            # the recorded setting
    .venv/bin/python benchmarks/bench_train_many.py --quick    # smoke run, prints only

Every adapter trains on its own B×T tokens, so the three contenders do the same work:
  at once     losses = lf.train.stacked_loss(model)(stacked, x, labels=x)   x (K, B, T)
              losses.sum().backward(); AdamW.step() over the stacked leaves
  lite seq    for k: lf.call(model, params_k, x[k], labels=x[k]).loss.backward(); AdamW_k.step()
  peft seq    for k: peft_model.set_adapter(f"a{k}"); peft_model(x[k], labels=x[k]).loss.backward(); AdamW_k.step()
  limit       the frozen base model's forward + backward on all K·B·T tokens, no adapter, no optimizer
peft trains one adapter per step (set_adapter makes one adapter active and trainable), so K
adapters take K steps there. ``lite seq / limit`` bounds what any one-step method can gain over
K sequential steps: the at-once step still computes every adapter's tokens.
"""

from __future__ import annotations

import copy
import time
import warnings

import _common as C
import torch

import lite_fn as lf


def make_adapters(base, K: int, r: int):
    return [lf.init(k, base, lf.LoRAConfig(r=r, alpha=2 * r), targets=C.LLAMA_TARGETS_RE) for k in range(K)]


def own_copy(params):
    return {
        p: {n: {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in lv.items()} for n, lv in bv.items()}
        for p, bv in params.items()
    }


def at_once_step(base, stacked, x, lr):
    losses_of = lf.train.stacked_loss(base)
    opt = torch.optim.AdamW(lf.trainable(stacked), lr=lr)

    def step():
        losses = losses_of(stacked, x, labels=x)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()

    return step


def lite_seq_step(base, adapters, x, lr):
    opts = [torch.optim.AdamW(lf.trainable(p), lr=lr) for p in adapters]

    def step():
        for k, (p, opt) in enumerate(zip(adapters, opts)):
            loss = lf.call(base, p, x[k], labels=x[k]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def peft_model(base, K: int, r: int):
    from peft import LoraConfig, get_peft_model

    def cfg():
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=C.LLAMA_TARGETS, lora_dropout=0.0)

    pm = get_peft_model(copy.deepcopy(base), cfg(), adapter_name="a0")
    for k in range(1, K):
        pm.add_adapter(f"a{k}", cfg())
    pm.eval()  # same mode as the lite_fn side (the config has no dropout either way)
    return pm


def peft_seq_step(pm, K: int, x, lr):
    opts = []
    for k in range(K):
        ps = [p for n, p in pm.named_parameters() if f".a{k}." in n and "lora_" in n]
        opts.append(torch.optim.AdamW(ps, lr=lr))

    def step():
        for k, opt in enumerate(opts):
            pm.set_adapter(f"a{k}")
            loss = pm(x[k], labels=x[k]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def limit_step(base, x):
    """The frozen base model's forward + backward down to the input embeddings on all K·B rows."""
    emb = base.get_input_embeddings()
    rows = x.flatten(0, 1)

    def step():
        h = emb(rows).detach().requires_grad_(True)
        base(inputs_embeds=h, labels=rows).loss.backward()

    return step


def check_equal(base, adapters, x, lr) -> float:
    """One at-once step equals K separate steps (max |difference| over every trainable leaf)."""
    separate = [own_copy(p) for p in adapters]
    stacked = lf.stack(adapters)
    at_once_step(base, stacked, x, lr)()
    lite_seq_step(base, separate, x, lr)()
    return max(
        (s[k] - v).abs().max().item() for k, one in enumerate(separate) for s, v in zip(lf.trainable(stacked), lf.trainable(one))
    )


def main():
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="*", default=None, help="adapter counts (default 4 16 64)")
    p.add_argument("--no-peft", action="store_true", help="skip the peft contender")
    p.add_argument("--batch", type=int, default=1, help="rows per adapter (default 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 32; 16 with --quick)")
    args = C.finish_args(p.parse_args(), default_repeats=5)
    Ks = args.ks or ([2, 4] if args.quick else [4, 16, 64])
    B, T = args.batch, args.seq or (16 if args.quick else 32)
    hidden, layers = (128, 2) if args.quick else (256, 4)
    r, lr = 8, 1e-3
    C.banner("bench_train_many", args)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", message=".*adapter.*")  # peft chatter about adding many adapters

    base = C.llama(hidden=hidden, layers=layers, attn="eager").requires_grad_(False)
    vocab = base.config.vocab_size
    print(f"{C.model_desc(base)}; LoRA r={r} on {', '.join(C.LLAMA_TARGETS)}; {B}×{T} tokens per adapter", flush=True)

    tab = C.Table(
        [
            "K",
            "tokens",
            "limit ms",
            "at once ms",
            "lite seq ms",
            "peft seq ms",
            "lite seq/at once",
            "peft seq/at once",
            "at once/limit",
            "lite seq/limit",
            "at once peak",
            "lite seq peak",
            "peft seq peak",
            "at once/lite seq mem",
            "goal",
        ]
    )
    checks, plot = [], {}
    for K in Ks:
        x = torch.stack([C.tokens(B, T, vocab, seed=1000 * K + k) for k in range(K)])  # (K, B, T)
        adapters = make_adapters(base, K, r)
        err = check_equal(base, adapters, x, lr)
        checks.append(f"K={K}: one at-once step vs {K} separate steps, max |Δ leaf| = {err:.1e}")
        print("  check:", checks[-1], flush=True)
        fns = {
            "limit": limit_step(base, x),
            "at once": at_once_step(base, lf.stack(adapters), x, lr),
            "lite seq": lite_seq_step(base, [own_copy(a) for a in adapters], x, lr),
        }
        pm = None
        if not args.no_peft:
            pm = peft_model(base, K, r)
            fns["peft seq"] = peft_seq_step(pm, K, x, lr)
        print(f"  K={K} ({K * B * T} tokens)", flush=True)
        t = C.interleaved(fns, args.repeats, clock=time.process_time)
        m = {n: t[n].median for n in fns}
        mem = {n: C.peak_step_bytes(f) for n, f in fns.items() if n != "limit"}
        speed = m["lite seq"] / m["at once"]
        peft_ms = C.ms(m["peft seq"]) if pm is not None else "not run"
        peft_ratio = C.ratio(m["peft seq"] / m["at once"]) if pm is not None else "—"
        peft_mem = C.fmt_bytes(mem["peft seq"]) if pm is not None else "—"
        tab.add(
            K,
            K * B * T,
            C.ms(m["limit"]),
            C.ms(m["at once"]),
            C.ms(m["lite seq"]),
            peft_ms,
            C.ratio(speed),
            peft_ratio,
            C.ratio(m["at once"] / m["limit"]),
            C.ratio(m["lite seq"] / m["limit"]),
            C.fmt_bytes(mem["at once"]),
            C.fmt_bytes(mem["lite seq"]),
            peft_mem,
            C.ratio(mem["at once"] / mem["lite seq"]),
            C.goal(speed, ">=", 5.0) if K == 16 else "",
        )
        plot[K] = {n: m[n] for n in fns if n != "limit"}
        del pm, fns

    tab.print("K adapters trained: one vmapped step vs K sequential steps (median CPU ms per K adapter-steps)")
    print("\n".join(checks))
    body = f"""
Model: {C.model_desc(base)}, attn_implementation="eager" (vmap batches it fully; see the SDPA note in
bench_many_adapters). LoRA r={r} (alpha {2 * r}) on every block linear ({", ".join(C.LLAMA_TARGETS)}); each
adapter trains on its own {B}×{T} tokens with the model's causal-LM loss; AdamW lr {lr}. A row is the cost of
one optimizer step for each of the K adapters. Median of {args.repeats} interleaved repeats, after one warm-up
each; times are process CPU time (`time.process_time`, all threads), so other load on the machine counts less.

- **at once**: `lf.train.stacked_loss` (vmap of `lf.call` over the stacked leaves, each adapter on its own batch),
  `losses.sum().backward()`, one AdamW over the stacked leaves. It equals K separate trainings (checked below,
  and in tests/test_train_many.py after 5 steps).
- **lite seq**: K separate lite_fn train steps (one AdamW per adapter).
- **peft seq**: one peft model holding K LoRA adapters; per step `set_adapter(k)` (peft trains the active
  adapter only), forward, backward, adapter k's AdamW. `set_adapter`'s walk over the modules is part of its time.
- **peak**: the highest number of bytes torch's CPU allocator had live during one row's work (all K steps),
  above what was live at its start (see the method above); the at-once step holds K adapters' activations at once.
- **limit**: the frozen base model's forward + backward down to the input embeddings on all K·{B}×{T} tokens,
  no adapter and no optimizer. `lite seq/limit` is the most any one-step method could gain over K sequential
  steps (the at-once step computes every adapter's tokens); `at once/limit` is what adapting costs on top.
- Goal: at K=16, at once ≥ 5x faster than 16 sequential lite_fn steps.

{tab.markdown()}

Checks: {"; ".join(checks)}.
"""

    def draw(ax):
        ks = sorted(plot)
        for n in plot[ks[0]]:
            ax.plot(ks, [plot[k][n] * 1e3 / k for k in ks], marker="o", label=n)

    title, xlabel, ylabel = "Training K adapters: per-adapter cost of one step", "K adapters", "CPU ms per adapter-step"
    png = C.plot_png(
        "bench_train_many", args, draw, size=(6.5, 3.8), title=title, ylabel=ylabel, xlabel=xlabel, xlog=2, ylog=True
    )
    C.write_section("bench_train_many", "K adapters trained at once (bench_train_many.py)", body, args, png)


if __name__ == "__main__":
    main()
