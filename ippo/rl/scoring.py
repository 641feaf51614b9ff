"""I-PPO scoring: the trainer's only door to the influence engine.

* ``validation_target``: the gradient of the SFT loss on the iteration's gold validation draw (one backward).
* ``score_episodes`` (``influence.timing=before_update``): the old-log-prob forward *with grad inside
  engine.recording()* -- the same forward gives the old log-probs and each episode's loss L_e, whose
  activation-only backward scores every episode: <grad L_e, G_val>.
* ``recording`` / ``weighted_backward`` (``influence.timing=in_update``): score, select and reweight a
  micro-batch inside the update's own backward.

What an episode's loss is follows ``influence.episode_loss``: its share of the clipped surrogate (pg), plus its
KL and entropy terms (policy), plus its share of the shared critic's value loss (all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import torch

from ippo.influence import InfluenceEngine, Selection, Target
from ippo.rl.batches import chunks, episode_batch, response_logits, sft_chunks
from ippo.rl.config import InfluenceConfig, TrainConfig
from ippo.rl.data import PromptFormatter
from ippo.rl.filters import select_and_weight
from ippo.rl.losses import (
    aggregate_per_episode,
    correction_weights,
    logprobs_from_logits,
    loss_norm_len,
    policy_terms_per_token,
    scoring_loss_per_episode,
    sft_loss_sum,
    value_loss_per_token,
)
from ippo.rl.models import SharedValueHead, causal_lm_logits
from ippo.rl.parallel import distributed as dist
from ippo.rl.rollout import Episodes


class InfluenceScorer:
    """The engine plus this run's influence settings."""

    def __init__(self, engine: InfluenceEngine, cfg: TrainConfig) -> None:
        self.engine, self.cfg, self.ic = engine, cfg, cfg.influence

    @property
    def factor_rank(self) -> int:
        """Target mode with the factor basis: build the rank-q basis from the validation factors (0: dense G)."""
        ic = self.ic
        return ic.rank if ic.mode == "target" and ic.target_basis == "factor" else 0

    def validation_target(self, policy, tok, fmt: PromptFormatter, val_rows, indices: list[int],
                          device: torch.device, lockstep: bool = False) -> Target:
        """Gradient of the SFT loss (token mean over the *global* validation draw ``indices`` of ``val_rows``)
        on the hooked layers, in chunks of ``influence.val_batch`` examples.

        This rank handles indices[rank::world]; the per-rank gradients are summed with an all-reduce,
        so every rank ends with the same global target. ``factor_rank=q`` (target mode): the target
        keeps the validation factors instead of the dense gradient, builds its rank-q basis from them
        (summed over the ranks, stage by stage) and frees them. ``lockstep`` (sharded policy): every rank
        runs as many chunks as the rank with the most, a zero-weighted stand-in where it has none left.
        """
        total_tokens, parts = sft_chunks(fmt, tok.pad_token_id, val_rows, indices, self.ic.val_batch, device, lockstep)
        basis = "factor" if self.factor_rank else "dense"
        target = None
        for ids, attn, labels, weight in parts:
            with self.engine.recording():
                loss_sum, _ = sft_loss_sum(causal_lm_logits(policy, ids, attn), labels)
                t = self.engine.target(loss_sum * (weight / total_tokens), basis=basis)
            target = t if target is None else target.add_(t)  # targets of disjoint chunks add up
        if target is None:  # this rank drew no validation example
            raise RuntimeError("influence.n_val is smaller than the number of ranks")
        if dist.is_dist():
            target.all_reduce()
        if self.factor_rank:  # collective on several ranks: every rank builds the basis here, at the same point
            target.basis(self.factor_rank)
            target.drop_factors()
        return target

    def score_episodes(self, policy, ep: Episodes, adv: torch.Tensor, old_logp: torch.Tensor,
                       ref_logp: torch.Tensor | None, target: Target, pad: int, device: torch.device,
                       token_norm: float, seq_norm: float,
                       critic: tuple[SharedValueHead, torch.Tensor, torch.Tensor] | None = None,
                       sampler_logp: torch.Tensor | None = None, per_token: list | None = None) -> torch.Tensor:
        """I-PPO scores of this rank's episodes, [E_local] float64; fills ``old_logp`` as a by-product.

        One forward with grad inside ``engine.recording()`` per chunk: its log-probs are the old
        log-probs (theta = theta_old) and also build the scoring loss sum_e L_e, where L_e is the
        episode's share of the PPO policy loss at ratio 1 (-A log pi, aggregated like the policy
        loss; plus its KL and entropy terms with ``influence.episode_loss=policy`` or ``all``). With
        ``episode_loss=all`` and ``critic = (shared value head, old values, returns)`` L_e also holds
        the episode's share of ``vf_coef *`` the value loss, read off the same forward. With
        ``ppo.is_correction`` and ``sampler_logp`` (the rollout engine's log-probs) the surrogate carries the
        same rollout-correction weights as in the update. The engine's activation-only backward turns it into
        <grad L_e, G_val> per episode. ``per_token`` (a list; ``ippo inspect``) receives each chunk's
        ``(episode indices, P, per-token contributions [b, P + T])``, which sum to its scores.
        """
        cfg = self.cfg
        parts = []
        policy_terms = self.ic.episode_loss in ("policy", "all")
        value_term = critic is not None and self.ic.episode_loss == "all"
        for idx in chunks(list(range(len(ep))), cfg.rollout.forward_batch):
            ids, attn, rmask, P = episode_batch(ep, idx, pad, device)
            t = rmask.shape[1]
            per_episode = functools.partial(aggregate_per_episode, mask=rmask, agg=cfg.ppo.loss_agg,
                                            token_norm=token_norm, seq_norm=seq_norm, norm_len=loss_norm_len(cfg))
            reading = critic[0].reading(policy) if value_term else contextlib.nullcontext()
            with self.engine.recording(), reading as read:
                logits = response_logits(policy, ids, attn, P, cfg.rollout.temperature)
                logp = logprobs_from_logits(logits, ids[:, P:])
                old_logp[idx, :t] = logp.detach() * rmask
                is_w = correction_weights(logp.detach(), None if sampler_logp is None else sampler_logp[idx, :t], rmask,
                                          cfg.ppo)
                loss_e = scoring_loss_per_episode(logp, adv[idx, :t], rmask, cfg.ppo.loss_agg, token_norm, seq_norm,
                                                  loss_norm_len(cfg), is_w)
                extra = (policy_terms_per_token(logp, logits, None if ref_logp is None else ref_logp[idx, :t],
                                                cfg.ppo) if policy_terms else None)
                if extra is not None:
                    loss_e = loss_e + per_episode(extra)
                if value_term:
                    _, old_values, returns = critic
                    vf_tok = value_loss_per_token(read[0][:, P - 1:-1], old_values[idx, :t], returns[idx, :t],
                                                  cfg.ppo.value_clip)
                    loss_e = loss_e + cfg.ppo.vf_coef * per_episode(vf_tok)
                s = self.engine.scores(loss_e.sum(), token_episodes(attn), target, mode=self.ic.mode,
                                       num_episodes=len(idx), per_token=per_token is not None)
            if per_token is not None:
                s, contributions = s
                per_token.append((idx, P, contributions.detach().double().cpu()))
            parts.append(s.double())
        return torch.cat(parts)

    def recording(self, weighted: bool = True):
        """The forward of an in_update micro-batch: taps every module with trainable parameters."""
        return self.engine.recording(weighted=weighted)

    def weighted_backward(self, loss: torch.Tensor, attn: torch.Tensor, target: Target,
                          select: Callable[[torch.Tensor], Selection], retain_graph: bool):
        """Score, select (``select``) and reweight one micro-batch (attention mask ``attn`` [b, L]) inside ONE
        backward of ``loss``."""
        return self.engine.weighted_backward(
            loss, token_episodes(attn), target, mode=self.ic.mode, rank=self.ic.rank, num_episodes=attn.shape[0],
            select=select, retain_graph=retain_graph)


