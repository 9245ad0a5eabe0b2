"""Train step (forward + backward + AdamW) with LoRA on layers adapted by weight substitution: a ConvNet's
convolutions and an MoE model's fused expert parameters, lite_fn vs peft, same model, same data.

    .venv/bin/python benchmarks/bench_layer_kinds.py            # the recorded setting
    .venv/bin/python benchmarks/bench_layer_kinds.py --quick    # smoke run, prints only

- ConvNet: a small ResNet-style stack of 3×3 convolutions (64 → 128 → 256 channels, strides 1/2/2, 32×32 images),
  LoRA r=8 on every convolution; peft: LoraConfig(target_modules=<the convolutions>) (its Conv2d LoRA: a k×k conv to r
  channels, then a 1×1 conv). lite_fn computes W' = W + s·B A once per step and runs each convolution once.
- MoE: transformers' Mixtral (fused 3-D experts), LoRA r=8 on every expert's gate_up_proj and down_proj;
  peft: LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]) (its ParamWrapper).
Time: median of interleaved repeats (process CPU time); memory: peak step bytes (see RESULTS.md header).
"""

from __future__ import annotations

import copy
import warnings

import _common as C
import torch
from bench_train_step import add_row, measure
from torch import nn

import lite_fn as lf


class ConvNet(nn.Module):
    def __init__(self, widths=(64, 128, 256), classes: int = 10):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
            layers += [nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def conv_targets(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def mixtral(hidden: int, layers: int, experts: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    return tf.MixtralForCausalLM(cfg)


def main():
    p = C.parser(__doc__.splitlines()[0])
    args = C.finish_args(p.parse_args(), default_repeats=11)
    C.banner("bench_layer_kinds", args)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import peft

    r = 8
    tab = C.Table(
        [
            "model",
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

    # ConvNet
    torch.manual_seed(0)
    widths = (16, 32, 64) if args.quick else (64, 128, 256)
    B, side = (4, 16) if args.quick else (16, 32)
    net = ConvNet(widths).train()
    for q in net.parameters():
        q.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(B, 3, side, side, generator=g), torch.randint(0, 10, (B,), generator=g)

    def ce(f):
        return nn.functional.cross_entropy(f(images), labels)

    targets = conv_targets(net)
    params = lf.init(0, net, lf.LoRAConfig(r=r, alpha=2 * r), targets=[rf"^{t.replace('.', '[.]')}$" for t in targets])
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    pm.train()

    def conv_limit():
        x = images.detach().requires_grad_(True)  # backward to the input: the least any adapter step must do
        ce(lambda z: net(x)).backward()

    print("  ConvNet", flush=True)
    fns = {"limit": conv_limit, "lite_fn": C.lite_train_step(net, params, ce), "peft": C.peft_train_step(pm, ce)}
    t, mem = measure(fns, args.repeats)
    goal = C.goal(t["lite_fn"] / t["peft"], "<=", 1.0) + " (time), " + C.goal(mem["lite_fn"] / mem["peft"], "<=", 1.0)
    conv_desc = f"ConvNet {'/'.join(map(str, widths))} ch, {B}×3×{side}×{side}, LoRA on {len(targets)} Conv2d"
    add_row(tab, conv_desc, t, mem, goal + " (memory)")
    del pm, params

    # MoE experts
    hidden, layers, experts = (64, 1, 4) if args.quick else (256, 2, 8)
    Bt, T = (2, 16) if args.quick else (4, 64)
    moe = mixtral(hidden, layers, experts).train()
    for q in moe.parameters():
        q.requires_grad_(False)
    x = C.tokens(Bt, T, moe.config.vocab_size)
    lm_loss = C.causal_lm_loss(x)
    params = lf.init(0, moe, lf.LoRAConfig(r=r, alpha=2 * r), targets=r"experts\.(gate_up_proj|down_proj)$")
    pcfg = peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    pm = peft.get_peft_model(copy.deepcopy(moe), pcfg)
    pm.train()

    print("  MoE", flush=True)
    fns = {
        "limit": _lm_limit(moe, x),
        "lite_fn": C.lite_train_step(moe, params, lm_loss),
        "peft": C.peft_train_step(pm, lm_loss),
    }
    t, mem = measure(fns, args.repeats)
    goal = C.goal(t["lite_fn"] / t["peft"], "<=", 1.0) + " (time), " + C.goal(mem["lite_fn"] / mem["peft"], "<=", 1.0)
    moe_desc = f"Mixtral hidden {hidden}, {layers} layers, {experts} experts (top 2), {Bt}×{T} tokens, LoRA on experts"
    add_row(tab, moe_desc, t, mem, goal + " (memory)")

    tab.print("Train step with LoRA on convolutions and MoE experts, median ms and peak step memory")
    body = f"""
LoRA r={r} (alpha {2 * r}), base frozen on both sides, same data; one AdamW step on the adapter leaves.
- **ConvNet**: every Conv2d of a ResNet-style stack ({"/".join(map(str, widths))} channels, two 3×3 convolutions
  per width, strides 1/2/2, global average pooling, a linear head), batch {B} of {side}×{side} RGB images,
  cross-entropy. peft: `LoraConfig(target_modules=<the {len(targets)} Conv2d>)` (its conv LoRA: a k×k convolution
  to r channels, then a 1×1 convolution, added to the base convolution's output). lite_fn: the merged weight
  W' = W + s·B A per convolution once per step (`merged` hook), one convolution per layer.
- **MoE**: transformers' `MixtralForCausalLM` (fused 3-D expert parameters) with LoRA on every expert's
  `gate_up_proj` and `down_proj`: lite_fn one adapter per expert (`targets=r"experts\\.(gate_up_proj|down_proj)$"`,
  leaves with a leading expert axis), peft `LoraConfig(target_parameters=[…])` (its ParamWrapper).
- **limit**: the frozen model's forward + backward down to its input (no adapter, no optimizer).
Median of {args.repeats} interleaved repeats, process CPU time (`time.process_time`, all threads), after one
warm-up step each.

{tab.markdown()}
"""
    C.write_section("bench_layer_kinds", "Train step on convolutions and MoE experts (bench_layer_kinds.py)", body, args)


def _lm_limit(model, x):
    emb = model.get_input_embeddings()

    def step():
        h = emb(x).detach().requires_grad_(True)
        model(inputs_embeds=h, labels=x).loss.backward()

    return step


if __name__ == "__main__":
    main()
