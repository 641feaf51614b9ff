"""Worker of tests/test_target_distributed.py, run by torchrun on 2 gloo processes (not a test itself).

Each rank takes its own share of the validation sequences, builds a factor target, sums it over
the ranks with ``all_reduce()`` and saves its rank-q basis, its dense gradient and its target-mode
scores of a fixed training batch for the test to compare with one process holding every sequence.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ippo import InfluenceEngine
from tests.models import VOCAB, tiny_llama

Q = 4
N_VAL, T_VAL = 4, 8


def data():
    g = torch.Generator().manual_seed(21)
    val = torch.randint(3, VOCAB, (N_VAL, T_VAL), generator=g)
    train = torch.randint(3, VOCAB, (5, 10), generator=g)
    adv = torch.randn(5, 9, generator=g, dtype=torch.float64)
    return val, train, adv


def val_loss_sum(model, val: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss over ``val``'s rows, divided by the token count of the *whole* set."""
    logits = model(val).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), val[:, 1:].reshape(-1), reduction="sum") / (N_VAL * (T_VAL - 1))


def run(rows: list[int], distributed: bool) -> dict:
    model = tiny_llama(torch.float64, hidden=64)
    engine = InfluenceEngine(model, rank=Q)
    val, train, adv = data()
    with engine.recording():
        vl = val_loss_sum(model, val[rows])
        logp = torch.log_softmax(model(train).logits[:, :-1], -1).gather(-1, train[:, 1:, None]).squeeze(-1)
        tl = (logp * adv).sum()
    target = engine.target(vl, basis="factor")
    if distributed:
        target.all_reduce()
    basis = target.basis(Q)
    scores = engine.scores(tl, torch.arange(5), target, mode="target")
    return {"basis": {n: [t for t in e] for n, e in basis.items()}, "scores": scores,
            "grads": dict(target.grads)}  # forming G after the basis: collective too


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = run(list(range(rank, N_VAL, world)), distributed=True)
    # the layers reached must agree on every rank: rank 1's loss reaches only the lm_head here
    model = tiny_llama(torch.float64, hidden=64)
    engine = InfluenceEngine(model)
    with engine.recording():
        if rank == 0:
            loss = model(data()[0]).logits.sum()
        else:
            loss = model.lm_head(torch.randn(3, 64, dtype=torch.float64)).sum()
    target = engine.target(loss, basis="factor")
    try:
        target.all_reduce()
        result["mismatch_error"] = ""
    except RuntimeError as e:
        result["mismatch_error"] = str(e)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
