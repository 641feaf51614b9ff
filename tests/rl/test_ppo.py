"""Advantages and losses against hand-computed values and direct formulas."""

import math

import pytest
import torch

from ippo.rl import losses as ppo


def test_gae_matches_hand_computation():
    # one episode of 3 tokens (4th padded), gamma=0.9, lam=0.8
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.4  # terminal: V(after last) = 0
    d1 = 0.0 + g * 0.4 - 0.2
    d0 = 0.0 + g * 0.2 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = ppo.gae(r, v, m, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    v = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, _ = ppo.gae(r, v, m, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.9, 0.8, 0.7], [1.6, 1.5, 0.0]]))


def test_whitening_hand_values():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    mean, std = 3.0, math.sqrt(2.5)  # unbiased variance of 1..5 is 2.5
    w = ppo.masked_whiten(x, m)
    expected = torch.tensor([[(1 - mean) / std, (2 - mean) / std, 0.0],
                             [(3 - mean) / std, (4 - mean) / std, (5 - mean) / std]])
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)


def test_grpo_group_normalised():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    m = torch.ones(8, 2)
    a = ppo.grpo_advantages(scores, 4, m)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(a[:4, 0], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (s + 1e-6))
    assert torch.all(a[4:] == 0)  # identical rewards: no signal


def test_policy_loss_matches_direct_formula():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(3, 5) * 0.3, torch.randn(3, 5) * 0.3, torch.randn(3, 5)
    clip = 0.2
    loss, clipped = ppo.policy_loss_per_token(logp, old, adv, clip)
    for i in range(3):
        for t in range(5):
            ratio = math.exp(logp[i, t] - old[i, t])
            a = adv[i, t].item()
            direct = -min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            assert loss[i, t].item() == pytest.approx(direct, rel=1e-5, abs=1e-6)
            assert clipped[i, t].item() == float(-a * min(max(ratio, 0.8), 1.2) > -a * ratio)


def test_value_loss_clipping():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.5])
    loss = ppo.value_loss_per_token(v, old, ret, 0.2)
    # first: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> max 3.24; second: both 0.25
    torch.testing.assert_close(loss, torch.tensor([0.5 * 3.24, 0.5 * 0.25]))
    torch.testing.assert_close(ppo.value_loss_per_token(v, old, ret, 0.0), torch.tensor([0.5, 0.125]))


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(ppo.kl_estimate(lp, ref, "k1"), lp - ref)
    d = ref - lp
    torch.testing.assert_close(ppo.kl_estimate(lp, ref, "k3"), torch.exp(d) - d - 1)
    assert torch.all(ppo.kl_estimate(lp, ref, "k3") >= 0)


def test_aggregation_token_vs_sequence_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert ppo.aggregate(x, m, "token_mean", 4.0, 2.0).item() == pytest.approx(10 / 4)
    assert ppo.aggregate(x, m, "seq_mean", 4.0, 2.0).item() == pytest.approx((2.0 + 4.0) / 2)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_scoring_loss_gradient_equals_ppo_policy_gradient_at_theta_old(agg):
    """sum_e grad L_e must equal grad of the clipped surrogate at ratio 1, per episode too."""
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 4))
    m = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.randn(3, 4) * m
    logp = ppo.logprobs_from_logits(logits, tokens)
    tn, sn = float(m.sum()), 3.0
    for e in range(3):
        (g_score,) = torch.autograd.grad(ppo.scoring_loss_per_episode(logp, adv, m, agg, tn, sn)[e], logits,
                                         retain_graph=True)
        pg, _ = ppo.policy_loss_per_token(logp[e:e + 1], logp[e:e + 1].detach(), adv[e:e + 1], 0.2)
        (g_ppo,) = torch.autograd.grad(ppo.aggregate(pg, m[e:e + 1], agg, tn, sn), logits, retain_graph=True)
        torch.testing.assert_close(g_score, g_ppo)


def test_token_rewards_on_last_token_minus_kl():
    m = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    kl = torch.full((2, 3), 0.5)
    r = ppo.token_rewards(torch.tensor([1.0, 2.0]), m, kl, 0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.95, 0.0], [-0.05, -0.05, 1.95]]))


def test_sft_loss_masks_prompt():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1]])
    s, n = ppo.sft_loss_sum(logits, labels)
    lp = logits.log_softmax(-1)
    assert n == 2
    assert s.item() == pytest.approx(-(lp[0, 1, 3] + lp[0, 2, 1]).item(), rel=1e-6)
