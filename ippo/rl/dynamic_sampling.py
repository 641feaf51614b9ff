"""DAPO's dynamic sampling (``rollout.dynamic_sampling``): draw prompt groups until the batch is informative.

A group (the ``n`` samples of one prompt) whose rewards are all equal has zero advantage under the group
estimators (grpo, dr_grpo, rloo, reinforce_pp_baseline): it costs an update and teaches nothing. Round 0
samples the iteration's usual ``B`` prompts; while fewer than ``B`` groups have rewards that differ, and
fewer than ``rollout.max_sample_rounds`` rounds have run, another round samples ``B`` more prompts. The
batch is the first ``B`` such groups in (round, position) order.

* Determinism: round r's prompts are a seeded draw from (seed, iteration, r) (round 0: the iteration's
  ordinary prompts), and its prompt at position p samples with the seed of position ``r * B + p``, so every
  round is a pure function of (seed, iteration, round) and the policy: a resumed run retraces.
* Several processes: each rank samples its share of every round; the decision to stop and the choice of
  groups use the all-gathered per-group variances, so every rank runs the same rounds and keeps the same
  groups; the chosen groups are then exchanged so that rank k holds positions ``lo:hi`` of the batch.
* When the rounds run out with fewer than ``B`` informative groups, the batch is topped up with the earliest
  zero-variance groups (round 0 first): the batch keeps its ``B`` groups (the layout, the metrics, a matched
  control and FSDP's lock-step all assume a fixed size), and those groups carry no group-relative advantage
  (I-PPO scores them 0 and drops them). ``groups_padded`` in the metrics counts them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ippo.rl.data import derive_seed, iteration_prompts
from ippo.rl.filters import zero_variance
from ippo.rl.parallel import distributed as dist
from ippo.rl.rollout import Episodes


def round_prompts(n_rows: int, batch: int, seed: int, iteration: int, rnd: int) -> list[int]:
    """Global row indices of round ``rnd``'s prompts: round 0 the iteration's own (``iteration_prompts``), later
    rounds ``batch`` rows drawn without replacement (with, if there are fewer rows) from (seed, iteration, rnd)."""
    if rnd == 0:
        return iteration_prompts(n_rows, batch, seed, iteration)
    rng = np.random.default_rng(derive_seed(seed, "dynamic_sampling", iteration, rnd))
    return [int(i) for i in rng.choice(n_rows, size=batch, replace=batch > n_rows)]


def choose_groups(varies: list[torch.Tensor], batch: int) -> tuple[list[tuple[int, int]], int]:
    """The batch's groups as (round, position) pairs in that order, and how many of them are zero-variance padding.

    ``varies[r]`` [B] bool: which groups of round r have rewards that differ. The first ``batch`` of those (in
    round, position order); fewer: topped up with the earliest zero-variance groups.
    """
    informative = [(r, g) for r, v in enumerate(varies) for g in range(len(v)) if v[g]]
    chosen = informative[:batch]
    padded = batch - len(chosen)
    if padded:
        chosen += [(r, g) for r, v in enumerate(varies) for g in range(len(v)) if not v[g]][:padded]
    return sorted(chosen), padded


@dataclass
class SampledRound:
    episodes: Episodes  # this rank's episodes of the round
    rewards: torch.Tensor  # [E_local]
    varies: torch.Tensor  # [B] bool over all ranks: the group's rewards differ


def merged_stats(rounds: list[SampledRound]) -> dict[str, float]:
    """The rollout engine's own numbers over the rounds: times summed, the rest averaged."""
    out = {}
    for k in sorted({k for r in rounds for k in r.episodes.rollout_stats}):
        values = [r.episodes.rollout_stats[k] for r in rounds if k in r.episodes.rollout_stats]
        out[k] = sum(values) if k.startswith("time_") else sum(values) / len(values)
    return out


def dynamic_rollout(sample_round: Callable[[int], tuple[Episodes, torch.Tensor]], batch: int, n: int, lo: int,
                    hi: int, max_rounds: int, device: torch.device
                    ) -> tuple[Episodes, torch.Tensor, dict[str, float]]:
    """Rounds of ``sample_round(r)`` (this rank's episodes of prompts ``lo:hi`` of round r, and their rewards)
    until ``batch`` groups vary or ``max_rounds`` ran; -> this rank's share (groups ``lo:hi``) of the chosen
    batch, its rewards, and the metrics ``sample_rounds``, ``groups_discarded``, ``groups_padded``."""
    rounds: list[SampledRound] = []
    while True:
        ep, rewards = sample_round(len(rounds))
        local = zero_variance(rewards, n)[::n].float()
        varies = dist.all_gather_cat(local.to(device)).cpu() > 0.5
        rounds.append(SampledRound(ep, rewards, varies))
        if sum(int(r.varies.sum()) for r in rounds) >= batch or len(rounds) >= max_rounds:
            break
    chosen, padded = choose_groups([r.varies for r in rounds], batch)
    mine = {}  # the chosen groups this rank sampled: (round, position) -> (episodes, rewards)
    for rnd, g in chosen:
        if lo <= g < hi:
            idx = list(range((g - lo) * n, (g - lo + 1) * n))
            mine[(rnd, g)] = (rounds[rnd].episodes.take(idx), rounds[rnd].rewards[idx])
    everyone = {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}
    parts = [everyone[key] for key in chosen[lo:hi]]
    stats = {"sample_rounds": len(rounds), "groups_discarded": len(rounds) * batch - batch, "groups_padded": padded}
    return (Episodes.join([p[0] for p in parts], merged_stats(rounds)), torch.cat([p[1] for p in parts]),
            stats)
