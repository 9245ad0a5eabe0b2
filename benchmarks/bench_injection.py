"""lf.call before and after the injection redesign, eager and compiled, side by side in one process.

    .venv/bin/python benchmarks/bench_injection.py            # the recorded setting
    .venv/bin/python benchmarks/bench_injection.py --quick    # smoke run, prints only

"before" is the previous mechanism, reproduced here in a few lines so both run in one process:
functional_call with detached base weights plus an adapted ``forward`` assigned on each targeted
module for the length of the call (not thread-safe; kept only as the baseline). "after" is
``lf.call``: a per-thread TorchFunctionMode, nothing assigned to the model. Both compute the same
outputs (checked). Times are process CPU time (``time.process_time``, all threads), medians.
"""

from __future__ import annotations

import time
import warnings

import _common as C
import torch
from torch.func import functional_call

import lite_fn as lf


def before_call(model, params, *args, **kwargs):
    """The previous lf.call: functional_call + forward assignment on the shared modules."""
    modules = []
    try:
        for path, by_variant in params.items():
            ((name, leaves),) = by_variant.items()
            module, variant = model.get_submodule(path), lf.variants.get(name)

            def forward(x, module=module, variant=variant, leaves=leaves):
                return variant.apply(leaves, module.weight, x, module.bias)

            module.forward = forward
            modules.append(module)
        base = {n: p.detach() for n, p in model.named_parameters()}
        return functional_call(model, base, args, kwargs, tie_weights=True, strict=False)
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


def main():
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--no-compile", action="store_true")
    args = C.finish_args(p.parse_args(), default_repeats=15)
    hidden, layers, T = (128, 2, 16) if args.quick else (256, 4, 32)
    C.banner("bench_injection", args)
    warnings.filterwarnings("ignore", category=UserWarning)
    model = C.llama(hidden=hidden, layers=layers, attn="eager").requires_grad_(False)
    params = lf.init(0, model, lf.LoRAConfig(r=8, alpha=16), targets=C.LLAMA_TARGETS_RE)
    params = {
        k: {
            n: {leaf: (v + 0.01 * torch.randn_like(v)).detach().requires_grad_(v.requires_grad) for leaf, v in lv.items()}
            for n, lv in bv.items()
        }
        for k, bv in params.items()
    }
    tab = C.Table(["workload", "tokens", "base", "before", "after", "before/base", "after/base", "after/before"])
    rows = {}
    for B in (1, 16):
        x = C.tokens(B, T, model.config.vocab_size)
        with torch.no_grad():
            assert torch.equal(before_call(model, params, x).logits, lf.call(model, params, x).logits)

        def fwd(f, x=x):
            with torch.no_grad():
                return f(x)

        fns = {
            "base": lambda: fwd(lambda x: model(x)),
            "before": lambda: fwd(lambda x: before_call(model, params, x)),
            "after": lambda: fwd(lambda x: lf.call(model, params, x)),
        }
        rows[f"eager forward, batch {B}"] = (B * T, C.interleaved(fns, args.repeats, clock=time.process_time))
    x = C.tokens(4, T, model.config.vocab_size)

    def step(f):
        def run():
            loss = f(x).logits.float().square().mean()
            loss.backward()
            for leaf in lf.trainable(params):
                leaf.grad = None

        return run

    fns = {"before": step(lambda x: before_call(model, params, x)), "after": step(lambda x: lf.call(model, params, x))}
    rows["eager train step (fwd+bwd), batch 4"] = (4 * T, C.interleaved(fns, args.repeats, clock=time.process_time))
    compile_s = {}
    if not args.no_compile:
        compiled = {}
        for name, f in (
            ("base", lambda x: model(x).logits),
            ("before", lambda x: before_call(model, params, x).logits),
            ("after", lambda x: lf.call(model, params, x).logits),
        ):
            g = torch.compile(f, fullgraph=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                g(x)
            compile_s[name] = time.perf_counter() - t0
            compiled[name] = g
        with torch.no_grad():
            assert torch.allclose(compiled["after"](x), compiled["before"](x), atol=1e-5)

        def cfwd(g):
            def run():
                with torch.no_grad():
                    return g(x)

            return run

        fns = {n: cfwd(g) for n, g in compiled.items()}
        rows["compiled forward (fullgraph), batch 4"] = (4 * T, C.interleaved(fns, args.repeats, clock=time.process_time))
    for name, (tokens, t) in rows.items():
        m = {n: t[n].median for n in t}
        base = m.get("base")  # the frozen base alone has nothing to differentiate in a train step
        tab.add(
            name,
            tokens,
            C.ms(base) if base else "—",
            C.ms(m["before"]),
            C.ms(m["after"]),
            C.ratio(m["before"] / base) if base else "—",
            C.ratio(m["after"] / base) if base else "—",
            C.ratio(m["after"] / m["before"]),
        )
    tab.print("lf.call before/after the injection redesign (CPU time, medians)")
    body = (
        f"{C.model_desc(model)}, eager attention; LoRA r=8 on all seven block linears; {T} tokens per sequence; "
        f"{args.repeats} interleaved repeats; times are process CPU time (all threads).\n\n" + tab.markdown()
    )
    if compile_s:
        body += "\n\nCompile time (first call): " + ", ".join(f"{n} {s:.1f} s" for n, s in compile_s.items())
    C.write_section("bench_injection", "Injection: lf.call before and after the redesign (bench_injection.py)", body, args)


if __name__ == "__main__":
    main()
