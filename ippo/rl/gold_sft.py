"""The gold-data control (``control.sft_coef=λ``): PPO whose every mini-batch also trains λ x the SFT loss on the
gold validation solutions that I-PPO's target uses in the same iteration (``influence.n_val`` of them, the same
seeded draw).

I-PPO sees those solutions only as a direction (the validation gradient it scores episodes against); this
control trains on them directly. Whatever I-PPO gains over it comes from selecting episodes, not from access to
the gold data. With ``influence.enabled=true`` it gives I-PPO + SFT (the two are not exclusive).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ippo.rl.batches import sft_chunks
from ippo.rl.data import iteration_val_indices
from ippo.rl.losses import sft_loss_sum
from ippo.rl.models import causal_lm_logits


class GoldSFT:
    """λ x the token-mean SFT loss on the iteration's gold validation draw, as a second gradient stream."""

    def __init__(self, coef: float, policy: torch.nn.Module, fmt, pad: int, val_rows, n_val: int, seed: int,
                 chunk: int, device: torch.device, lockstep: bool = False) -> None:
        self.coef, self.policy, self.fmt, self.pad = coef, policy, fmt, pad
        self.val_rows, self.n_val, self.seed, self.chunk = val_rows, n_val, seed, chunk
        self.device, self.lockstep = device, lockstep
        self._it, self._batches, self._total = None, [], 1.0

    def _prepare(self, it: int) -> None:
        if self._it == it:
            return
        indices = iteration_val_indices(len(self.val_rows), self.n_val, self.seed, it)  # I-PPO's draw
        self._total, self._batches = sft_chunks(self.fmt, self.pad, self.val_rows, indices, self.chunk, self.device,
                                                self.lockstep)
        self._it = it

    def backward(self, it: int, agree: Callable[[bool], bool] = bool) -> tuple[float, bool]:
        """Add the gradient of λ x SFT loss to ``.grad``; -> (this rank's share of the loss, all finite).

        A non-finite chunk runs no backward (the mini-batch's step is then skipped like any non-finite one);
        ``agree`` turns this rank's finiteness into every rank's (a sharded backward is a collective).
        """
        self._prepare(it)
        total, finite = 0.0, True
        for ids, attn, labels, weight in self._batches:
            loss_sum, _ = sft_loss_sum(causal_lm_logits(self.policy, ids, attn), labels)
            loss = self.coef * loss_sum * (weight / self._total)
            if not agree(bool(torch.isfinite(loss.detach()))):
                finite = False
                continue
            loss.backward()
            total += float(loss.detach()) / self.coef
        return total, finite
