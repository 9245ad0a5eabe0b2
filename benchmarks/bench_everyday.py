"""The everyday job (issue 19): one LoRA, eager training with activation checkpointing, then generating.

    .venv/bin/python benchmarks/bench_everyday.py            # the recorded setting
    .venv/bin/python benchmarks/bench_everyday.py --quick    # smoke run, prints only

Three tables, each lite_fn and peft side by side in one process (interleaved medians of process CPU
time, ``time.process_time``):

1. **Checkpointing memory**: one train step (forward, backward, AdamW) of LoRA r=16 on every block
   linear of the benchmark Llama (hidden 256, 4 layers) at 1024 tokens, with and without transformers'
   activation checkpointing (lite_fn through ``lf.checkpoint_context``); peak of torch's CPU allocator
   during the step (``_common.peak_step_bytes``). Goals: lite_fn checkpointed ≤ peft checkpointed, and
   ≤ 0.5× lite_fn unchecked.
2. **Launch-bound calls** (1 thread): a tiny Llama (hidden 64, 4 layers, LoRA r=8 on all seven block
   linears), batch 1×8 — the regime of decode steps and GPU eager kernels, where per-call Python cost
   dominates. Forward without and with gradient, and a train step. The "floor" row is the base model
   under a TorchFunctionMode that does nothing but call through: what any per-op interception costs.
   Goal: lite_fn ≤ 1.00× peft.
3. **Greedy generation**: Llama hidden 256 × 4 layers, one LoRA r=8 on q/v/o/down_proj, batch 1, 32 new
   tokens; lite_fn inside ``lf.applied`` vs peft, same tokens checked. Goal: ≤ 1.00× peft.
"""

from __future__ import annotations

import copy
import time
import warnings

import _common as C
import torch
from torch.overrides import TorchFunctionMode

import lite_fn as lf

CONTEXT = {"use_reentrant": False, "context_fn": lf.checkpoint_context}


def _quiet():
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


def memory_table(args) -> str:
    import peft

    seq = 128 if args.quick else 1024
    x = C.tokens(1, seq, 2048, seed=1)
    loss = C.causal_lm_loss(x)
    tab = C.Table(["contender", "checkpointing", "peak step memory", "vs lite_fn unchecked", "CPU time / step"])
    rows = {}
    for ckpt in (False, True):
        model = C.llama(hidden=256, layers=4).train()
        if ckpt:
            model.activation_checkpointing_enable(CONTEXT)
        params = lf.init(0, model, lf.LoRAConfig(r=16, alpha=32), targets=C.LLAMA_TARGETS_RE)
        rows[("lite_fn", ckpt)] = C.lite_train_step(model, params, loss)
        pmodel = C.llama(hidden=256, layers=4).train()
        pm = peft.get_peft_model(pmodel, peft.LoraConfig(r=16, lora_alpha=32, target_modules=C.LLAMA_TARGETS))
        if ckpt:
            pm.base_model.model.activation_checkpointing_enable({"use_reentrant": False})
        rows[("peft", ckpt)] = C.peft_train_step(pm, loss)
    peaks = {k: C.peak_step_bytes(step) for k, step in rows.items()}
    times = C.interleaved({f"{k[0]}/{k[1]}": v for k, v in rows.items()}, args.repeats, clock=time.process_time, verbose=False)
    base = peaks[("lite_fn", False)]
    for (who, ckpt), peak in peaks.items():
        tab.add(who, "on" if ckpt else "off", C.fmt_bytes(peak), C.ratio(peak / base), C.ms(times[f"{who}/{ckpt}"].median))
    tab.print("checkpointing memory")
    goals = [
        f"- lite_fn checkpointed vs peft checkpointed: {C.goal(peaks[('lite_fn', True)] / peaks[('peft', True)], '<=', 1.0)}",
        f"- lite_fn checkpointed vs lite_fn unchecked: {C.goal(peaks[('lite_fn', True)] / base, '<=', 0.5)}",
    ]
    print("\n".join(goals))
    return (
        f"One LoRA r=16 train step on every block linear of {C.model_desc(C.llama(hidden=256, layers=4))}, "
        f"batch 1 × {seq} tokens, AdamW; transformers' activation checkpointing (lite_fn with "
        f"`lf.checkpoint_context`). Peak of torch's CPU allocator during one steady-state step.\n\n"
        + tab.markdown()
        + "\n\n"
        + "\n".join(goals)
    )


