"""Per-token attribution, offline: rebuild logged episodes at their iteration's theta_old and score them again.

For iteration N: the policy is theta_old (``checkpoints/iter_N``, or the starting model for N = 0); the
validation target is recomputed from the same seeded draw (``ippo.rl.data.iteration_val_indices``); each episode
is rebuilt from its log row -- the prompt from its dataset row (the formatter the rollout used), the sampled
``response_tokens`` as logged (re-tokenising the text is not exact), the per-token ``advantage`` and the loss
normalisers its score was taken with (``token_norm``, ``seq_norm``) -- and the trainer's own scoring pass
(``InfluenceScorer.score_episodes``) runs on just those episodes with per-token contributions.

A response token's contribution is that of the position that predicts it (its -A log pi term, plus what that
position's activations pass on to later tokens through attention); the prompt's positions are summed into one
number. Token contributions and the prompt's add up to the episode's score.

Comparable with the logged score: every ``before_update`` score (taken at theta_old), and an ``in_update`` score
taken before the iteration's first optimizer step (``scored_after_steps == 0``: the first mini-batch of epoch 0,
or every episode when one mini-batch spans the batch). A later in_update mini-batch was scored at the parameters
of its own step; its colours are still theta_old's, but its logged score is not compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ippo.influence import InfluenceEngine
from ippo.rl.batches import chunks, episode_batch, response_logits
from ippo.rl.checkpoint import load_policy_into
from ippo.rl.components import TaskData, load_models
from ippo.rl.config import TrainConfig, needs_critic
from ippo.rl.data import iteration_val_indices
from ippo.rl.losses import logprobs_from_logits
from ippo.rl.rollout import Episodes
from ippo.rl.scoring import InfluenceScorer

from .runlog import Row

RTOL = 1e-4  # recomputed vs logged score: relative to max(|score|, FLOOR x the iteration's largest |score|)
FLOOR = 1e-3


@dataclass
class EpisodeAttribution:
    """One episode's offline score and where it comes from."""

    episode: int
    score: float  # recomputed at theta_old
    prompt: float  # the prompt positions' summed contribution
    tokens: list[float]  # one per response token
    rest: float = 0.0  # positions after the last response token and padding (0 up to rounding)
    compared: bool = False  # the logged score was taken at theta_old with the same normalisers
    matches: bool | None = None  # compared and equal to RTOL


@dataclass
class Recomputed:
    """An iteration's offline attribution (``problem`` set when it could not be done, with why)."""

    iteration: int
    source: str  # where theta_old came from
    episodes: dict[int, EpisodeAttribution] = field(default_factory=dict)
    problem: str | None = None
    max_rel_diff: float = 0.0  # over the compared episodes

    @property
    def compared(self) -> list[EpisodeAttribution]:
        return [a for a in self.episodes.values() if a.compared]

    @property
    def all_match(self) -> bool:
        return all(a.matches for a in self.compared)


def unsupported(cfg: TrainConfig) -> str | None:
    """Why the run's scoring loss cannot be rebuilt from the log (None: it can)."""
    ic = cfg.influence
    if not ic.enabled:
        return "the run has no influence scores (influence.enabled=false)"
    if ic.mode == "sketch":
        return "influence.mode=sketch has no per-token contributions (exact and target modes do)"
    if cfg.ppo.is_correction != "none":
        return (f"ppo.is_correction={cfg.ppo.is_correction}: the rollout engine's log-probs the correction weights "
                "need are not logged")
    if ic.episode_loss == "all" and cfg.ppo.critic == "shared" and needs_critic(cfg):
        return "influence.episode_loss=all with a shared critic: the rollout's values and returns are not logged"
    return None


def score_tolerance(logged: float, largest: float) -> float:
    return RTOL * max(abs(logged), FLOOR * largest)


def recompute(cfg: TrainConfig, data: TaskData, iteration: int, rows: list[Row], checkpoint: Path | None,
              largest: float, device: torch.device) -> Recomputed:
    """Score ``rows`` (episodes of ``iteration``) again at theta_old (``checkpoint``; None: the starting model),
    with per-token contributions; ``data``: the run's task data; ``largest``: the iteration's largest
    |logged score|."""
    source = str(checkpoint) if checkpoint is not None else f"model.path={cfg.model.path} (the starting model)"
    out = Recomputed(iteration, source)
    out.problem = unsupported(cfg)
    if out.problem is not None or not rows:
        return out
    policy, _, _, ref = load_models(cfg, data.model_path, device)
    if checkpoint is not None:
        load_policy_into(checkpoint, policy, cfg.model.lora, device)
    scorer = InfluenceScorer(InfluenceEngine(policy, rank=cfg.influence.rank, seed=cfg.seed,
                                             backend=cfg.influence.backend), cfg)
    val_idx = iteration_val_indices(len(data.val), cfg.influence.n_val, cfg.seed, iteration)
    target = scorer.validation_target(policy, data.tok, data.fmt, data.val, val_idx, device)
    for norms, group in groups_by_norms(rows).items():
        ep = rebuild_episodes(group, data)
        adv = advantages(group, device)
        ref_logp = reference_logprobs(cfg, ref, ep, data.pad, device) if needs_reference(cfg, ref) else None
        per_token: list = []
        scores = scorer.score_episodes(policy, ep, adv, torch.zeros_like(adv), ref_logp, target, data.pad, device,
                                       token_norm=norms[0], seq_norm=norms[1], per_token=per_token)
        for idx, P, contributions in per_token:
            for j, k in enumerate(idx):
                out.episodes[group[k].episode] = attribution(group[k], ep, k, P, contributions[j], float(scores[k]))
    compare(out, rows, largest)
    return out


