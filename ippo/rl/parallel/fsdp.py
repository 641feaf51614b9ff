"""FSDP2 (``dist.strategy=fsdp``): policy, critic and reference sharded over the ranks with ``fully_shard``.

Everything the loop needs to know about sharding sits here:

* ``shard_model``: one FSDP unit per transformer block (the classes a Hugging Face model names in
  ``_no_split_modules``), then the root (embeddings, final norm, output head). Parameters,
  gradients and optimizer state live as DTensor shards of dim 0. Gradients are **summed** over
  ranks, not averaged: the trainer normalises every loss by global token/episode counts, as the
  ddp strategy's hand-written all-reduce does.
* ``unsharded``: ``generate`` runs one small forward per token, and ranks stop at different
  lengths. Each forward of a sharded model is a collective, so the policy is all-gathered once for
  the whole rollout and kept whole (no communication per token), then resharded. The price is a
  full copy of the policy's weights per rank during generation (16 GB for 8B in bf16).
* ``pad_to_max``: every forward and backward of a sharded model is a collective, so every rank
  must run as many as the others. Where the number of micro-batches differs (I-PPO keeps a
  different number of episodes on each rank), ranks with fewer run zero-weighted stand-ins.
* ``clip_grad_norm_``: the global gradient norm over DTensor shards and plain (replicated) grads.

The influence engine needs no FSDP-specific mode: it reads activations, which are full-shape on
every rank, and forms the validation gradient from them (summed over ranks with
``Target.all_reduce``); ``weighted_backward`` hands each weighted gradient to the parameter's
shard by a reduce-scatter (``ippo.influence.weighted_grads``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ippo.rl.parallel import distributed as dist

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# reshard_after_forward as configured per FSDP unit, restored after ``unsharded`` changed it
_RESHARD_AFTER_FORWARD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (its ``_no_split_modules`` classes)."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True, param_dtype: str = "",
                own_dtype_units: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Apply ``fully_shard`` to every block, then to ``model`` itself (in place; returns ``model``).

    ``param_dtype`` (e.g. "bfloat16"): compute dtype of the all-gathered weights
    (``MixedPrecisionPolicy``; gradients are reduced in float32 and the shards, the optimizer
    state and the update stay in the storage dtype). "" = compute in the storage dtype.
    ``own_dtype_units``: submodules that get their own unit without mixed precision (the critic's
    float32 value head on a bf16 backbone: one unit's parameters must share a dtype).
    ``reshard_after_forward`` applies to the blocks; the root keeps its weights between forward and
    backward (FSDP2's default for the root: they are needed first in the backward), unless nothing
    in the model trains (the reference).
    """
    if not dist.is_dist():
        raise RuntimeError("dist.strategy=fsdp needs torch.distributed: launch with torchrun "
                           "(see README, 'Several processes')")
    _, MixedPrecisionPolicy, fully_shard = _fsdp()
    blocks = block_modules(model)
    if not blocks:
        raise ValueError(f"dist.strategy=fsdp: {type(model).__name__} names no transformer block classes "
                         "(_no_split_modules), so it cannot be sharded block by block")
    if param_dtype and param_dtype not in _DTYPES:
        raise ValueError(f"dist.fsdp_param_dtype={param_dtype!r}: expected one of {' | '.join(_DTYPES)} or ''")
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=torch.float32) if param_dtype \
        else MixedPrecisionPolicy()
    for unit in own_dtype_units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
        _RESHARD_AFTER_FORWARD[unit] = reshard_after_forward
    for block in reversed(blocks):  # bottom-up: a nested block before the block that holds it
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        _RESHARD_AFTER_FORWARD[block] = reshard_after_forward
    frozen = not any(p.requires_grad for p in model.parameters())  # the reference: no backward ever comes
    fully_shard(model, reshard_after_forward=frozen, mp_policy=mp)
    _RESHARD_AFTER_FORWARD[model] = frozen
    if callable(getattr(model, "generate", None)):
        # FSDP's root hooks run on __call__ only; PEFT's generate reaches the blocks through the inner
        # model, which would make the first block believe it is the root. Run them around generate too.
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    for unit in fsdp_units(model):
        unit.set_gradient_divide_factor(1.0)  # sum over ranks, as the ddp strategy does
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM, not PREMUL_SUM(1/factor)
    return model


def fsdp_units(model: nn.Module | None) -> list[nn.Module]:
    """The FSDP2 units inside ``model`` (the model itself included), in module order; [] if unsharded."""
    if model is None or not dist.is_dist():
        return []
    FSDPModule = _fsdp()[0]
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module | None) -> bool:
    return bool(fsdp_units(model))


@contextlib.contextmanager
def unsharded(model: nn.Module | None) -> Iterator[None]:
    """All-gather ``model``'s weights once and keep them whole inside the block (generation).

    Forwards inside run without any collective, so ranks may run different numbers of them.
    No-op for a model that is not sharded.
    """
    units = fsdp_units(model)
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:  # the same order on every rank: one all-gather per unit
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(_RESHARD_AFTER_FORWARD.get(unit, True), recurse=False)


_stand_ins = 0  # stand-in passes run by this rank since the last take_stand_in_count()


def pad_to_max(items: list, enabled: bool) -> list:
    """``items`` followed by ``None`` up to the largest length over all ranks (when ``enabled``).

    A sharded model's forward and backward are collectives: a rank with fewer micro-batches than
    another runs a stand-in (a ``None`` entry) whose loss is multiplied by zero.
    """
    global _stand_ins
    if not enabled or not dist.is_dist():
        return list(items)
    longest = int(dist.all_reduce_max(torch.tensor([len(items)], dtype=torch.int64)).item())
    _stand_ins += longest - len(items)
    return list(items) + [None] * (longest - len(items))


def take_stand_in_count() -> int:
    """How many stand-in passes this rank ran since the last call (the compute lock-step costs)."""
    global _stand_ins
    n, _stand_ins = _stand_ins, 0
    return n


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of FSDP2 (DTensor) and plain parameters.

    torch's own raises on the mix ("aten._foreach_norm.Scalar got mixed torch.Tensor and DTensor").
    The shards' norm is reduced over the ranks (a DTensor reduction), the plain grads are already
    summed on every rank; the clip coefficient is then the same everywhere. Returns the total norm
    (a plain tensor). Without DTensor grads this is torch's function unchanged.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    with_grad = [p for p in params if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_([p for p in with_grad if isinstance(p.grad, DTensor)], max_norm, total)
    if plain:
        torch.nn.utils.clip_grads_with_norm_([p for p in with_grad if not isinstance(p.grad, DTensor)], max_norm,
                                             total)
    return total
