"""Run by test_distributed.py in 2 spawned CPU processes (gloo): _fsdp_worker's check, then lf.Adapted trained under
DistributedDataParallel, each rank on its half of every batch, once with the base model as it is
and once with the base sharded by FSDP2 (fully_shard per decoder layer and at the root). Each
rank saves its final leaves; the test compares them with one process trained on the full batches.

``setup`` and ``train`` are shared with the test, so both sides train the same thing.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from helpers import perturb
from models import tiny, tokens

import lite_fn as lf

TARGETS = r"(q_proj|v_proj|down_proj)$"
STEPS, BATCH, SEQ = 3, 4, 8


def setup():
    """(model, params, batches): the tiny Llama, LoRA off its init, STEPS batches of BATCH rows."""
    model = tiny("llama")
    params = lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS)
    params = {p: {n: perturb(lv, i + 1) for n, lv in bv.items()} for i, (p, bv) in enumerate(params.items())}
    batches = [tokens(BATCH, SEQ, seed=100 + s) for s in range(STEPS)]
    return model, params, batches


def train(module, batches, rows=slice(None)):
    """AdamW (weight decay on) over module.parameters(), the model's mean loss on batch[rows]."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    for x in batches:
        x = x[rows]
        loss = module(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import _fsdp_worker

        _fsdp_worker.check(rank, out_dir)
        train_ddp(rank, world, out_dir)
        # DDP modules are freed (train_ddp returned) and every rank is done before the group goes:
        # a DDP reducer outliving destroy_process_group can hang its process at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_ddp(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, params, batches = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)

    # 1. DDP over the facade: only the adapter leaves are broadcast and all-reduced
    ddp = DDP(lf.Adapted(model, params))
    train(ddp, batches, half)
    lf.save(os.path.join(out_dir, f"ddp_rank{rank}.safetensors"), ddp.module.params)
    if not all(torch.equal(v, before[k]) for k, v in model.state_dict().items()):
        raise AssertionError("training through lf.Adapted under DDP changed the base model")

    # 2. the base sharded by FSDP2 (each rank holds half of every weight), DDP for the adapter grads
    sharded = copy.deepcopy(model).requires_grad_(False)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    ddp = DDP(lf.Adapted(sharded, params))
    train(ddp, batches, half)
    lf.save(os.path.join(out_dir, f"fsdp_rank{rank}.safetensors"), ddp.module.params)