def groups_by_norms(rows: list[Row]) -> dict[tuple[float, float], list[Row]]:
    """The rows by the loss normalisers their scores were taken with (one group under before_update; one per
    mini-batch under in_update)."""
    groups: dict[tuple[float, float], list[Row]] = {}
    for r in rows:
        if r["token_norm"] is not None:
            groups.setdefault((float(r["token_norm"]), float(r["seq_norm"])), []).append(r)
    return groups


def rebuild_episodes(rows: list[Row], data: TaskData) -> Episodes:
    """The logged episodes as the trainer held them: prompt ids from the dataset row, response ids as sampled."""
    prompts = [data.fmt.prompt_ids(data.train[int(r["prompt_id"])].question) for r in rows]
    return Episodes(prompt_tokens=prompts, response_tokens=[list(r["response_tokens"]) for r in rows],
                    truncated=[bool(r.get("truncated", False)) for r in rows],
                    prompt_rows=[int(r["prompt_id"]) for r in rows], group=[0] * len(rows),
                    texts=[r.get("response", "") for r in rows])


def advantages(rows: list[Row], device: torch.device) -> torch.Tensor:
    """[n, T] float32: each row's per-token advantage (a logged scalar fills its response), zero beyond it."""
    T = max(len(r["response_tokens"]) for r in rows)
    adv = torch.zeros(len(rows), T, dtype=torch.float32)
    for i, r in enumerate(rows):
        a, n = r["advantage"], len(r["response_tokens"])
        adv[i, :n] = torch.tensor(a, dtype=torch.float32) if isinstance(a, list) else float(a)
    return adv.to(device)


def needs_reference(cfg: TrainConfig, ref) -> bool:
    """The episode loss holds the KL-to-reference term (``influence.episode_loss`` policy or all)."""
    return ref is not None and cfg.influence.episode_loss in ("policy", "all") and not cfg.ppo.kl_in_reward


@torch.no_grad()
def reference_logprobs(cfg: TrainConfig, ref, ep: Episodes, pad: int, device: torch.device) -> torch.Tensor:
    """The reference model's log-probs of the response tokens [n, T] (the trainer's no-grad pass, again)."""
    ref.to(device)
    T = max(len(r) for r in ep.response_tokens)
    out = torch.zeros(len(ep), T, device=device)
    for idx in chunks(list(range(len(ep))), cfg.rollout.forward_batch):
        ids, attn, rmask, P = episode_batch(ep, idx, pad, device)
        lp = logprobs_from_logits(response_logits(ref, ids, attn, P, cfg.rollout.temperature), ids[:, P:])
        out[idx, :rmask.shape[1]] = lp * rmask
    return out


def attribution(row: Row, ep: Episodes, k: int, P: int, contributions: torch.Tensor, score: float
                ) -> EpisodeAttribution:
    """Episode ``k``'s per-token split of ``score`` from its row of the collated batch (prompt left-padded to
    ``P`` positions, response after it): response token j <- position P - 1 + j."""
    p, n = len(ep.prompt_tokens[k]), len(ep.response_tokens[k])
    c = contributions.tolist()
    tokens = c[P - 1:P - 1 + n]
    prompt = math.fsum(c[P - p:P - 1])
    rest = math.fsum(c) - prompt - math.fsum(tokens)
    return EpisodeAttribution(row.episode, score, prompt, tokens, rest)


def compare(out: Recomputed, rows: list[Row], largest: float) -> None:
    """Recomputed vs logged scores, for the episodes whose logged score was taken at theta_old."""
    for r in rows:
        a = out.episodes.get(r.episode)
        if a is None or r.get("score") is None or r.get("scored_after_steps") != 0:
            continue
        a.compared = True
        diff = abs(a.score - float(r["score"]))
        a.matches = diff <= score_tolerance(float(r["score"]), largest)
        out.max_rel_diff = max(out.max_rel_diff, diff / max(abs(float(r["score"])), FLOOR * largest, 1e-300))
