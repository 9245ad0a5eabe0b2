"""Shared pieces of the benchmark scripts: arguments, the Llama-shaped model, interleaved timing
with medians, peak-memory probes, markdown tables, RESULTS.md sections and PNG plots.

Benchmarks are scripts, not tests: they print and record numbers, and compare them against the
goals of issue 4 as "pass"/"miss" — they never assert on a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"

if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere, without installing
    sys.path.insert(0, str(REPO))

HEADER = """\
# lite_fn benchmarks

Produced by the scripts in `benchmarks/` (`bash benchmarks/run_all.sh` runs them all); each
script rewrites only its own section below (between its `BEGIN`/`END` markers) and saves its
plot beside this file. Every section records the exact command, the machine and the date.

Method:

- **Same process, interleaved.** Everything compared in one table is built and timed in one
  process. Inside each repeat every contender runs once, and the order rotates from one repeat
  to the next, so slow drift of the machine (other jobs, thermal state) hits all contenders alike.
- **Medians** of the repeats are reported; one warm-up call per contender is discarded. Times are wall-clock (`time.perf_counter`), CPU, fp32,
  the default `torch.get_num_threads()` recorded in each section.
- **The limit** is the plain base model without adapters doing the same total work (same total
  batch): an adapter method cannot beat it, so `lite_fn/limit` is the overhead of adapting.
  Ratios `lite_fn/limit` (lower is better, 1.00 = free) and `peft/lite_fn` (higher = lite_fn faster).
- **Goals** (issue 4) are printed as pass/miss next to the measured ratio; nothing asserts.
- **Memory on CPU.** torch has no `max_memory_allocated` on CPU, and `tracemalloc` does not see
  torch's allocator, so train-step memory is the peak of torch's own CPU allocation counter
  during one steady-state step (`torch.profiler` with `profile_memory=True`; the allocator
  reports its running total of live bytes with every allocation). It counts every tensor the step
  allocates (activations, gradients, temporaries) above what was live when the step started
  (model weights, adapter params, optimizer state), so it is exact, repeatable and independent of
  allocator caching, unlike an RSS delta. Calibration memory uses process RSS instead (each size
  in a fresh subprocess), because there the claim is about the whole process.
- Timings on a shared or small machine are noisy; compare ratios within one table, not absolute
  times across sections or machines.
"""


# ----------------------------------------------------------------------------- arguments
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny smoke setting for development (prints only, unless --write)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument(
        "--write",
        dest="write",
        action="store_true",
        default=None,
        help="write RESULTS.md section + PNG (default: yes unless --quick)",
    )
    p.add_argument("--no-write", dest="write", action="store_false", help="print only")
    p.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md to update (the PNG goes beside it)")
    return p


def finish_args(args: argparse.Namespace, default_repeats: int, quick_repeats: int = 3) -> argparse.Namespace:
    if args.write is None:
        args.write = not args.quick
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else default_repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "—"

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": str(cores),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "peft": version("peft"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "load avg": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "—",
    }


def machine_line() -> str:
    return ", ".join(f"{k} {v}" for k, v in machine_info().items())


def code_version() -> str:
    """The commit benchmarked, and whether lite_fn/ had uncommitted changes (the library is measured as is)."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lite_fn"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" + uncommitted changes in lite_fn/" if dirty else "")


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(REPO))
    except ValueError:
        exe_s = "python"
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = sys.argv[0]
    return " ".join([exe_s, script_s, *map(shlex.quote, sys.argv[1:])])


