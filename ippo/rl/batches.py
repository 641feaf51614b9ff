"""Episodes as model inputs: collated micro-batches, the logits and values that predict response tokens,
and the seeded orders in which passes visit them. Shared by every phase that runs the models."""

from __future__ import annotations

import torch

from ippo.rl.data import derive_seed, pad_batch
from ippo.rl.models import causal_lm_logits
from ippo.rl.parallel import distributed as dist
from ippo.rl.parallel import fsdp
from ippo.rl.rollout import Episodes, collate


def chunks(xs: list, size: int) -> list[list]:
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def minibatch_order(kept_ids: torch.Tensor, seed: int, it: int, epoch: int) -> list[int]:
    """The seeded order in which one PPO epoch visits the kept episodes (global ids)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "minibatch", it, epoch))
    return kept_ids[torch.randperm(len(kept_ids), generator=g)].tolist()


def episode_batch(ep: Episodes, idx: list[int], pad: int, device: torch.device):
    """Collated tensors of episodes ``idx``: ids, attention mask, response mask [b, T], P."""
    ids, attn, rmask, P = collate([ep.prompt_tokens[i] for i in idx], [ep.response_tokens[i] for i in idx], pad)
    return ids.to(device), attn.to(device), rmask.to(device), P


def response_logits(model, ids: torch.Tensor, attn: torch.Tensor, P: int, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict the response tokens: positions P-1 .. P+T-2 -> [b, T, V].

    Divided by the sampling temperature: the responses were drawn from softmax(logits / T), so the
    log-probs of the PPO ratio, the KL and the influence scores must be those of that policy
    (top-p truncation is not modelled, as in common PPO implementations).
    """
    logits = causal_lm_logits(model, ids, attn)[:, P - 1:-1]
    return logits / temperature if temperature != 1.0 else logits


def response_values(value_model, ids: torch.Tensor, attn: torch.Tensor, P: int) -> torch.Tensor:
    """V(s_t) for every response token t: the critic at the position that predicts token t."""
    return value_model(ids, attn)[:, P - 1:-1]


def sft_chunks(fmt, pad: int, rows, indices: list[int], chunk: int, device: torch.device, lockstep: bool = False):
    """The SFT batches of the gold solutions ``rows[indices]`` that this rank handles (``indices[rank::world]``),
    ``chunk`` examples at a time (0: all at once), and the token count over all ranks.

    Returns ``(total_tokens, [(ids, attn, labels, weight), ...])``: labels are -100 on prompt tokens and padding;
    ``weight`` is 0 for a stand-in chunk that only keeps a sharded policy's collectives in step (``lockstep``:
    every rank runs as many chunks as the rank with the most), else 1.
    """
    mine = indices[dist.rank()::dist.world_size()]
    seqs = [fmt.sft_ids(rows[i].question, rows[i].solution) for i in mine]
    count = torch.tensor([float(sum(sum(1 for x in lab[1:] if x != -100) for _, lab in seqs))], dtype=torch.float64)
    dist.all_reduce_sum(count)
    out = []
    for part in fsdp.pad_to_max(chunks(seqs, chunk or max(1, len(seqs))), lockstep):
        weight = 1.0 if part is not None else 0.0  # 0: a stand-in (see fsdp.pad_to_max)
        part = part if part is not None else seqs[:1]
        ids = pad_batch([s for s, _ in part], pad).to(device)
        labels = pad_batch([lab for _, lab in part], -100).to(device)
        attn = torch.zeros_like(ids)
        for i, (s, _) in enumerate(part):
            attn[i, :len(s)] = 1
        out.append((ids, attn, labels, weight))
    return max(count.item(), 1.0), out
