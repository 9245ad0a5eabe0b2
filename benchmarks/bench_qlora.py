"""QLoRA: a LoRA train step on a 4-bit (nf4) base vs the fp32 base, and vs peft's QLoRA, same data.

    .venv/bin/python benchmarks/bench_qlora.py            # the recorded setting
    .venv/bin/python benchmarks/bench_qlora.py --quick    # smoke run, prints only

The benchmark Llama (hidden 256, 4 layers) is saved once and reloaded in 4 bits with bitsandbytes
(nf4, compute dtype float32, on the CPU) for lite_fn and for peft separately; both train LoRA r=8
on all seven block linears (forward, backward, AdamW). Models stay in train mode from the start
(bitsandbytes repacks CPU 4-bit weights for inference on the first eval forward, and the repacked
kernel passes no gradient). Time: process CPU time, medians of interleaved repeats. Memory: the
stored weight bytes; the step's peak memory is measured on the GPU (bench_gpu.py), since the CPU
allocator probe (_common.peak_step_bytes) reported the same peak for all three contenders here.
"""

from __future__ import annotations

import tempfile
import time
import warnings

import _common as C
import torch


def main():
    import transformers as tf

    p = C.parser(__doc__.splitlines()[0])
    args = C.finish_args(p.parse_args(), default_repeats=9)
    hidden, layers, B, T = (128, 2, 2, 32) if args.quick else (256, 4, 4, 64)
    C.banner("bench_qlora", args)
    warnings.filterwarnings("ignore")
    dense = C.llama(hidden=hidden, layers=layers, attn="eager").train().requires_grad_(False)
    folder = tempfile.mkdtemp(prefix="lite_fn-bench-qlora-")
    dense.save_pretrained(folder)
    q = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load4():
        m = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=tf.BitsAndBytesConfig(**q), device_map="cpu")
        m.config._attn_implementation = "eager"
        return m.train().requires_grad_(False)

    q_lite, q_peft = load4(), load4()
    x = C.tokens(B, T, dense.config.vocab_size)
    fns = {
        "lite_fn fp32 base": C.lora_train_step(dense, x, r=8),
        "lite_fn 4-bit base": C.lora_train_step(q_lite, x, r=8),
        "peft QLoRA (4-bit)": C.peft_lora_train_step(q_peft, x, r=8),
    }
    times = C.interleaved(fns, args.repeats, clock=time.process_time)
    weight_bytes = {
        "fp32": sum(t.numel() * t.element_size() for t in dense.parameters()),
        "4-bit": sum(t.numel() * t.element_size() for t in q_lite.parameters()),
    }
    tab = C.Table(["contender", "step (CPU ms)", "time / lite_fn 4-bit"])
    ref = "lite_fn 4-bit base"
    for n in fns:
        tab.add(n, C.ms(times[n].median), C.ratio(times[n].median / times[ref].median))
    tab.print("LoRA train step on a 4-bit base (CPU time, medians)")
    body = (
        f"{C.model_desc(dense)}, eager attention; LoRA r=8 on all seven block linears; batch {B}×{T} tokens; "
        f"{args.repeats} interleaved repeats; process CPU time. Stored weights: fp32 {C.fmt_bytes(weight_bytes['fp32'])}, "
        f"4-bit {C.fmt_bytes(weight_bytes['4-bit'])} (embeddings and head stay fp32).\n\n"
        + tab.markdown()
        + f"\n\nlite_fn on the 4-bit base vs peft QLoRA: {times['peft QLoRA (4-bit)'].median / times[ref].median:.2f}x faster "
        f"(peft/lite_fn time). On CPU the 4-bit kernel dequantizes per call, so the 4-bit base is slower than fp32 "
        f"here; its gain is the weight memory."
    )
    C.write_section("bench_qlora", "QLoRA train step (bench_qlora.py)", body, args)


if __name__ == "__main__":
    main()
