"""Advantage estimators, by name (``ppo.advantage``): each one registered function.

An estimator reads one iteration's rewards and token tensors (``AdvantageInputs``) and returns the
per-token advantages [E, T] and, when it trains a critic, the value targets (returns) [E, T]. Adding one:

    @register_advantage("my_estimator", needs_critic=False)
    def my_estimator(inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        ...

``needs_critic`` makes the trainer load (and train) a value model and fill ``inp.values``; ``needs_groups``
makes the config require ``rollout.samples_per_prompt >= 2``; ``reward_kl`` says whether the estimator puts
``ppo.kl_in_reward``'s per-token KL penalty into its rewards (True), uses the outcome reward only (False: the
config rejects ``ppo.kl_in_reward=true`` with ``ppo.kl_coef > 0``, which would drop the KL), or does not say
(None: accepted as before). I-PPO works with every estimator unchanged: it scores the episode's share of the
policy loss built from these advantages. The config validates ``ppo.advantage`` against this registry.

Built in: ``gae`` (critic), ``grpo`` (group mean and std), ``dr_grpo`` (group mean, no std), ``rloo``
(leave-one-out group mean), ``reinforce_pp`` (REINFORCE++: discounted returns of the per-token reward, whitened
over the global batch) and ``reinforce_pp_baseline`` (the same on group-centred rewards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ippo.rl.losses import (
    discounted_returns,
    gae,
    group_centered,
    grpo_advantages,
    kl_estimate,
    masked_whiten,
    rloo_advantages,
    token_rewards,
)

if TYPE_CHECKING:
    from ippo.rl.settings import PPOConfig


@dataclass
class AdvantageInputs:
    """One iteration's episodes on this rank (E of them, T response tokens at most)."""

    rewards: torch.Tensor  # [E] float32, the rule rewards
    mask: torch.Tensor  # [E, T] 1 on response tokens
    values: torch.Tensor  # [E, T] V(s_t) at theta_old (zeros without a critic)
    old_logp: torch.Tensor  # [E, T] theta_old log-probs (filled before this step only when the KL is in the reward)
    ref_logp: torch.Tensor | None  # [E, T] reference log-probs; None without a reference model
    samples_per_prompt: int  # consecutive episodes of one prompt form a group
    ppo: PPOConfig


Estimator = Callable[[AdvantageInputs], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    fn: Estimator
    needs_critic: bool  # the trainer loads a value model and fills AdvantageInputs.values
    needs_groups: bool = False  # baselines from the prompt's other samples: rollout.samples_per_prompt >= 2
    reward_kl: bool | None = None  # applies ppo.kl_in_reward's KL penalty (True), outcome only (False), unsaid


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, *, needs_critic: bool = False, needs_groups: bool = False,
                       reward_kl: bool | None = None) -> Callable[[Estimator], Estimator]:
    def register(fn: Estimator) -> Estimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, needs_groups, reward_kl)
        return fn

    return register


def estimate(name: str, inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages [E, T], returns [E, T] or None) by the estimator registered as ``name``."""
    return ADVANTAGE_ESTIMATORS[name].fn(inp)


def per_token_rewards(inp: AdvantageInputs, rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` [E] on each response's last token, minus ``ppo.kl_coef`` x the KL to the reference on every
    token with ``ppo.kl_in_reward`` (which needs the old log-probs: the trainer computes them before this step)."""
    ppo = inp.ppo
    kl_pen = None
    if ppo.kl_in_reward and inp.ref_logp is not None:
        kl_pen = kl_estimate(inp.old_logp, inp.ref_logp, ppo.kl_estimator) * inp.mask
    return token_rewards(rewards.to(inp.mask.device), inp.mask, kl_pen, ppo.kl_coef)


@register_advantage("gae", needs_critic=True, reward_kl=True)
def gae_advantages(inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) on the critic's values; the rule reward on the last token, minus the KL penalty
    per token with ``ppo.kl_in_reward``; advantages whitened over the global batch by default."""
    ppo = inp.ppo
    adv, returns = gae(per_token_rewards(inp, inp.rewards), inp.values, inp.mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        adv = masked_whiten(adv, inp.mask)
    return adv, returns


@register_advantage("grpo", needs_groups=True)
def grpo(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """GRPO: the reward minus its prompt group's mean, divided by the group's std (+ ``ppo.grpo_eps``)."""
    return grpo_advantages(inp.rewards.to(inp.mask.device), inp.samples_per_prompt, inp.mask, inp.ppo.grpo_eps), None


@register_advantage("dr_grpo", needs_groups=True, reward_kl=False)
def dr_grpo(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """Dr. GRPO (Liu et al. 2025): the reward minus its prompt group's mean, no division by the group's std."""
    adv = group_centered(inp.rewards.to(inp.mask.device), inp.samples_per_prompt)
    return adv.reshape(-1, 1).to(inp.mask.dtype) * inp.mask, None


@register_advantage("rloo", needs_groups=True, reward_kl=False)
def rloo(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """RLOO (Ahmadian et al. 2024): the reward minus the mean reward of the prompt's other samples."""
    return rloo_advantages(inp.rewards.to(inp.mask.device), inp.samples_per_prompt, inp.mask), None


@register_advantage("reinforce_pp", reward_kl=True)
def reinforce_pp(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE++ (Hu 2025): the discounted return (``ppo.gamma``) of the per-token reward -- the outcome on
    the last token, minus the KL penalty on every token with ``ppo.kl_in_reward`` -- whitened over the whole
    global batch (mean and std over every rank's response tokens, ``masked_whiten``)."""
    returns = discounted_returns(per_token_rewards(inp, inp.rewards), inp.mask, inp.ppo.gamma)
    return masked_whiten(returns, inp.mask), None


@register_advantage("reinforce_pp_baseline", needs_groups=True, reward_kl=True)
def reinforce_pp_baseline(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE++-baseline: REINFORCE++ on rewards minus their prompt group's mean (then batch-whitened)."""
    centred = group_centered(inp.rewards.to(inp.mask.device), inp.samples_per_prompt).float()
    returns = discounted_returns(per_token_rewards(inp, centred), inp.mask, inp.ppo.gamma)
    return masked_whiten(returns, inp.mask), None