# ----------------------------------------------------------------------------- models
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_TARGETS_RE = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def llama(
    hidden: int = 256,
    layers: int = 4,
    attn: str = "sdpa",
    vocab: int = 2048,
    seed: int = 0,
    intermediate: int | None = None,
    heads: int = 4,
):
    """A Llama-shaped causal LM with random weights (transformers.LlamaConfig), in eval mode.

    intermediate defaults to 2.75·hidden rounded to a multiple of 64 (704 for hidden 256; Llama-7B
    uses 2.69·hidden), so ROAD's default group size 64 divides every output width.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if intermediate is None:
        intermediate = 64 * round(2.75 * hidden / 64)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=1024,
    )
    cfg._attn_implementation = attn
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    return model


def model_desc(model) -> str:
    c = model.config
    return (
        f"Llama (transformers.LlamaConfig): hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads, intermediate {c.intermediate_size}, vocab {c.vocab_size}, "
        f"random weights, fp32"
    )


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- train steps
def causal_lm_loss(x: torch.Tensor) -> Callable:
    """A loss_fn for the train steps below: the causal-LM loss of a forward ``f`` on the tokens x (labels x)."""
    return lambda f: f(x, labels=x).loss


def lite_train_step(model, params: dict, loss_fn: Callable, lr: float = 1e-4) -> Callable[[], None]:
    """One lite_fn train step: loss_fn(forward through lf.call with params), backward, AdamW on the trainable leaves."""
    import lite_fn as lf

    opt = torch.optim.AdamW(lf.trainable(params), lr=lr)

    def step():
        loss = loss_fn(lambda *a, **k: lf.call(model, params, *a, **k))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peft_train_step(pm, loss_fn: Callable, lr: float = 1e-4) -> Callable[[], None]:
    """The same step for a peft model: loss_fn(pm), backward, AdamW on the parameters that require grad."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)

    def step():
        loss = loss_fn(pm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def lora_train_step(model, x: torch.Tensor, r: int) -> Callable[[], None]:
    """lite_fn's causal-LM train step on x with a LoRA of rank r (alpha 2r) on every block linear of a Llama."""
    import lite_fn as lf

    params = lf.init(0, model, lf.LoRAConfig(r=r, alpha=2 * r), targets=LLAMA_TARGETS_RE)
    return lite_train_step(model, params, causal_lm_loss(x))


def peft_lora_train_step(model, x: torch.Tensor, r: int) -> Callable[[], None]:
    """The same step with peft; get_peft_model wraps (and changes) ``model``."""
    import peft

    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS))
    return peft_train_step(pm, causal_lm_loss(x))


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.samples) < 4:
            return min(self.samples), max(self.samples)
        q = statistics.quantiles(self.samples, n=4)
        return q[0], q[2]


def interleaved(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    number: int = 1,
    verbose: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time every contender ``repeats`` times, alternating inside each repeat (rotating order).

    Each sample is the mean of ``number`` back-to-back calls, read from ``clock`` (wall-clock by
    default; ``time.process_time`` for process CPU time, all threads). The GC is collected before and
    disabled during each sample. Returns {name: Timing}; report ``.median``.
    """
    names = list(contenders)
    out = {n: Timing() for n in names}
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    gc_was = gc.isenabled()
    try:
        for rep in range(repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for n in order:
                gc.collect()
                gc.disable()
                t0 = clock()
                for _ in range(number):
                    contenders[n]()
                dt = (clock() - t0) / number
                if gc_was:
                    gc.enable()
                out[n].samples.append(dt)
            if verbose:
                print(
                    f"    repeat {rep + 1}/{repeats}: " + ", ".join(f"{n} {out[n].samples[-1] * 1e3:.1f}ms" for n in names),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if gc_was:
            gc.enable()
    return out


def once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- memory
@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(fn: Callable[[], object]) -> int:
    """Peak of torch's CPU allocator total during ``fn()``, above what was live when it started.

    Uses the profiler's allocation events (``profile_memory=True``): each carries the allocator's
    running total of allocated bytes, counted from the start of profiling. On CUDA use
    ``torch.cuda.max_memory_allocated`` instead.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        from torch._C._profiler import _EventType

        peak = 0
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                peak = max(peak, node.extra_fields.total_allocated)
            stack.extend(node.children)
        return int(peak)
    except Exception:  # older/newer torch without the event tree: running sum of [memory] events
        evs = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
        run = peak = 0
        for e in evs:
            run += e.cpu_memory_usage
            peak = max(peak, run)
        return int(peak)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class RSSPeak:
    """Context manager sampling this process's RSS every ``interval`` s: .baseline, .peak, .growth."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        self.baseline = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ----------------------------------------------------------------------------- formatting
def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def timing_cells(m: dict[str, float], shown: Sequence[str], ratios: Sequence[tuple[str, str]]) -> list[str]:
    """A table row's timing cells: m[n] in ms for each n of ``shown``, then m[a] / m[b] for each (a, b) of ``ratios``."""
    return [ms(m[n]) for n in shown] + [ratio(m[a] / m[b]) for a, b in ratios]


def goal(value: float, op: str, target: float) -> str:
    """'pass'/'miss' for value ``op`` target, op in {'<=', '>='}."""
    ok = value <= target if op == "<=" else value >= target
    return f"{'pass' if ok else 'MISS'} ({value:.2f} {op} {target:g})"


class Table:
    def __init__(self, headers: Sequence[str]):
        self.headers = list(headers)
        self.rows: list[list[str]] = []

    def add(self, *cells) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"row has {len(cells)} cells, table has {len(self.headers)} columns")
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h) for i, h in enumerate(self.headers)]

        def line(cells):
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

        return "\n".join([line(self.headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, self.rows)])

    def print(self, title: str | None = None) -> None:
        if title:
            print(f"\n## {title}")
        print(self.markdown(), flush=True)


