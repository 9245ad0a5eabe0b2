"""Base models sharded over 2 CPU processes (gloo): the injection looks each layer's weight up at
call time, so FSDP2's unsharded parameters (swapped in during the forward) are adapted exactly; and
lf.Adapted trained under DistributedDataParallel (alone, with an FSDP2-sharded base, and under torchrun
in examples/train_ddp.py) equals one process trained on the full batches."""

import pathlib
import socket
import subprocess
import sys

import _ddp_worker
import pytest
import torch
import torch.multiprocessing as mp

import lite_fn as lf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of 2 gloo ranks runs every check below (starting processes costs more than the checks)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_ddp_worker.run, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@needs_dist
def test_fsdp2_sharded_base_equals_unsharded(spawned):
    for rank in range(2):  # written by _fsdp_worker.check
        err_out, err_grad, scale, _ = map(float, (spawned / f"rank{rank}.txt").read_text().split())
        assert scale > 0.1
        assert err_out <= 1e-5 * scale, (rank, err_out)
        assert err_grad <= 1e-6, (rank, err_grad)


@needs_dist
def test_fsdp2_with_activation_checkpointing_equals_unsharded(spawned):
    """transformers' checkpointing switch with lf.checkpoint_context on an FSDP2-sharded base: the recompute
    (inside FSDP2's unshard hooks, which stay outside the checkpoint) gives the unsharded step's gradients."""
    for rank in range(2):  # written by _fsdp_worker.check
        err_ckpt = float((spawned / f"rank{rank}.txt").read_text().split()[3])
        assert err_ckpt <= 1e-6, (rank, err_ckpt)


@needs_dist
def test_adapted_under_ddp_and_fsdp2_equals_one_process_on_the_full_batch(spawned):
    """lf.Adapted under DistributedDataParallel, each of 2 ranks on half of every batch (mean loss, so the
    all-reduced average is the full batch's gradient), plain and with the base sharded by FSDP2: after a
    few AdamW steps both ranks hold identical leaves, equal to one process trained on the full batches."""
    model, params, batches = _ddp_worker.setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = lf.Adapted(model, params)
    _ddp_worker.train(reference, batches)
    expected = reference.params
    moved = max((a - b).abs().max().item() for a, b in zip(lf.trainable(expected), lf.trainable(params)))
    assert moved > 1e-3  # the steps did something
    for setting in ("ddp", "fsdp"):
        ranks = [lf.load(spawned / f"{setting}_rank{r}.safetensors", model=model) for r in range(2)]
        for path, by_variant in expected.items():
            for name, leaves in by_variant.items():
                for leaf, want in leaves.items():
                    got0, got1 = ranks[0][path][name][leaf], ranks[1][path][name][leaf]
                    assert torch.equal(got0, got1), (setting, path, leaf)  # replicas agree bit for bit
                    err = (got0 - want).abs().max().item()
                    assert err <= 1e-5, (setting, path, leaf, err)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_dist
def test_train_ddp_example_runs_under_torchrun(tmp_path):
    """examples/train_ddp.py with 2 CPU processes under torch.distributed.run (torchrun)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(ROOT / "examples" / "train_ddp.py"),
        "--steps",
        "2",
        "--tiny",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "step 2/2" in done.stdout and "replicas identical on all 2 processes: True" in done.stdout, done.stdout
    saved = lf.load(tmp_path / "adapter.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in lf.trainable(saved))
