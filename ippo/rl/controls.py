"""Control filters: what I-PPO's influence filter must beat before its effect is credited to influence.

Dropping episodes changes a PPO update in ways that have nothing to do with influence: fewer episodes
per step, a different normalisation, no zero-advantage episodes. Two plain-PPO runs isolate that:

* ``zero_variance`` (DAPO's dynamic-sampling filter, without re-sampling): drop every episode of a
  prompt whose samples all got the same reward. Under GRPO those episodes have zero advantage and
  carry no policy gradient, so I-PPO drops them too (their score is exactly 0): this control is
  "I-PPO without the influence".
* ``random``: in each iteration keep as many episodes as a given I-PPO run kept in that same
  iteration, drawn at random (seeded by (seed, iteration)), and optionally give them that run's
  weights in random order. By default the draw takes episodes with a non-zero advantage first, so the
  control keeps as much learning signal as it can at I-PPO's kept count: the difference that remains
  is which informative episodes were kept.

Both return the same ``(keep, weights)`` pair as the influence filter; the trainer treats them alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ippo.rl.data import derive_seed

__all__ = ["MatchedSchedule", "load_matched_schedule", "random_matched", "zero_variance"]


def zero_variance(rewards: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """Keep mask [E]: False for every episode of a group (consecutive ``samples_per_prompt`` episodes)
    whose rewards are all equal."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [E], got shape {tuple(rewards.shape)}")
    n = int(samples_per_prompt)
    if n < 2 or rewards.shape[0] % n:
        raise ValueError(f"zero_variance needs groups of >= 2 samples: {rewards.shape[0]} episodes are not groups "
                         f"of samples_per_prompt={n}")
    groups = rewards.view(-1, n)
    varies = (groups != groups[:, :1]).any(1)
    return varies.repeat_interleave(n)


@dataclass(frozen=True)
class MatchedSchedule:
    """What an I-PPO run kept in each iteration: ``kept[it]`` episodes with weights ``weights[it]``."""

    run_dir: str
    kept: dict[int, int]
    weights: dict[int, list[float]]
    episodes: dict[int, int]

    def __len__(self) -> int:
        return len(self.kept)


def load_matched_schedule(run_dir: str | Path) -> MatchedSchedule:
    """Per-iteration kept counts and kept weights from an I-PPO run's ``influence.jsonl``."""
    path = Path(run_dir) / "influence.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"control.match_run: {path} not found (run the I-PPO run to match first, with "
                                "log.influence_log=true)")
    kept: dict[int, int] = {}
    weights: dict[int, list[float]] = {}
    episodes: dict[int, int] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            it, k, w = int(r["iteration"]), bool(r["kept"]), float(r["weight"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"control.match_run: {path} line {i} is not an influence record ({e})") from None
        episodes[it] = episodes.get(it, 0) + 1
        kept.setdefault(it, 0)
        weights.setdefault(it, [])
        if k:
            kept[it] += 1
            weights[it].append(w)
    if not kept:
        raise ValueError(f"control.match_run: {path} has no episodes")
    return MatchedSchedule(str(run_dir), kept, {it: sorted(w) for it, w in weights.items()}, episodes)


def random_matched(num_kept: int, informative: torch.Tensor, weights: list[float] | None, seed: int,
                   iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``num_kept`` of the E episodes at random; -> (keep [E] bool, weights [E] float32).

    ``informative`` [E] bool: episodes marked True are drawn first (in random order), the rest only
    when there are fewer than ``num_kept`` of them (all True: a plain uniform draw). ``weights``: the matched run's kept
    weights, given to the kept episodes in random order (None: weight 1). The draw depends on
    (seed, iteration) only, so a resumed run draws the same episodes.
    """
    if informative.dim() != 1 or informative.dtype != torch.bool:
        raise ValueError(f"informative must be a 1-D bool tensor [E], got {informative.dtype} "
                         f"{tuple(informative.shape)}")
    E = int(informative.shape[0])
    if not 0 <= num_kept <= E:
        raise ValueError(f"random_matched: cannot keep {num_kept} of {E} episodes")
    if weights is not None and len(weights) != num_kept:
        raise ValueError(f"random_matched: {len(weights)} weights for {num_kept} kept episodes")
    g = torch.Generator().manual_seed(derive_seed(seed, "random_filter", iteration))
    order = torch.randperm(E, generator=g)
    first = informative[order]
    ranked = torch.cat([order[first], order[~first]])  # informative first, each part in random order
    chosen = ranked[:num_kept]
    keep = torch.zeros(E, dtype=torch.bool)
    keep[chosen] = True
    w = torch.zeros(E, dtype=torch.float32)
    if weights is None:
        w[chosen] = 1.0
    else:
        perm = torch.randperm(num_kept, generator=g)
        w[chosen] = torch.tensor(weights, dtype=torch.float32)[perm]
    return keep, w