# ----------------------------------------------------------------------------- RESULTS.md
def _markers(key: str) -> tuple[str, str]:
    return f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"


def write_section(key: str, title: str, body: str, args, png: str | None = None) -> None:
    """Replace (or append) this script's section of RESULTS.md; the header is (re)written on top."""
    if not args.write:
        return
    path: Path = args.results
    begin, end = _markers(key)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        begin,
        f"## {title}",
        "",
        f"- command: `{command_line()}`",
        f"- machine: {machine_line()}",
        f"- code: {CODE_AT_START} (at start of the run)",
        f"- date: {now}",
        "",
        body.strip(),
        "",
    ]
    if png:
        parts += [f"![{title}]({png})", ""]
    parts.append(end)
    section = "\n".join(parts)
    text = path.read_text() if path.exists() else ""
    # everything before the first section is the header, rewritten from HEADER every time
    rest = "<!-- BEGIN " + text.split("<!-- BEGIN ", 1)[1] if "<!-- BEGIN " in text else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    rest = pattern.sub(lambda _: section, rest) if pattern.search(rest) else (rest.rstrip() + "\n\n" + section).lstrip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "\n" + rest.rstrip() + "\n")
    print(f"\nwrote section {key!r} of {path}", flush=True)


def save_plot(fig, name: str, args) -> str | None:
    """Save a matplotlib figure as <results dir>/<name>.png; returns the relative file name."""
    if not args.write:
        return None
    path = args.results.parent / f"{name}.png"
    tmp = path.with_suffix(".png.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except Exception as e:
        print(f"could not save {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    print(f"wrote {path}", flush=True)
    return path.name


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_png(
    name: str,
    args,
    draw: Callable,
    *,
    size: tuple[float, float],
    title: str,
    ylabel: str,
    xlabel: str | None = None,
    xlog: int | None = None,
    ylog: bool = False,
    legend_size: int = 8,
) -> str | None:
    """With --write, <name>.png (save_plot) of one axes: draw(ax) plots the data, then the axes get their log
    scales (``xlog``: the x axis's base), labels, title and legend. Without --write nothing is drawn: None."""
    if not args.write:
        return None
    fig, ax = pyplot().subplots(figsize=size)
    draw(ax)
    if xlog is not None:
        ax.set_xscale("log", base=xlog)
    if ylog:
        ax.set_yscale("log")
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    return save_plot(fig, name, args)


def banner(what: str, args) -> None:
    print(
        f"# {what}{' (--quick)' if args.quick else ''}\n# {machine_line()}\n# code {CODE_AT_START}\n# repeats {args.repeats}",
        flush=True,
    )


CODE_AT_START = code_version()  # read at import, next to the script's own `import lite_fn`
