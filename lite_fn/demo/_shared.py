"""What both demo programs use: transformers imported offline and quietly, and a run on a set number of threads.

The programs (``sentiment``, ``steer``) import this module and never each other.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch


def import_transformers(command: str, first: str | None = None):
    """transformers, offline (HF_HUB_OFFLINE=1 unless set) and quiet (no progress bars, errors only); the module
    ``first`` (if any) is imported before it. A missing module exits saying that ``command`` needs the [demo] extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if first is not None:
            importlib.import_module(first)
        import transformers
    except ImportError as e:
        raise SystemExit(f"{command} needs the [demo] extra ({e.name} is missing): pip install 'lite-fn[demo]'") from e
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def run_with_threads(run, args, threads: int | None) -> dict:
    """``run(args)`` with torch on ``threads`` threads (None: as it is), restored afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            # torch has no vmap batching rule for CPU flash attention yet and loops over the batch
            # there instead: correct, only slower; the warning would repeat on every vmapped call
            warnings.filterwarnings("ignore", message=".*have not yet implemented the batching rule.*")
            return run(args)
    finally:
        torch.set_num_threads(before)  # main() may run inside another process (the tests)
