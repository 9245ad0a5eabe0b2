"""K adapters trained with peft, loaded from disk and evaluated at once: lite_fn vs peft, load time included.

    .venv/bin/python benchmarks/bench_peft_load.py            # the recorded setting
    .venv/bin/python benchmarks/bench_peft_load.py --quick    # smoke run, prints only

K peft LoRA directories (ranks 4/8/16 and three target sets, cycled; written once by peft's
save_pretrained) serve one request each: row i of the batch uses adapter i. Every contender starts
from the directories on disk and an unadapted model, and ends with the logits of all K rows:

  lite route   params = [lf.load_peft(d, model=m) for d in dirs]; s = lf.stack(params, pad=True)
               lf.call(m, s, x_all, route=arange(K))               one forward, every row its adapter
  lite vmap    the same loads and stack, then vmap(lambda p, x: lf.call(m, p, x))(s, x_all.view(K, 1, T))
  peft mixed   PeftModel.from_pretrained(m, dirs[0]); load_adapter(d_k, f"a{k}") for the rest;
               pm(x_all, adapter_names=[...])                      peft's mixed batch
  peft loop    the same loads; for k: pm.set_adapter(f"a{k}"); pm(x_k)

peft wraps the model it is given in place, so each peft run gets its own copy of the base model,
made before the timed region (lite_fn never modifies the model and needs none). Times are process
CPU time (``time.process_time``, all threads), medians of interleaved repeats; all contenders
compute the same logits (checked).
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path

import _common as C
import torch
from torch.func import vmap

import lite_fn as lf

RANKS = (4, 8, 16)
TARGET_SETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], C.LLAMA_TARGETS)


def write_adapters(base, K: int, folder: Path) -> list[Path]:
    """K peft LoRA directories with non-trivial weights (B ≠ 0), different ranks and target sets."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for k in range(K):
        r = RANKS[k % len(RANKS)]
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGET_SETS[k % len(TARGET_SETS)], lora_dropout=0.0)
        pm = get_peft_model(copy.deepcopy(base), cfg)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        dirs.append(folder / f"a{k}")
        pm.save_pretrained(dirs[-1])
    return dirs


def lite_contenders(base, dirs, x_all, T):
    K = len(dirs)
    route = torch.arange(K)

    def loaded():
        return lf.stack([lf.load_peft(d, model=base) for d in dirs], pad=True)

    return {
        "lite route": lambda: lf.call(base, loaded(), x_all, route=route).logits,
        "lite vmap": lambda: vmap(lambda p, x: lf.call(base, p, x).logits)(loaded(), x_all.view(K, 1, T)).reshape(K, T, -1),
    }


def peft_contenders(copies, dirs, x_all):
    from peft import PeftModel

    K = len(dirs)
    names = [f"a{k}" for k in range(K)]

    def loaded():
        pm = PeftModel.from_pretrained(next(copies), str(dirs[0]), adapter_name=names[0])
        for name, d in zip(names[1:], dirs[1:]):
            pm.load_adapter(str(d), adapter_name=name)
        return pm.eval()

    def loop():
        pm = loaded()
        outs = []
        for k, name in enumerate(names):
            pm.set_adapter(name)
            outs.append(pm(x_all[k : k + 1]).logits)
        return torch.cat(outs)

    return {"peft mixed": lambda: loaded()(x_all, adapter_names=names).logits, "peft loop": loop}


