"""A patched tiny Llama trained data-parallel, launched by torchrun (tests/test_scale_out.py):

    torchrun --standalone --nproc_per_node=2 tests/dist_train.py ddp
    torchrun --standalone --nproc_per_node=2 tests/dist_train.py fsdp2

Every rank takes its share of one global batch; after one backward under DDP, or FSDP2
(``fully_shard`` per layer and for ``lm_head`` on its own, so the head's weight is a sharded
DTensor gathered only by its own forward), on gloo/CPU, the loss and every gradient must equal a
single process's on the whole batch. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel

from helpers import TINY_LLAMA  # this script's folder is on sys.path
from tofu_kernels.hf import apply_tofu_kernel


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA)
    return apply_tofu_kernel(transformers.LlamaForCausalLM(config), impl="torch")


def main(mode: str) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, 64, (2 * world, 10), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:, :3] = -100  # the same number of valid labels per row: the mean of means is the mean

    single = tiny_llama()
    single_loss = single(input_ids=ids, labels=labels).loss
    single_loss.backward()

    model = tiny_llama()
    if mode == "ddp":
        model = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(model)
    mine = slice(2 * rank, 2 * rank + 2)
    loss = model(input_ids=ids[mine], labels=labels[mine]).loss
    loss.backward()  # both average the gradients over ranks
    dist.all_reduce(loss := loss.detach().clone())
    errors = [("loss", (loss / world - single_loss).abs().item())]
    named = (model.module if mode == "ddp" else model).named_parameters()
    for (name, p), q in zip(named, single.parameters(), strict=True):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        errors.append((name, ((grad - q.grad).abs().max() / q.grad.abs().max()).item()))
    bad = [(name, err) for name, err in errors if not err < 1e-5]
    worst = max(e for _, e in errors)
    # one write, newline included: lines from two ranks on one pipe cannot interleave mid-line
    sys.stdout.write(f"rank {rank}: {len(errors)} checks, worst {worst:.1e}, bad {bad}\n")
    sys.stdout.flush()
    # every rank done with its collectives before any tears gloo down (a rank leaving early
    # could abort the other's exit: "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] not in ("ddp", "fsdp2"):
        sys.exit("usage: dist_train.py {ddp,fsdp2}")
    code = main(sys.argv[1])
    # without the interpreter's teardown (a rank could abort there after passing every check)
    sys.stdout.flush()
    os._exit(code)
