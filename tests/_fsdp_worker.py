"""Run by test_distributed.py in 2 spawned CPU processes (gloo; ``check`` runs inside _ddp_worker's spawn):
lf.call on a base model sharded with FSDP2's fully_shard equals the unsharded model, outputs and adapter
gradients."""

import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        check(rank, out_dir)
    finally:
        dist.destroy_process_group()


def check(rank: int, out_dir: str) -> None:
    """The comparison, in a process group that is already up (also run by _ddp_worker, in one spawn)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import copy

    from helpers import perturb
    from models import tiny, tokens
    from torch.distributed.fsdp import fully_shard

    import lite_fn as lf

    torch.manual_seed(0)
    ref_model = tiny("llama")
    model = copy.deepcopy(ref_model).requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    params = lf.init(0, ref_model, lf.LoRAConfig(r=4), targets=r"(q_proj|v_proj|down_proj)$")
    params = {p: {n: perturb(lv, i + 1) for n, lv in bv.items()} for i, (p, bv) in enumerate(params.items())}
    x = tokens(2, 6, seed=rank)
    out = lf.call(model, params, x).logits
    out.square().mean().backward()
    grads = {p: bv["lora"]["A"].grad.clone() for p, bv in params.items()}
    for leaf in lf.trainable(params):
        leaf.grad = None
    ref = lf.call(ref_model, params, x).logits
    ref.square().mean().backward()
    err_out = (out - ref).abs().max().item()
    err_grad = max((grads[p] - bv["lora"]["A"].grad).abs().max().item() for p, bv in params.items())
    # the sharded model with activation checkpointing (transformers' switch, recompute through lf.checkpoint_context)
    checked = copy.deepcopy(ref_model).requires_grad_(False).train()
    checked.activation_checkpointing_enable({"use_reentrant": False, "context_fn": lf.checkpoint_context})
    for layer in checked.model.layers:
        fully_shard(layer)
    fully_shard(checked)
    for leaf in lf.trainable(params):
        leaf.grad = None
    lf.call(checked, params, x).logits.square().mean().backward()
    err_ckpt = max((grads[p] - bv["lora"]["A"].grad).abs().max().item() for p, bv in params.items())
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{err_out} {err_grad} {ref.abs().max().item()} {err_ckpt}")
