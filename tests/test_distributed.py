"""Base models sharded over 2 CPU processes (gloo): the injection looks each layer's weight up at
call time, so FSDP2's unsharded parameters (swapped in during the forward) are adapted exactly."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import _fsdp_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_fsdp2_sharded_base_equals_unsharded(tmp_path):
    mp.spawn(_fsdp_worker.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        err_out, err_grad, scale = map(float, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert scale > 0.1
        assert err_out <= 1e-5 * scale, (rank, err_out)
        assert err_grad <= 1e-6, (rank, err_grad)
