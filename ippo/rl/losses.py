"""PPO math: log-probs, advantages (GAE, GRPO, RLOO, REINFORCE returns), whitening, and the losses.

Shapes: per-token tensors are ``[B, T]`` over the response tokens only; ``mask`` is 1 on real
response tokens (up to and including the first EOS) and 0 on padding. Everything here is pure
tensor code, tested against hand-computed values in ``tests/rl/test_ppo.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ippo.rl.parallel import distributed as dist


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 (softmax over a large vocabulary needs it); fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], in fp32 at least. logits [B, T, V], tokens [B, T] -> [B, T]."""
    logits = _upcast(logits)
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the softmax policy, [B, T, V] -> [B, T]."""
    logits = _upcast(logits)
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  group=None) -> torch.Tensor:
    """(x - mean) / std over the masked tokens of the *global* batch (all ranks), unbiased variance.

    In a multi-process run the sums are all-reduced so every rank whitens with the same statistics
    (a one-process run on the same global batch gives identical advantages).
    """
    mask = mask.to(x.dtype)
    stats = torch.stack([(x * mask).sum(), mask.sum()]).double()
    dist.all_reduce_sum(stats, group)
    mean = stats[0] / stats[1]
    sq = ((x.double() - mean) ** 2 * mask).sum().reshape(1)
    dist.all_reduce_sum(sq, group)
    n = stats[1]
    var = sq[0] / (n - 1).clamp(min=1)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * mask).to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    rewards, values, mask: [B, T]. The episode ends after its last masked token (V = 0 beyond),
    so masked-out positions neither receive nor pass on value. Returns (advantages, returns),
    both zero outside the mask; returns = advantages + values.
    """
    rewards = rewards * mask
    values = values * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]
        adv[:, t] = last
    returns = (adv + values) * mask
    return adv * mask, returns


def grpo_advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor, eps: float = 1e-6
                    ) -> torch.Tensor:
    """Group-normalised advantages (GRPO): (r - mean_group) / (std_group + eps), broadcast to tokens.

    scores [B] with the ``group_size`` samples of a prompt contiguous. Returns [B, T].
    """
    g = scores.view(-1, group_size).double()
    norm = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)
    return norm.reshape(-1, 1).to(mask.dtype) * mask


def group_centered(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each reward minus its prompt group's mean (Dr. GRPO's advantage, REINFORCE++-baseline's reward), [B]
    float64; ``scores`` [B] with the ``group_size`` samples of a prompt contiguous."""
    g = scores.view(-1, group_size).double()
    return (g - g.mean(1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* samples of its prompt, broadcast to tokens, [B, T]."""
    g = scores.view(-1, group_size).double()
    adv = g - (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return adv.reshape(-1, 1).to(mask.dtype) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k-t) r_k over each episode's response tokens, [B, T] (GAE with V = 0, lambda = 1)."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Sequence reward placed on the last response token, minus an optional per-token KL penalty."""
    r = torch.zeros_like(mask, dtype=torch.float32)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    r[torch.arange(mask.shape[0], device=mask.device), last] = scores.float()
    if kl is not None and kl_coef:
        r = r - kl_coef * kl
    return r * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi.

    k1 = log pi - log ref (unbiased, high variance, can be negative);
    k3 = exp(ref - pi) - (ref - pi) - 1 (unbiased, always >= 0; Schulman's estimator).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = (ref_logp - logp).clamp(-20, 20)  # bound exp() when the policy drifts far
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}")


# ppo.loss_agg's values (verl's loss_agg_mode token-mean / seq-mean-token-mean / seq-mean-token-sum; TRL's dr_grpo)
LOSS_AGGS = ("token_mean", "seq_mean", "seq_mean_token_sum", "token_sum_norm")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, token_norm: float, seq_norm: float,
              norm_len: float = 1.0) -> torch.Tensor:
    """Sum a per-token loss into the (global) mini-batch loss.

    token_mean: sum over tokens / ``token_norm`` (the number of response tokens in the global
    mini-batch); seq_mean: sum over sequences of the per-sequence token mean / ``seq_norm`` (the
    number of sequences in the global mini-batch); seq_mean_token_sum: sum over sequences of the
    per-sequence token sum / ``seq_norm``; token_sum_norm (Dr. GRPO): sum over tokens / (``norm_len``
    x ``seq_norm``), a constant that depends on no response's length. Normalising by global counts
    (instead of this micro-batch's) makes gradient accumulation and multi-process sums exact.
    """
    if agg == "token_mean":
        return (per_token * mask).sum() / token_norm
    if agg == "seq_mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / seq_norm
    if agg == "seq_mean_token_sum":
        return (per_token * mask).sum() / seq_norm
    if agg == "token_sum_norm":
        return (per_token * mask).sum() / (norm_len * seq_norm)
    raise ValueError(f"unknown loss aggregation {agg!r}")