class _CallThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def launch_table(args) -> str:
    import peft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = C.llama(hidden=64, layers=4, vocab=128, intermediate=128)
        params = lf.init(0, model, lf.LoRAConfig(r=8, alpha=16), targets=C.LLAMA_TARGETS_RE)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=C.LLAMA_TARGETS))
        pm.eval()
        x = C.tokens(1, 8, 128, seed=2)
        number = 5 if args.quick else 50

        tab = C.Table(["call", "base", "floor (call-through mode)", "peft", "lite_fn", "lite_fn / peft", "goal"])
        lines = []
        frozen = copy.deepcopy(model).requires_grad_(False)  # what peft does to its copy; lite_fn never does it itself
        rows = (("forward, no grad", False, model), ("forward, grad", True, model), ("forward, grad, frozen base", True, frozen))
        for name, grad, base in rows:

            def floor(base=base):
                with _CallThrough():
                    base(x)

            with torch.set_grad_enabled(grad):
                t = C.interleaved(
                    {
                        "base": lambda: base(x),
                        "floor": floor,
                        "peft": lambda: pm(x),
                        "lite": lambda: lf.call(base, params, x),
                    },
                    args.repeats,
                    number=number,
                    clock=time.process_time,
                    verbose=False,
                )
            m = {k: v.median for k, v in t.items()}
            r = m["lite"] / m["peft"]
            tab.add(
                name,
                C.ms(m["base"]),
                f"{C.ms(m['floor'])} ({m['floor'] / m['base']:.2f}x)",
                f"{C.ms(m['peft'])} ({m['peft'] / m['base']:.2f}x)",
                f"{C.ms(m['lite'])} ({m['lite'] / m['base']:.2f}x)",
                f"{r:.2f}",
                C.goal(r, "<=", 1.0),
            )
        for name, base_model in (("train step", model), ("train step, frozen base", frozen)):
            lite_step = C.lite_train_step(base_model, params, C.causal_lm_loss(x))
            peft_step = C.peft_train_step(pm, C.causal_lm_loss(x))
            t = C.interleaved(
                {"peft": peft_step, "lite": lite_step},
                args.repeats,
                number=max(1, number // 5),
                clock=time.process_time,
                verbose=False,
            )
            r = t["lite"].median / t["peft"].median
            tab.add(name, "", "", C.ms(t["peft"].median), C.ms(t["lite"].median), f"{r:.2f}", C.goal(r, "<=", 1.0))
        tab.print("launch-bound calls (1 thread)")
        lines.append(tab.markdown())
    finally:
        torch.set_num_threads(threads)
    return (
        "Tiny Llama (hidden 64, 4 layers, intermediate 128, vocab 128), LoRA r=8 on all seven block linears, "
        "batch 1 × 8 tokens, 1 thread; per call, interleaved medians of process CPU time. The floor column is the "
        "base model under a TorchFunctionMode that only calls through.\n\n" + "\n".join(lines)
    )


def generation_table(args) -> str:
    import peft

    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    model = C.llama(hidden=256, layers=4)
    params = lf.init(0, model, lf.LoRAConfig(r=8, alpha=16), targets=r"(q_proj|v_proj|o_proj|down_proj)$")
    for bv in params.values():
        for leaves in bv.values():
            leaves["B"].data.normal_(0, 0.02)  # a trained-looking adapter, so the tokens differ from the base
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)).eval()
    with torch.no_grad():
        for path, bv in params.items():
            layer = pm.base_model.model.get_submodule(path)
            layer.lora_B["default"].weight.copy_(bv["lora"]["B"])
            layer.lora_A["default"].weight.copy_(bv["lora"]["A"])
    new = 8 if args.quick else 32
    prompt = C.tokens(1, 16, 2048, seed=3)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def lite():
        with lf.applied(model, params):
            return model.generate(prompt, **gen)

    same = torch.equal(lite(), pm.generate(input_ids=prompt, **gen))
    t = C.interleaved(
        {"base": lambda: model.generate(prompt, **gen), "peft": lambda: pm.generate(input_ids=prompt, **gen), "lite": lite},
        args.repeats,
        clock=time.process_time,
        verbose=False,
    )
    m = {k: v.median for k, v in t.items()}
    r = m["lite"] / m["peft"]
    tab = C.Table(["contender", f"CPU time, {new} tokens", "vs base", "same tokens as peft", "goal"])
    tab.add("base model", C.ms(m["base"]), "1.00x", "", "")
    tab.add("peft", C.ms(m["peft"]), C.ratio(m["peft"] / m["base"]), "", "")
    tab.add(
        "lite_fn (lf.applied)", C.ms(m["lite"]), C.ratio(m["lite"] / m["base"]), str(same), f"lite/peft {C.goal(r, '<=', 1.0)}"
    )
    steer = lf.init(0, model, lf.AntiPaSTOConfig(r=8, block_size=4), targets=r"(o_proj|down_proj)$")
    sweep = lf.stack([lf.with_alpha(steer, float(a)) for a in torch.linspace(-1, 1, 9)])
    rows = prompt.repeat(9, 1)

    def steered():
        with lf.applied(model, sweep, route=torch.arange(9)):
            return model.generate(rows, **gen)

    t = C.interleaved(
        {"base": lambda: model.generate(rows, **gen), "lite": steered}, args.repeats, clock=time.process_time, verbose=False
    )
    r = t["lite"].median / t["base"].median
    tab.add(
        "AntiPaSTO: 9 alphas, one routed generate (vs base, same 9 rows)",
        C.ms(t["lite"].median),
        C.ratio(r),
        "",
        C.goal(r, "<=", 1.25),
    )
    tab.print("generation")
    return (
        f"{C.model_desc(model)}; one LoRA r=8 on q/v/o/down_proj; batch 1, prompt 16, {new} new tokens, greedy, "
        f"KV cache. AntiPaSTO row: r=8, block size 4 on o_proj/down_proj, 9 rows of the same prompt. Interleaved "
        f"medians of process CPU time.\n\n" + tab.markdown()
    )


def main():
    args = C.finish_args(C.parser(__doc__.split("\n")[0]).parse_args(), default_repeats=7)
    _quiet()
    body = "\n\n".join(
        [
            "### Activation checkpointing: peak memory\n\n" + memory_table(args),
            "### Launch-bound calls\n\n" + launch_table(args),
            "### Greedy generation, one adapter\n\n" + generation_table(args),
        ]
    )
    C.write_section("everyday", "The everyday job: checkpointing memory, launch-bound calls, generation", body, args)


if __name__ == "__main__":
    main()
