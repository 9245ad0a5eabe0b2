"""GPU figures, run once on a lent GPU (not part of run_all.sh; CPU benchmarks are the recorded ones).

    python benchmarks/bench_gpu.py --out gpu.md

A Llama of realistic layer width (hidden 1024, intermediate 2816, 2 layers, eager attention, bf16,
random weights). CUDA-event timing, medians of interleaved repeats; memory is
torch.cuda.max_memory_allocated during one call. Sections:
1. lf.call before (functional_call + forward assignment) and after (TorchFunctionMode) the redesign;
2. K=16 LoRAs (r=16, all seven block linears) × 64 tokens: vmap, route, peft's mixed batch, vs the
   base at the same total batch and one adapter on every row;
3. a 9-alpha AntiPaSTO sweep (r=16 on all block linears) in one vmapped call vs the base at 9× batch;
4. a LoRA train step on a 4-bit (nf4, bf16 compute) base vs the bf16 base vs peft's QLoRA;
5. K=16 LoRAs trained in one step vs 16 sequential lite_fn / peft steps (bench_train_many.py's setting).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings

import _common as C
import torch
from bench_injection import before_call

import lite_fn as lf


def timed(fns: dict, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    if not torch.cuda.is_available():  # a CPU smoke run of the script itself
        repeats, warmup = 1, 1
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for rep in range(repeats):
        for n in names[rep % len(names) :] + names[: rep % len(names)]:
            if not torch.cuda.is_available():
                t0 = time.perf_counter()
                fns[n]()
                samples[n].append((time.perf_counter() - t0) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            torch.cuda.synchronize()
            samples[n].append(start.elapsed_time(end))
    return {n: statistics.median(v) for n, v in samples.items()}


def peak(fn) -> int:
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def perturbed(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        p: {
            n: {
                k: (v + 0.02 * torch.randn(v.shape, generator=g).to(v.device, v.dtype)).detach().requires_grad_(v.requires_grad)
                for k, v in lv.items()
            }
            for n, lv in bv.items()
        }
        for p, bv in params.items()
    }


def main():
    import peft
    import transformers as tf

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu.md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (checks the script)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dev, dt = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    lines = [
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (smoke run)'}, torch {torch.__version__}, transformers {tf.__version__}, peft {peft.__version__}",
        "",
        "Llama hidden 1024, intermediate 2816, 2 layers, eager attention, bf16, random weights; CUDA-event medians.",
        "",
    ]
    model = (
        C.llama(
            hidden=64 if args.smoke else 1024,
            layers=2,
            attn="eager",
            intermediate=128 if args.smoke else 2816,
            heads=4 if args.smoke else 16,
            vocab=32000,
        )
        .to(dev, dt)
        .requires_grad_(False)
    )
    V = model.config.vocab_size
    no = torch.no_grad

    # 1. before / after
    params = perturbed(lf.init(0, model, lf.LoRAConfig(r=16, alpha=32), targets=C.LLAMA_TARGETS_RE), 1)
    rows = []
    for B, T in ((1, 64), (16, 64)):
        x = torch.randint(0, V, (B, T), device=dev)
        with no():
            t = timed(
                {
                    "base": lambda: model(x),
                    "before": lambda: before_call(model, params, x),
                    "after": lambda: lf.call(model, params, x),
                }
            )
        rows.append(
            f"| forward {B}×{T} | {t['base']:.2f} | {t['before']:.2f} | {t['after']:.2f} | {t['after'] / t['before']:.2f}x |"
        )
    x = torch.randint(0, V, (4, 64), device=dev)

    def step(f):
        def run():
            f(x).logits.float().square().mean().backward()
            for leaf in lf.trainable(params):
                leaf.grad = None

        return run

    t = timed({"before": step(lambda x: before_call(model, params, x)), "after": step(lambda x: lf.call(model, params, x))})
    rows.append(f"| train step 4×64 | — | {t['before']:.2f} | {t['after']:.2f} | {t['after'] / t['before']:.2f}x |")
    lines += [
        "### lf.call before/after the injection redesign (ms)",
        "",
        "| workload | base | before | after | after/before |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]

    # 2. many adapters
    K, T = (4, 8) if args.smoke else (16, 64)
    adapters = [perturbed(lf.init(k, model, lf.LoRAConfig(r=16, alpha=32), targets=C.LLAMA_TARGETS_RE), k) for k in range(K)]
    stacked = lf.stack(adapters)
    xs = torch.randint(0, V, (K, 1, T), device=dev)
    flat = xs.reshape(K, T)
    route = torch.arange(K, device=dev)
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=16, lora_alpha=32, target_modules=C.LLAMA_TARGETS), adapter_name="a0"
    )
    for k in range(1, K):
        pm.add_adapter(f"a{k}", peft.LoraConfig(r=16, lora_alpha=32, target_modules=C.LLAMA_TARGETS))
    with no():
        for k, a in enumerate(adapters):
            for path, bv in a.items():
                layer = pm.base_model.model.get_submodule(path)
                layer.lora_A[f"a{k}"].weight.copy_(bv["lora"]["A"])
                layer.lora_B[f"a{k}"].weight.copy_(bv["lora"]["B"])
    pm.to(dev, dt).eval()
    names = [f"a{k}" for k in range(K)]
    fns = {
        "base": lambda: model(flat),
        "one adapter": lambda: lf.call(model, adapters[0], flat),
        "vmap": lambda: torch.func.vmap(lambda p, xi: lf.call(model, p, xi).logits)(stacked, xs),
        "route": lambda: lf.call(model, stacked, flat, route=route),
        "peft mixed": lambda: pm(input_ids=flat, adapter_names=names),
    }
    with no():
        t = timed(fns)
        mem = {n: peak(f) for n, f in fns.items()}
    lines += [
        f"### K={K} LoRAs × {T} tokens, one call (ms; ratio to the base at the same total batch)",
        "",
        "| contender | ms | / base | peak memory MiB |",
        "|---|---|---|---|",
        *[f"| {n} | {t[n]:.2f} | {t[n] / t['base']:.2f}x | {mem[n] / 2**20:.0f} |" for n in fns],
        f"\npeft mixed / best lite_fn: {t['peft mixed'] / min(t['vmap'], t['route']):.2f}x",
        "",
    ]

    # 2b. the same, compiled (fullgraph): the per-op Python work of the injection is traced away
    if not args.smoke:
        try:
            comp = {
                "base": torch.compile(lambda: model(flat).logits, fullgraph=True),
                "vmap": torch.compile(
                    lambda: torch.func.vmap(lambda p, xi: lf.call(model, p, xi).logits)(stacked, xs), fullgraph=True
                ),
                "route": torch.compile(lambda: lf.call(model, stacked, flat, route=route).logits, fullgraph=True),
            }
            with no():
                t0 = time.perf_counter()
                for f in comp.values():
                    f()
                compile_s = time.perf_counter() - t0
                t = timed(comp)
            lines += [
                f"### K={K} LoRAs, compiled with fullgraph=True (ms; compile {compile_s:.0f} s for the three)",
                "",
                "| contender | ms | / base |",
                "|---|---|---|",
                *[f"| {n} | {t[n]:.2f} | {t[n] / t['base']:.2f}x |" for n in comp],
                "",
            ]
        except Exception as e:
            lines += [f"compiled many-adapter section failed: {type(e).__name__}: {str(e)[:300]}", ""]

    # 3. steering
    steer = perturbed(lf.init(0, model, lf.AntiPaSTOConfig(r=16, block_size=4), targets=C.LLAMA_TARGETS_RE), 3)
    alphas = torch.linspace(-1, 1, 9, device=dev, dtype=dt)
    x1 = torch.randint(0, V, (1, 64), device=dev)
    x9 = x1.repeat(9, 1)
    with no():
        t = timed(
            {
                "base 9×": lambda: model(x9),
                "9 alphas vmapped": lambda: torch.func.vmap(lambda a: lf.call(model, lf.with_alpha(steer, a), x1).logits)(alphas),
            }
        )
    lines += [
        "### AntiPaSTO 9-alpha sweep (ms)",
        "",
        "| base at 9× batch | 9 alphas vmapped | ratio |",
        "|---|---|---|",
        f"| {t['base 9×']:.2f} | {t['9 alphas vmapped']:.2f} | {t['9 alphas vmapped'] / t['base 9×']:.2f}x |",
        "",
    ]

    if not args.smoke:
        try:
            base9 = torch.compile(lambda: model(x9).logits, fullgraph=True)
            sweep = torch.compile(
                lambda: torch.func.vmap(lambda a: lf.call(model, lf.with_alpha(steer, a), x1).logits)(alphas), fullgraph=True
            )
            with no():
                base9(), sweep()
                t = timed({"base 9×": base9, "9 alphas vmapped": sweep})
            lines += [
                "compiled (fullgraph):",
                "",
                "| base at 9× batch | 9 alphas vmapped | ratio |",
                "|---|---|---|",
                f"| {t['base 9×']:.2f} | {t['9 alphas vmapped']:.2f} | {t['9 alphas vmapped'] / t['base 9×']:.2f}x |",
                "",
            ]
        except Exception as e:
            lines += [f"compiled steering section failed: {type(e).__name__}: {str(e)[:300]}", ""]

    # 4. QLoRA
    try:
        import bitsandbytes  # noqa: F401

        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dt)

        def load4():
            m = tf.AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=q, device_map=dev, dtype=dt if dev == "cuda" else None
            )
            m.config._attn_implementation = "eager"
            return m.train().requires_grad_(False)

        q_lite, q_peft = load4(), load4()
        xq = torch.randint(0, V, (4, 128), device=dev)
        fns = {
            "lite_fn bf16 base": C.lora_train_step(model.train(), xq, r=16),
            "lite_fn 4-bit base": C.lora_train_step(q_lite, xq, r=16),
            "peft QLoRA 4-bit": C.peft_lora_train_step(q_peft, xq, r=16),
        }
        t = timed(fns, repeats=10)
        mem = {n: peak(f) for n, f in fns.items()}
        wq = sum(p.numel() * p.element_size() for p in q_lite.parameters())
        wb = sum(p.numel() * p.element_size() for p in model.parameters())
        lines += [
            "### LoRA train step on a 4-bit base, batch 4×128 (ms)",
            "",
            f"weights: bf16 {wb / 2**20:.0f} MiB, 4-bit {wq / 2**20:.0f} MiB",
            "",
            "| contender | ms | peak step memory MiB |",
            "|---|---|---|",
            *[f"| {n} | {t[n]:.2f} | {mem[n] / 2**20:.0f} |" for n in fns],
            f"\npeft QLoRA / lite_fn 4-bit: {t['peft QLoRA 4-bit'] / t['lite_fn 4-bit base']:.2f}x time",
            "",
        ]
    except Exception as e:
        lines += [f"QLoRA section failed: {type(e).__name__}: {e}", ""]
    # 5. K adapters trained in one step vs K sequential steps, on the CPU benchmark's Llama (bench_train_many.py)
    try:
        import bench_train_many as TM

        small = C.llama(hidden=64 if args.smoke else 256, layers=4, attn="eager").to(dev).requires_grad_(False)
        small.train()
        (K, B, T), r = ((4, 1, 8) if args.smoke else (16, 1, 32)), 8
        xk = torch.stack([C.tokens(B, T, small.config.vocab_size, seed=k) for k in range(K)]).to(dev)
        adapters = TM.make_adapters(small, K, r)
        fns = {
            "limit": TM.limit_step(small, xk),
            "at once": TM.at_once_step(small, lf.stack(adapters), xk, 1e-3),
            "lite seq": TM.lite_seq_step(small, [TM.own_copy(a) for a in adapters], xk, 1e-3),
            "peft seq": TM.peft_seq_step(TM.peft_model(small, K, r), K, xk, 1e-3),
        }
        t = timed(fns, repeats=10)
        lines += [
            f"### K={K} LoRAs trained in one step (AdamW), the CPU benchmark's Llama (hidden 256, 4 layers, fp32), {B}×{T} tokens each (ms)",
            "",
            f"| limit (base fwd+bwd, all rows) | at once | {K} sequential lite_fn | {K} sequential peft | lite seq / at once | peft seq / at once | at once / limit |",
            "|---|---|---|---|---|---|---|",
            f"| {t['limit']:.2f} | {t['at once']:.2f} | {t['lite seq']:.2f} | {t['peft seq']:.2f} | "
            f"{t['lite seq'] / t['at once']:.2f}x | {t['peft seq'] / t['at once']:.2f}x | {t['at once'] / t['limit']:.2f}x |",
            "",
        ]
    except Exception as e:
        lines += [f"train-many section failed: {type(e).__name__}: {str(e)[:300]}", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
