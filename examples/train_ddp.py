"""Train one LoRA adapter on several processes with DistributedDataParallel over ``lf.Adapted``.

Every process holds the frozen base model (or, with ``--fsdp``, its shard of it: FSDP2's
``fully_shard`` per decoder layer and at the root) and a replica of the adapter; each trains on its
own part of every batch, and DDP averages the adapter gradients, so all replicas stay equal and
equal one process trained on the whole batches. Only the adapter leaves are broadcast and
all-reduced: ``lf.Adapted`` keeps the base model outside its module tree.

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --tiny --steps 20      # CPU (gloo)
    torchrun --standalone --nproc_per_node 8 examples/train_ddp.py --model <HF name or path> --fsdp

Uses nccl and one GPU per process (LOCAL_RANK) when CUDA is available, gloo on CPU otherwise.
The data is a small synthetic set (``--rows`` random token rows, seen once per epoch), so that
the loss visibly falls even on a random tiny model; replace ``make_dataset`` with your tokenized
data.
Multi-node: run the same command on every node with ``--nnodes N --node_rank i --rdzv-backend c10d
--rdzv-endpoint HOST:PORT`` instead of ``--standalone``. ``--fsdp`` shards the decoder layers of
Llama-style models (``model.model.layers``: Llama, Mistral, Qwen2, …).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lite_fn as lf


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (no downloads) instead of --model")
    p.add_argument("--model", default=None, help="a Hugging Face causal LM name or path (transformers.AutoModelForCausalLM)")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen base with FSDP2 (fully_shard per decoder layer)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="rows per process per step")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default=r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    p.add_argument("--rows", type=int, default=32, help="rows in the synthetic dataset")
    p.add_argument("--out", default="train_ddp_out", help="folder for adapter.safetensors (written by rank 0)")
    args = p.parse_args()
    if args.tiny == (args.model is not None):
        p.error("pass exactly one of --tiny and --model")
    return args


def make_model(args):
    import transformers

    if args.tiny:
        torch.manual_seed(0)  # the same base on every process
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        config = transformers.LlamaConfig(vocab_size=128, attn_implementation="eager", **sizes)
        return transformers.LlamaForCausalLM(config)
    return transformers.AutoModelForCausalLM.from_pretrained(args.model)


def make_dataset(vocab: int, rows: int, seq: int) -> TensorDataset:
    return TensorDataset(torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0)))


def train(args, rank: int, world: int, device: torch.device) -> bool:
    """Train, save on rank 0, and return whether every process ended with the same adapter."""
    model = make_model(args).requires_grad_(False).eval()  # eval: no dropout in the base
    cfg = lf.LoRAConfig(r=args.r, alpha=2 * args.r)
    params = lf.init(0, model, cfg, targets=args.targets)  # same key on every process (DDP also broadcasts rank 0's)
    model.to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise SystemExit(f"--fsdp: {type(model).__name__} has no model.layers to shard; adapt the loop to its decoder layers")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
    # DDP sees only the adapter: its parameters are broadcast once and their gradients all-reduced;
    # the frozen leaves (buffers) never change, so there is nothing to broadcast every step
    module = DDP(
        lf.Adapted(model, params).to(device), device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
    )

    data = make_dataset(model.config.vocab_size, rows=args.rows, seq=args.seq)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)  # a shard per process
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"--rows {args.rows} is fewer than --batch {args.batch} x {world} processes")
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr)

    for step, ids in enumerate(batches(loader, sampler, args.steps)):
        ids = ids.to(device)
        loss = module(ids, labels=ids).loss  # this process's mean loss; DDP averages the gradients
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {mean.item() / world:.4f}", flush=True)

    # every replica holds the same adapter: compare with rank 0's, bit for bit
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    agree = torch.tensor(float(torch.equal(flat, ref)), device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "adapter.safetensors")
        lf.save(path, module.module.params, config=cfg)
        print(f"replicas identical on all {world} processes: {bool(agree.item())}; saved {path}", flush=True)
    return bool(agree.item())


def batches(loader, sampler, steps: int):
    """``steps`` batches, epoch after epoch (each epoch reshuffled the same way on every process)."""
    epoch, done = 0, 0
    while True:
        sampler.set_epoch(epoch)
        for (ids,) in loader:
            if done == steps:
                return
            yield ids
            done += 1
        epoch += 1


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        agree = train(args, rank, world, device)
        # tear down in order: DDP is freed (train returned) and every process is done before the group
        # goes; a DDP reducer outliving destroy_process_group can hang its process at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if not agree:
        raise SystemExit("the adapter replicas differ between processes")


if __name__ == "__main__":
    main()