def token_episodes(attn: torch.Tensor) -> torch.Tensor:
    """Per-token episode ids [b, L] of a collated micro-batch: row r is episode r, padding (mask 0) is -1, so
    that the engine leaves padding out of its ops (it scores 0 and has no gradient)."""
    rows = torch.arange(attn.shape[0], device=attn.device)[:, None].expand_as(attn)
    return torch.where(attn.bool(), rows, torch.full_like(rows, -1))


def in_backward_selector(ic: InfluenceConfig, episode_norms: torch.Tensor):
    """The selection callback of one in_update micro-batch, renormalised over its kept episodes.

    before_update aggregates the policy loss over the kept episodes only (dropped ones are not in
    the mini-batch); inside the backward the forward already covered every episode, so the kept
    episodes' weights are scaled by norm(all) / norm(kept), ``episode_norms`` being each episode's
    token count (token_mean) or 1 (the modes normalised by the number of sequences: seq_mean,
    seq_mean_token_sum, token_sum_norm; ``ippo.rl.losses.episode_norms``). Exact when a mini-batch is
    one micro-batch; otherwise each micro-batch is renormalised on its own. Returns (select, unscaled) where ``unscaled[0]``
    is the selection before scaling (what the logs report and later epochs reuse).
    """
    unscaled: list[Selection] = []

    def select(scores: torch.Tensor) -> Selection:
        sel = select_and_weight(scores, ic)
        unscaled[:] = [sel]
        kept_norm = float((episode_norms.to(sel.keep.device) * sel.keep).sum())
        factor = float(episode_norms.sum()) / kept_norm if kept_norm > 0 else 1.0
        return dataclasses.replace(sel, weights=sel.weights * factor)

    return select, unscaled
