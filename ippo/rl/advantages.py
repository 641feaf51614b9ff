"""Advantage estimators, by name (``ppo.advantage``): each one registered function.

An estimator reads one iteration's rewards and token tensors (``AdvantageInputs``) and returns the
per-token advantages [E, T] and, when it trains a critic, the value targets (returns) [E, T]. Adding one:

    @register_advantage("my_estimator", needs_critic=False)
    def my_estimator(inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        ...

``needs_critic`` makes the trainer load (and train) a value model and fill ``inp.values``. I-PPO works
with every estimator unchanged: it scores the episode's share of the policy loss built from these
advantages. The config validates ``ppo.advantage`` against this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ippo.rl.losses import gae, grpo_advantages, kl_estimate, masked_whiten, token_rewards

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


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, *, needs_critic: bool = False) -> Callable[[Estimator], Estimator]:
    def register(fn: Estimator) -> Estimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic)
        return fn

    return register


def estimate(name: str, inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages [E, T], returns [E, T] or None) by the estimator registered as ``name``."""
    return ADVANTAGE_ESTIMATORS[name].fn(inp)


@register_advantage("gae", needs_critic=True)
def gae_advantages(inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) on the critic's values; the rule reward on the last token, minus the KL penalty
    per token with ``ppo.kl_in_reward``; advantages whitened over the global batch by default."""
    ppo = inp.ppo
    kl_pen = None  # KL as a per-token reward penalty needs the old log-probs, computed before this step then
    if ppo.kl_in_reward and inp.ref_logp is not None:
        kl_pen = kl_estimate(inp.old_logp, inp.ref_logp, ppo.kl_estimator) * inp.mask
    tok_rewards = token_rewards(inp.rewards.to(inp.mask.device), inp.mask, kl_pen, ppo.kl_coef)
    adv, returns = gae(tok_rewards, inp.values, inp.mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        adv = masked_whiten(adv, inp.mask)
    return adv, returns


@register_advantage("grpo")
def grpo(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """GRPO: the reward minus its prompt group's mean, divided by the group's std (+ ``ppo.grpo_eps``)."""
    return grpo_advantages(inp.rewards.to(inp.mask.device), inp.samples_per_prompt, inp.mask, inp.ppo.grpo_eps), None