def loss_norm_len(cfg) -> float:
    """``ppo.loss_agg=token_sum_norm``'s constant length: ``ppo.loss_norm_len``, else ``rollout.max_new_tokens``."""
    return float(cfg.ppo.loss_norm_len or cfg.rollout.max_new_tokens)


def episode_norms(lengths: torch.Tensor, agg: str) -> torch.Tensor:
    """What each episode adds to its mini-batch's normaliser under ``agg``: its token count (token_mean) or 1
    (the modes that divide by the number of sequences). in_update renormalises kept episodes by these."""
    if agg == "token_mean":
        return lengths.float()
    if agg in LOSS_AGGS:
        return torch.ones(len(lengths))
    raise ValueError(f"unknown loss aggregation {agg!r}")


def policy_loss_per_token(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float,
                          clip_high: float | None = None, dual_clip: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate, per token: max(-A r, -A clip(r, 1-eps_low, 1+eps_high)). Returns (loss, clipped?).

    ``clip`` is eps_low, ``clip_high`` eps_high (None: = clip; DAPO's clip-higher sets it larger).
    ``dual_clip`` = c > 1 (dual-clip PPO, Ye et al. 2020): for A < 0 the loss is also bounded by -c A,
    min(max(-A r, -A clip(r)), -c A), so a huge ratio on a bad action cannot blow the step up. A token
    counts as clipped when either bound is active (its gradient is then 0).
    """
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    loss, clipped = torch.maximum(l1, l2), (l2 > l1)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        dual = (adv < 0) & (l3 < loss)
        loss, clipped = torch.where(dual, l3, loss), clipped | dual
    return loss, clipped.float()


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, ppo,
                    is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's clipped surrogate per token (``ppo``: its ``PPOConfig``: clip range, dual clip), times the
    rollout-correction weights ``is_weight`` [B, T] when given. Returns (loss, clipped?)."""
    loss, clipped = policy_loss_per_token(logp, old_logp, adv, ppo.clip if ppo.clip_low is None else ppo.clip_low,
                                          ppo.clip_high, ppo.dual_clip)
    return (loss if is_weight is None else loss * is_weight), clipped


def importance_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, correction: str,
                       level: str, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-policy correction of the rollout engine's sampling: per-token weights [B, T] of the policy loss.

    The ratio is pi_old / pi_sampler = exp(old_logp - sampler_logp), per token (``level=token``) or per
    sequence (``sequence``: exp of the sum over its tokens, the same weight on each of them). ``tis``
    (truncated IS): min(ratio, cap); ``mis`` (masked IS, i.e. rejection): 1 when ratio <= cap, else 0;
    ``none``: 1. Returns (weights, capped) where ``capped`` [B, T] marks the tokens whose ratio exceeded
    ``cap``; both are 0 outside ``mask``. Constants: no gradient flows through them.
    """
    log_ratio = ((old_logp - sampler_logp) * mask).detach().double()
    if level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
    elif level != "token":
        raise ValueError(f"unknown importance-sampling level {level!r}")
    log_cap = math.log(cap)
    capped = log_ratio > log_cap
    if correction == "tis":
        w = torch.exp(log_ratio.clamp(max=log_cap))
    elif correction == "mis":
        w = (~capped).double()
    elif correction == "none":
        w = torch.ones_like(log_ratio)
    else:
        raise ValueError(f"unknown importance-sampling correction {correction!r}")
    return (w * mask).to(old_logp.dtype), (capped & (mask > 0)).to(old_logp.dtype)


def value_loss_per_token(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                         clip: float) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -c, c); c=0: no clip."""
    l1 = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * l1
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    l2 = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(l1, l2)


def correction_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor | None, mask: torch.Tensor, ppo
                       ) -> torch.Tensor | None:
    """``ppo.is_correction``'s per-token weights of the policy loss [B, T] (``ppo``: the run's ``PPOConfig``), or
    None without a correction (or without the sampler's log-probs)."""
    if sampler_logp is None or ppo.is_correction == "none":
        return None
    return importance_weights(old_logp, sampler_logp, mask, ppo.is_correction, ppo.is_level, ppo.is_cap)[0]


def correction_stats(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, ppo) -> dict[str, float]:
    """Metrics of the rollout correction over all ranks' response tokens: the mean weight (``is_weight_mean``),
    the share of tokens whose ratio pi_old / pi_sampler exceeded ``ppo.is_cap`` (``is_clipped_frac``: truncated
    by tis, dropped by mis) and the mean ratio itself (``is_ratio_mean``, per token or sequence as weighted)."""
    w, capped = importance_weights(old_logp, sampler_logp, mask, ppo.is_correction, ppo.is_level, ppo.is_cap)
    ratio, _ = importance_weights(old_logp, sampler_logp, mask, "tis", ppo.is_level, float("inf"))
    sums = torch.stack([w.sum(), capped.sum(), ratio.sum(), mask.sum()]).double()
    dist.all_reduce_sum(sums)
    n = max(float(sums[3]), 1.0)
    return {"is_weight_mean": float(sums[0]) / n, "is_clipped_frac": float(sums[1]) / n,
            "is_ratio_mean": float(sums[2]) / n}


def scoring_loss_per_episode(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, agg: str,
                             token_norm: float, seq_norm: float, norm_len: float = 1.0,
                             is_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each episode's share L_e of the PPO policy loss at theta_old, [B].

    At theta = theta_old the ratio is 1 and the clip is inactive (dual clip too: c > 1), so grad of the
    clipped surrogate equals grad of -sum_t A_t log pi(a_t) (times the rollout-correction weight
    ``is_weight`` of each token when given); aggregated exactly like the policy loss so that
    sum_e grad L_e is the PPO policy gradient of the whole batch.
    """
    adv = adv if is_weight is None else adv * is_weight
    return aggregate_per_episode(-adv * logp, mask, agg, token_norm, seq_norm, norm_len)


def aggregate_per_episode(per_token: torch.Tensor, mask: torch.Tensor, agg: str, token_norm: float,
                          seq_norm: float, norm_len: float = 1.0) -> torch.Tensor:
    """Each row's share of ``aggregate(per_token, ...)``, [B]: the shares sum to the aggregate."""
    per_tok = per_token * mask
    if agg == "token_mean":
        return per_tok.sum(1) / token_norm
    if agg == "seq_mean":
        return per_tok.sum(1) / mask.sum(1).clamp(min=1) / seq_norm
    if agg == "seq_mean_token_sum":
        return per_tok.sum(1) / seq_norm
    if agg == "token_sum_norm":
        return per_tok.sum(1) / (norm_len * seq_norm)
    raise ValueError(f"unknown loss aggregation {agg!r}")


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labels != -100 (prompt tokens masked). Returns (sum, count)."""
    shift_logits = _upcast(logits[:, :-1])
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((shift_labels != -100).sum())


def policy_terms_per_token(logp: torch.Tensor, logits: torch.Tensor, ref_logp: torch.Tensor | None,
                           ppo) -> torch.Tensor | None:
    """The KL-penalty and entropy-bonus terms of the policy loss, per token (None when there are none).

    ``ppo``: the run's ``PPOConfig``. They join the influence-weighted episode loss with
    ``influence.episode_loss=policy`` (or ``all``).
    """
    terms = []
    if ref_logp is not None and not ppo.kl_in_reward:
        terms.append(ppo.kl_coef * kl_estimate(logp, ref_logp, ppo.kl_estimator))
    if ppo.entropy_coef:
        terms.append(-ppo.entropy_coef * entropy_from_logits(logits))
    return sum(terms) if terms else None