def main():
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="*", default=None, help="adapter counts (default 4 16 64)")
    p.add_argument("--attn", default="eager", help="attention implementation (eager: vmap batches it fully)")
    args = C.finish_args(p.parse_args(), default_repeats=5)
    Ks = args.ks or ([2, 4] if args.quick else [4, 16, 64])
    hidden, layers, T = (128, 2, 16) if args.quick else (256, 4, 32)
    C.banner("bench_peft_load", args)
    warnings.filterwarnings("ignore", message=".*adapter.*")  # peft chatter about loading many adapters
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")

    base = C.llama(hidden=hidden, layers=layers, attn=args.attn).requires_grad_(False)
    desc = C.model_desc(base)
    tab = C.Table(
        [
            "K",
            "tokens",
            "lite route ms",
            "lite vmap ms",
            "peft mixed ms",
            "peft loop ms",
            "lite load ms",
            "peft load ms",
            "peft mixed/lite best",
            "peft loop/lite best",
        ]
    )
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        all_dirs = write_adapters(base, max(Ks), Path(tmp))
        for K in Ks:
            dirs = all_dirs[:K]
            x_all = C.tokens(K, T, base.config.vocab_size, seed=K)
            n_peft = 2 * (args.repeats + 2) + 2  # one fresh base copy per peft run (warm-up, repeats, check)
            copies = iter([copy.deepcopy(base) for _ in range(n_peft)])
            fns = {**lite_contenders(base, dirs, x_all, T), **peft_contenders(copies, dirs, x_all)}
            with torch.no_grad():
                outs = {n: f().reshape(K, T, -1) for n, f in fns.items()}
                diff = max(float((o - outs["peft loop"]).abs().max()) for o in outs.values())
                effect = float((outs["peft loop"] - base(x_all).logits).abs().max())
            checks.append(f"K={K}: max |logits − peft loop| = {diff:.1e} (the adapters move the logits by up to {effect:.1e})")
            print(f"  K={K} ({K * T} tokens); check: {checks[-1]}", flush=True)
            with torch.no_grad():
                t = C.interleaved(fns, args.repeats, clock=time.process_time)
            m = {n: t[n].median for n in fns}
            # the loading part alone: how much of each contender is reading the directories
            lite_load, peft_load = _load_times(base, dirs, args.repeats)
            best = min(m["lite route"], m["lite vmap"])
            tab.add(
                K,
                K * T,
                C.ms(m["lite route"]),
                C.ms(m["lite vmap"]),
                C.ms(m["peft mixed"]),
                C.ms(m["peft loop"]),
                C.ms(lite_load),
                C.ms(peft_load),
                C.ratio(m["peft mixed"] / best),
                C.ratio(m["peft loop"] / best),
            )
    tab.print("K peft adapters from disk, evaluated at once (median CPU ms, load included)")
    print("\n" + "\n".join(checks))
    body = f"""
Model: {desc}; attention `{args.attn}`. K peft LoRA adapters (ranks {"/".join(map(str, RANKS))} and target sets
{", ".join("+".join(s) for s in TARGET_SETS)}, cycled; alpha = 2r; B ≠ 0) written by peft's `save_pretrained`;
one request of T={T} tokens per adapter. Every contender starts from the directories on disk and an
unadapted model and ends with all K rows' logits (forward only, no_grad): lite_fn loads each with
`lf.load_peft`, pads and stacks them (`lf.stack(..., pad=True)`) and runs one routed (`route=`) or vmapped
call; peft runs `PeftModel.from_pretrained` + `load_adapter` per adapter, then either one mixed batch
(`adapter_names=`) or a `set_adapter` loop. peft wraps the model in place, so each peft run gets a fresh
copy of the base made outside the timed region. Process CPU time (`time.process_time`), median of
{args.repeats} interleaved repeats. "lite load" / "peft load" time the loading part alone
(lite: load_peft × K + stack; peft: from_pretrained + load_adapter × (K−1)).

{tab.markdown()}

Correctness: {"; ".join(checks)}.
"""
    C.write_section("bench_peft_load", "peft adapters from disk, evaluated at once (bench_peft_load.py)", body, args)


def _load_times(base, dirs, repeats: int) -> tuple[float, float]:
    """Median CPU seconds of (load_peft × K + stack(pad=True)) and of (from_pretrained + load_adapter × (K−1))."""
    from peft import PeftModel

    copies = iter([copy.deepcopy(base) for _ in range(repeats + 1)])

    def peft_load():
        pm = PeftModel.from_pretrained(next(copies), str(dirs[0]), adapter_name="a0")
        for k, d in enumerate(dirs[1:], 1):
            pm.load_adapter(str(d), adapter_name=f"a{k}")
        return pm

    def lite_load():
        return lf.stack([lf.load_peft(d, model=base) for d in dirs], pad=True)

    t = C.interleaved({"lite load": lite_load, "peft load": peft_load}, repeats, verbose=False, clock=time.process_time)
    return t["lite load"].median, t["peft load"].median


if __name__ == "__main__":
    main()
