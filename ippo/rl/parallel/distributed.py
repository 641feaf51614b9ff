"""Thin torch.distributed helpers. Every function is a no-op in a single-process run.

Launch with ``torchrun --nproc_per_node N -m ippo.cli train ...`` (env:// rendezvous); gloo on
CPU, nccl on GPU. Gradients are all-reduced by hand after accumulation (see ``all_reduce_grads``)
rather than through the DDP wrapper: I-PPO keeps a different number of episodes on each rank,
and DDP's lock-step backward would need dummy passes to match them. The result is the same
sum-of-gradients DDP computes. ``dist.strategy=fsdp`` shards the models instead (``ippo.rl.parallel.fsdp``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from ippo.errors import ConfigError


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); returns this rank's device."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False): use "
                          "device=cpu or device=auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if ws > 1 and not is_dist():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ranks (returns ``t``)."""
    if is_dist():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0, in rank order."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` over ranks (parameters without a grad contribute zeros), one flat buffer.

    Parameters sharded by FSDP2 (DTensors, ``dist.strategy=fsdp``) are skipped: FSDP's
    reduce-scatter has already summed their gradients into each rank's shard.
    """
    if not is_dist():
        return
    params = [p for p in params if not _is_dtensor(p)]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard(n: int) -> tuple[int, int]:
    """Contiguous [start, end) share of n items for this rank (n must divide evenly)."""
    ws, r = world_size(), rank()
    if n % ws:
        raise ValueError(f"{n} items do not split evenly over {ws} ranks")
    per = n // ws
    return r * per, (r + 1) * per


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()
