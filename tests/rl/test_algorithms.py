"""The RL algorithms of issue 23, each against a hand-computed case and end to end with I-PPO on and off:
advantage estimators (rloo, dr_grpo, reinforce_pp, reinforce_pp_baseline), loss aggregations
(seq_mean_token_sum, token_sum_norm), asymmetric and dual clipping, the vLLM rollout correction (tis / mis,
per token or sequence), DAPO's dynamic sampling and the PODS max-variance control."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ippo.rl import dynamic_sampling as ds
from ippo.rl import filters, loop
from ippo.rl import losses as L
from ippo.rl.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, estimate
from ippo.rl.checkpoint import latest_checkpoint
from ippo.rl.config import ConfigError, load_config
from ippo.rl.data import iteration_prompts
from ippo.rl.loop import train
from ippo.rl.settings import PPOConfig

from . import fake_vllm
from .conftest import DATA, fast_overrides


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _inputs(rewards, mask, n, ppo=None, old_logp=None, ref_logp=None):
    mask = torch.tensor(mask)
    return AdvantageInputs(torch.tensor(rewards), mask, torch.zeros_like(mask),
                           torch.zeros_like(mask) if old_logp is None else torch.tensor(old_logp),
                           None if ref_logp is None else torch.tensor(ref_logp), n, ppo or PPOConfig())


# ------------------------------------------------------------------------------------- estimators


def test_rloo_and_dr_grpo_hand_values():
    inp = _inputs([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], [[1.0, 1.0]] * 8, 4)
    adv, ret = estimate("rloo", inp)
    # group 1: sum 2, leave-one-out means 1/3, 2/3, 2/3, 1/3; group 2: sum 3, means 2/3, 2/3, 2/3, 1
    want = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0])
    assert ret is None
    torch.testing.assert_close(adv, want[:, None].expand(8, 2).contiguous())
    adv, _ = estimate("dr_grpo", inp)  # minus the group mean (0.5, 0.75), no std division
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    torch.testing.assert_close(adv, want[:, None].expand(8, 2).contiguous())


def test_reinforce_pp_hand_values():
    """Per-token reward = outcome on the last token - kl_coef * KL (k1, in the reward), returns (gamma 1),
    whitened over all 5 response tokens of the batch (unbiased std, as masked_whiten)."""
    ppo = PPOConfig(kl_in_reward=True, kl_coef=0.1, kl_estimator="k1", gamma=1.0)
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    old = [[0.5, 0.0, 1.0], [1.0, 0.5, 7.0]]  # KL (k1) = old - ref, ref = 0; the masked 7.0 never counts
    inp = _inputs([1.0, 0.0], mask, 1, ppo, old_logp=old, ref_logp=[[0.0] * 3] * 2)
    adv, ret = estimate("reinforce_pp", inp)
    # token rewards [-0.05, 0, 1 - 0.1], [-0.1, -0.05]; returns [0.85, 0.9, 0.9], [-0.15, -0.05]
    g = [0.85, 0.9, 0.9, -0.15, -0.05]
    mean = sum(g) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / 4 + 1e-8)
    want = torch.tensor([[(g[0] - mean) / std, (g[1] - mean) / std, (g[2] - mean) / std],
                         [(g[3] - mean) / std, (g[4] - mean) / std, 0.0]])
    assert ret is None
    torch.testing.assert_close(adv, want)
    # discounting: gamma 0.5 on the first episode's token rewards
    r = L.discounted_returns(torch.tensor([[-0.05, 0.0, 0.9]]), torch.ones(1, 3), 0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05 + 0.5 * 0.45, 0.45, 0.9]]))


def test_reinforce_pp_baseline_hand_values():
    """Rewards minus the group mean ([1, 0] -> +-0.5; [1, 1] -> 0), returns, then batch-whitened (mean 0,
    unbiased variance 4 * 0.25 / 7 over the 8 tokens)."""
    adv, _ = estimate("reinforce_pp_baseline", _inputs([1.0, 0.0, 1.0, 1.0], [[1.0, 1.0]] * 4, 2))
    s = 0.5 / math.sqrt(1 / 7 + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([[s, s], [-s, -s], [0.0, 0.0], [0.0, 0.0]]))


def test_estimator_registry_flags():
    est = ADVANTAGE_ESTIMATORS
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"} <= set(est)
    assert [n for n in est if est[n].needs_critic] == ["gae"]
    assert {n for n in est if est[n].needs_groups} == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
    assert est["rloo"].reward_kl is False and est["reinforce_pp"].reward_kl and est["grpo"].reward_kl is None


# ------------------------------------------------------------------------------------------ losses


def test_new_aggregations_hand_values_and_per_episode_shares():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    want = {"token_mean": 10 / 4, "seq_mean": (2.0 + 4.0) / 2, "seq_mean_token_sum": (6 + 4) / 2,
            "token_sum_norm": 10 / (5 * 2)}
    for agg in L.LOSS_AGGS:
        total = L.aggregate(x, m, agg, 4.0, 2.0, norm_len=5.0)
        shares = L.aggregate_per_episode(x, m, agg, 4.0, 2.0, norm_len=5.0)
        assert total.item() == pytest.approx(want[agg]), agg
        assert shares.sum().item() == pytest.approx(total.item()), agg
    assert L.episode_norms(torch.tensor([3, 1]), "token_mean").tolist() == [3.0, 1.0]
    for agg in ("seq_mean", "seq_mean_token_sum", "token_sum_norm"):
        assert L.episode_norms(torch.tensor([3, 1]), agg).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        L.episode_norms(torch.tensor([3]), "token_sum")


def test_loss_norm_len_defaults_to_max_new_tokens(make_cfg):
    assert L.loss_norm_len(make_cfg("ppo.loss_agg=token_sum_norm")) == 8.0
    assert L.loss_norm_len(make_cfg("ppo.loss_agg=token_sum_norm", "ppo.loss_norm_len=100")) == 100.0


@pytest.mark.parametrize("agg", ["seq_mean_token_sum", "token_sum_norm"])
@pytest.mark.parametrize("weighted", [False, True])
def test_scoring_loss_gradient_equals_the_corrected_policy_gradient(agg, weighted):
    """sum_e grad L_e (I-PPO's episode losses) = grad of the run's policy loss at ratio 1, per episode, with the
    new aggregations and with rollout-correction weights on the tokens."""
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 4))
    m = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.randn(3, 4) * m
    w = (torch.rand(3, 4) * 2) * m if weighted else None
    ppo = PPOConfig(clip_low=0.1, clip_high=0.3, dual_clip=3.0)
    logp = L.logprobs_from_logits(logits, tokens)
    for e in range(3):
        le = L.scoring_loss_per_episode(logp, adv, m, agg, 7.0, 3.0, 6.0, w)[e]
        (g_score,) = torch.autograd.grad(le, logits, retain_graph=True)
        pg, _ = L.ppo_policy_loss(logp[e:e + 1], logp[e:e + 1].detach(), adv[e:e + 1], ppo,
                                  None if w is None else w[e:e + 1])
        (g_ppo,) = torch.autograd.grad(L.aggregate(pg, m[e:e + 1], agg, 7.0, 3.0, 6.0), logits, retain_graph=True)
        torch.testing.assert_close(g_score, g_ppo)


def test_asymmetric_and_dual_clip_hand_values():
    ratio = torch.tensor([1.5, 0.5, 5.0, 5.0, 2.0, 1.1])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    logp = ratio.log()
    old = torch.zeros(6)
    loss, clipped = L.policy_loss_per_token(logp, old, adv, 0.2, clip_high=0.28)
    # A > 0: -min(r, 1.28) A; A < 0: max(-A r, -A max(r, 0.8))
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 5.0, -1.28, 2.0, -1.1]))
    assert clipped.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    loss, clipped = L.policy_loss_per_token(logp, old, adv, 0.2, clip_high=0.28, dual_clip=3.0)
    # dual clip: a negative advantage's loss is at most -3 A = 3 (the ratio-5 token); A > 0 is untouched
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 3.0, -1.28, 2.0, -1.1]))
    assert clipped.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    r = ratio.clone().requires_grad_(True)
    loss, _ = L.policy_loss_per_token(r.log(), old, adv, 0.2, dual_clip=3.0)
    (g,) = torch.autograd.grad(loss.sum(), r)
    assert g[2] == 0 and g[4] == 1.0  # dual-clipped: no gradient; unclipped A < 0: d(-A r)/dr = 1
    # symmetric default: the very same numbers as before the new options existed
    a, ca = L.policy_loss_per_token(logp, old, adv, 0.2)
    b, cb = L.ppo_policy_loss(logp, old, adv, PPOConfig(clip=0.2))
    assert torch.equal(a, b) and torch.equal(ca, cb)


def test_importance_weights_hand_values():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -0.5]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -3.0, -3.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the masked token (log-ratio 2.5) never counts
    e = math.exp
    w, capped = L.importance_weights(old, sampler, m, "tis", "token", 1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, e(-1.0), 1.0], [e(0.2), 1.5, 0.0]]))
    assert capped.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    w, capped = L.importance_weights(old, sampler, m, "mis", "token", 1.5)
    assert w.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]] and capped.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # per sequence: exp(0.5 - 1 + 0) = e^-0.5 for the first, exp(0.2 + 2) = e^2.2 for the second
    w, capped = L.importance_weights(old, sampler, m, "tis", "sequence", 2.0)
    torch.testing.assert_close(w, torch.tensor([[e(-0.5)] * 3, [2.0, 2.0, 0.0]]))
    assert capped.tolist() == [[0.0] * 3, [1.0, 1.0, 0.0]]
    w, _ = L.importance_weights(old, sampler, m, "mis", "sequence", 2.0)
    assert w.tolist() == [[1.0] * 3, [0.0] * 3]
    stats = L.correction_stats(old, sampler, m, PPOConfig(is_correction="tis", is_level="sequence", is_cap=2.0))
    assert stats["is_weight_mean"] == pytest.approx((3 * e(-0.5) + 4.0) / 5)
    assert stats["is_clipped_frac"] == pytest.approx(2 / 5)
    assert stats["is_ratio_mean"] == pytest.approx((3 * e(-0.5) + 2 * e(2.2)) / 5)
    assert L.correction_weights(old, None, m, PPOConfig(is_correction="tis")) is None


# ------------------------------------------------------------------------------------------ config

BASE = ["model.path=/nonexistent/model", f"data.train_path={DATA / 'arith_train.jsonl'}", "data.val_holdout=4"]


@pytest.mark.parametrize("overrides,match", [
    (["ppo.advantage=rloo", "rollout.samples_per_prompt=1"], "ppo.advantage=rloo needs rollout.samples_per_prompt"),
    (["ppo.advantage=grpo", "rollout.samples_per_prompt=1"], "ppo.advantage=grpo needs rollout.samples_per_prompt"),
    (["ppo.advantage=dr_grpo", "ppo.kl_in_reward=true"], "uses the outcome reward only"),
    (["ppo.loss_agg=token_sum"], "ppo.loss_agg='token_sum': expected one of"),
    (["ppo.loss_norm_len=100"], "used by ppo.loss_agg=token_sum_norm only"),
    (["ppo.loss_agg=token_sum_norm", "ppo.loss_norm_len=0"], "ppo.loss_norm_len=0"),
    (["ppo.clip_low=1.5"], r"ppo.clip_low=1.5: must be in \(0, 1\]"),
    (["ppo.clip_high=0"], "ppo.clip_high=0.0: must be > 0"),
    (["ppo.dual_clip=1.0"], "ppo.dual_clip=1.0: must be a finite c > 1"),
    (["ppo.is_correction=tis"], "only rollout.engine=vllm returns"),
    (["ppo.is_correction=icepop"], "ppo.is_correction='icepop'"),
    (["ppo.is_level=batch"], "ppo.is_level='batch'"),
    (["ppo.is_cap=0.5"], "ppo.is_cap=0.5: must be a finite number >= 1"),
    (["rollout.dynamic_sampling=true", "rollout.samples_per_prompt=1"], "rollout.dynamic_sampling keeps prompts"),
    (["rollout.max_sample_rounds=0"], "rollout.max_sample_rounds=0: must be >= 1"),
    (["influence.enabled=false", "control.filter=max_variance"], "control.filter=max_variance needs control.match_run"),
    (["influence.enabled=false", "control.filter=max_variance", "control.match_run=x",
      "rollout.samples_per_prompt=1"], "control.filter=max_variance needs rollout.samples_per_prompt >= 2"),
])
def test_bad_combinations_are_one_line_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, BASE + overrides)
    assert "\n" not in str(e.value)


def test_good_combinations_load():
    load_config(None, BASE + ["ppo.advantage=reinforce_pp", "ppo.kl_in_reward=true"])
    load_config(None, BASE + ["ppo.advantage=rloo", "ppo.kl_in_reward=true", "ppo.kl_coef=0"])
    load_config(None, BASE + ["ppo.loss_agg=token_sum_norm", "ppo.loss_norm_len=64", "ppo.clip_high=0.28",
                              "ppo.dual_clip=3", "rollout.engine=vllm", "ppo.is_correction=mis",
                              "ppo.is_level=sequence", "rollout.dynamic_sampling=true"])


# ------------------------------------------------------------------------------- end to end, I-PPO on/off

OPTIONS = {
    "rloo": ["ppo.advantage=rloo"],
    "dr_grpo": ["ppo.advantage=dr_grpo"],
    "reinforce_pp": ["ppo.advantage=reinforce_pp", "ppo.kl_in_reward=true", "ppo.kl_coef=0.05"],
    "reinforce_pp_baseline": ["ppo.advantage=reinforce_pp_baseline", "ppo.kl_coef=0.05"],
    "seq_mean_token_sum": ["ppo.loss_agg=seq_mean_token_sum"],
    "token_sum_norm": ["ppo.loss_agg=token_sum_norm", "ppo.loss_norm_len=6"],
    "clip_higher_dual": ["ppo.clip_low=0.2", "ppo.clip_high=0.28", "ppo.dual_clip=3", "ppo.lr=1e-2"],
    "dynamic_sampling": ["ppo.advantage=grpo", "rollout.dynamic_sampling=true", "rollout.max_sample_rounds=3"],
}


@pytest.mark.parametrize("influence", [True, False], ids=["ippo", "ppo"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_runs_end_to_end(make_cfg, tmp_path, option, influence):
    run = tmp_path / option
    out = train(make_cfg(*OPTIONS[option], f"influence.enabled={str(influence).lower()}", "influence.on_empty=skip",
                         run_dir=run))
    assert out["iterations_done"] == 2 and out["stopped"] is None
    m = _jsonl(run / "metrics.jsonl")
    assert all(math.isfinite(r["pg_loss"]) and r["nonfinite_steps"] == 0 for r in m)
    assert all(r["updates"] > 0 or r["kept"] == 0 for r in m)
    assert ("score_mean" in m[0]) == influence
    assert ("sample_rounds" in m[0]) == (option == "dynamic_sampling")


@pytest.mark.parametrize("agg", ["seq_mean_token_sum", "token_sum_norm"])
def test_in_update_renormalises_the_new_aggregations_like_before_update(make_cfg, tmp_path, tiny_model_dir, agg):
    """One mini-batch = the whole buffer: the in-backward selection at theta_old, renormalised by the episode
    norms of the new modes (1 per sequence), gives before_update's update."""
    common = ("iterations=1", "ppo.epochs=1", "ppo.mini_batch_size=16", "ppo.micro_batch_size=16",
              f"ppo.loss_agg={agg}", "ppo.advantage=rloo")
    runs = {t: tmp_path / t for t in ("before_update", "in_update")}
    for timing, run in runs.items():
        assert train(make_cfg(*common, f"influence.timing={timing}", run_dir=run))["stopped"] is None
    _same_selection_and_update(runs["before_update"], runs["in_update"], tiny_model_dir)


def _same_selection_and_update(run_a, run_b, model_dir):
    """Same scores and keep mask; the same update, relative to its size (AdamW turns fp32-level gradient
    differences on near-zero gradients into visible steps; a wrong weighting differs at O(1))."""
    a, b = _jsonl(run_a / "influence.jsonl"), _jsonl(run_b / "influence.jsonl")
    s_a = torch.tensor([r["score"] for r in a], dtype=torch.float64)
    s_b = torch.tensor([r["score"] for r in b], dtype=torch.float64)
    assert float((s_a - s_b).norm() / s_a.norm()) < 1e-4
    assert [r["kept"] for r in a] == [r["kept"] for r in b] and 0 < sum(r["kept"] for r in a) < len(a)
    w0 = load_file(str(model_dir / "model.safetensors"))
    w_a = load_file(str(latest_checkpoint(run_a) / "policy.safetensors"))
    w_b = load_file(str(latest_checkpoint(run_b) / "policy.safetensors"))
    for name, w in w_a.items():
        step = w - w0[name if name in w0 else f"model.{name}"]
        assert float((w_b[name] - w).norm()) <= 1e-2 * float(step.norm()), name


# ------------------------------------------------------------------------- vLLM rollout correction

VLLM = ["rollout.engine=vllm", "device=auto", "rollout.temperature=0.7", "iterations=1", "ppo.epochs=1",
        "ppo.mini_batch_size=16", "ppo.micro_batch_size=16"]
OFFSET = -0.4  # the fake engine reports log-probs 0.4 below the trainer's: pi_old / pi_vllm = e^0.4 per token


@pytest.fixture
def offset_vllm(monkeypatch):
    fake_vllm.install(monkeypatch)
    monkeypatch.setattr(fake_vllm.LLM, "logprob_offset", OFFSET)
    lengths = []
    make_batch = loop.make_batch

    def recording(c, ep, rewards, stats=None):
        batch = make_batch(c, ep, rewards, stats)
        lengths.append(batch.lengths.clone())
        return batch

    monkeypatch.setattr(loop, "make_batch", recording)
    return lengths


@pytest.mark.parametrize("correction,level,cap", [("tis", "token", 1.2), ("tis", "token", 2.0), ("mis", "token", 1.2),
                                                  ("tis", "sequence", 2.0), ("mis", "sequence", 2.0)])
def test_is_correction_weights_are_logged_and_applied(make_cfg, tmp_path, offset_vllm, correction, level, cap):
    """PPO, one mini-batch at theta_old: the policy loss is sum -A w / N, so against the same run without the
    correction (same rollout: the offset only shifts the reported log-probs) it scales by the weights."""
    plain_adv = ["influence.enabled=false", "ppo.whiten_advantages=false"]  # gae, zero critic: A = reward > 0
    base = tmp_path / "none"
    train(make_cfg(*VLLM, *plain_adv, run_dir=base))
    run = tmp_path / "corrected"
    train(make_cfg(*VLLM, *plain_adv, f"ppo.is_correction={correction}", f"ppo.is_level={level}",
                   f"ppo.is_cap={cap}", run_dir=run))
    r0, r1 = _jsonl(base / "metrics.jsonl")[0], _jsonl(run / "metrics.jsonl")[0]
    assert "is_weight_mean" not in r0 and r0["logp_mismatch_mean"] == pytest.approx(OFFSET, abs=1e-4)
    lengths = offset_vllm[-1].double()
    ratio = torch.exp(-OFFSET * (lengths if level == "sequence" else torch.ones_like(lengths)))
    capped = ratio > cap
    w = ratio.clamp(max=cap) if correction == "tis" else (~capped).double()
    n = float(lengths.sum())
    assert r1["is_weight_mean"] == pytest.approx(float((w * lengths).sum()) / n, rel=1e-3)
    assert r1["is_clipped_frac"] == pytest.approx(float((capped * lengths).sum()) / n)
    rewards = torch.tensor([e["reward"] for e in _jsonl(run / "influence.jsonl")], dtype=torch.float64)
    assert r0["pg_loss"] == pytest.approx(-float((rewards * lengths).sum()) / n, rel=1e-5) and r0["pg_loss"] < 0
    assert r1["pg_loss"] == pytest.approx(-float((rewards * w * lengths).sum()) / n, rel=1e-3, abs=1e-7)


def test_ippo_scores_the_corrected_loss(make_cfg, tmp_path, offset_vllm):
    """A uniform weight c = min(e^0.4, 1.2) = 1.2 scales every episode's loss, hence its influence score, by c."""
    base, run = tmp_path / "none", tmp_path / "tis"
    train(make_cfg(*VLLM, "ppo.advantage=rloo", run_dir=base))
    train(make_cfg(*VLLM, "ppo.advantage=rloo", "ppo.is_correction=tis", "ppo.is_cap=1.2", run_dir=run))
    s0 = torch.tensor([r["score"] for r in _jsonl(base / "influence.jsonl")], dtype=torch.float64)
    s1 = torch.tensor([r["score"] for r in _jsonl(run / "influence.jsonl")], dtype=torch.float64)
    assert s0.abs().max() > 0
    torch.testing.assert_close(s1, 1.2 * s0, rtol=1e-3, atol=1e-4 * float(s0.abs().max()))


def test_in_update_takes_the_corrected_loss_like_before_update(make_cfg, tmp_path, tiny_model_dir, offset_vllm):
    """Per-sequence weights (e^(0.4 len) capped at 2: they differ between episodes) inside the update's backward
    give the separate pass's scores, selection and update at theta_old."""
    common = (*VLLM, "ppo.advantage=rloo", "ppo.is_correction=tis", "ppo.is_level=sequence", "ppo.is_cap=2")
    runs = {t: tmp_path / t for t in ("before_update", "in_update")}
    for timing, run in runs.items():
        assert train(make_cfg(*common, f"influence.timing={timing}", run_dir=run))["stopped"] is None
    _same_selection_and_update(runs["before_update"], runs["in_update"], tiny_model_dir)


# --------------------------------------------------------------------------------- dynamic sampling


def test_round_prompts_and_choose_groups():
    assert ds.round_prompts(48, 4, 0, 3, 0) == iteration_prompts(48, 4, 0, 3)
    r1, r2 = ds.round_prompts(48, 4, 0, 3, 1), ds.round_prompts(48, 4, 0, 3, 2)
    assert r1 == ds.round_prompts(48, 4, 0, 3, 1) and r1 != r2 and len(set(r1)) == 4
    assert ds.round_prompts(48, 4, 1, 3, 1) != r1 and ds.round_prompts(3, 4, 0, 0, 1) != []  # few rows: repeats
    v = [torch.tensor([True, False, False, True]), torch.tensor([False, True, True, True])]
    assert ds.choose_groups(v, 4) == ([(0, 0), (0, 3), (1, 1), (1, 2)], 0)
    # not enough informative groups: the earliest zero-variance ones top the batch up
    v = [torch.tensor([False, True, False, False]), torch.tensor([False, False, True, False])]
    assert ds.choose_groups(v, 4) == ([(0, 0), (0, 1), (0, 2), (1, 2)], 2)


DYN = ["ppo.advantage=grpo", "rollout.dynamic_sampling=true", "influence.on_empty=skip"]


def _groups(run, it):
    recs = [r for r in _jsonl(run / "influence.jsonl") if r["iteration"] == it]
    return [recs[g * 4:(g + 1) * 4] for g in range(4)]


def test_dynamic_sampling_keeps_informative_groups(make_cfg, tmp_path):
    run = tmp_path / "dyn"
    train(make_cfg(*DYN, "iterations=3", "rollout.max_sample_rounds=8", "influence.enabled=false", run_dir=run))
    m = _jsonl(run / "metrics.jsonl")
    for it, r in enumerate(m):
        zero = [g for g in _groups(run, it) if len({e["reward"] for e in g}) == 1]
        assert r["groups_padded"] == len(zero) and r["episodes"] == 16
        assert r["groups_discarded"] == 4 * (r["sample_rounds"] - 1)
        assert r["groups_padded"] == 0 or r["sample_rounds"] == 8
    assert any(r["sample_rounds"] > 1 for r in m)  # the test exercised extra rounds
    assert sum(r["groups_padded"] for r in m) < sum(r["groups_discarded"] for r in m)


def test_dynamic_sampling_pads_with_the_earliest_groups_when_rounds_run_out(make_cfg, tmp_path):
    """Every reward 1: no group ever varies. After max_sample_rounds the batch is round 0's groups, i.e. the
    iteration's ordinary rollout (as without dynamic sampling)."""
    const = "reward.fn=tests.rl.toy_rewards:constant"
    dyn, plain = tmp_path / "dyn", tmp_path / "plain"
    train(make_cfg(*DYN, const, "iterations=1", "rollout.max_sample_rounds=3", "influence.enabled=false", run_dir=dyn))
    train(make_cfg("ppo.advantage=grpo", const, "iterations=1", "influence.enabled=false", run_dir=plain))
    (r,) = _jsonl(dyn / "metrics.jsonl")
    assert (r["sample_rounds"], r["groups_discarded"], r["groups_padded"]) == (3, 8, 4)
    assert [e["response"] for e in _jsonl(dyn / "influence.jsonl")] == [
        e["response"] for e in _jsonl(plain / "influence.jsonl")]


def test_dynamic_sampling_with_ippo_scores_informative_groups_and_resumes(make_cfg, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = (*DYN, "rollout.max_sample_rounds=8", "checkpoint.keep_last=3")
    train(make_cfg(*common, "iterations=2", run_dir=whole))
    for it in range(2):
        for g in _groups(whole, it):
            varies = len({e["reward"] for e in g}) > 1
            assert varies or not any(e["kept"] for e in g)  # a padded group scores 0: never kept
    train(make_cfg(*common, "iterations=1", run_dir=part))
    train(make_cfg(*common, "iterations=2", "resume=true", run_dir=part))
    a = load_file(str(latest_checkpoint(whole) / "policy.safetensors"))
    b = load_file(str(latest_checkpoint(part) / "policy.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["response"] for e in _jsonl(whole / "influence.jsonl")] == [
        e["response"] for e in _jsonl(part / "influence.jsonl")]
    assert [r["sample_rounds"] for r in _jsonl(whole / "metrics.jsonl")] == [
        r["sample_rounds"] for r in _jsonl(part / "metrics.jsonl")]


# ---------------------------------------------------------------------------- max-variance control


def test_max_variance_subset_hand_cases():
    r = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1])
    assert filters.max_variance_subset(r, 4).nonzero().flatten().tolist() == [1, 2, 6, 7]  # two 0s, two 1s
    r = torch.tensor([0.1, 0.5, 0.9, 0.2])
    assert filters.max_variance_subset(r, 2).nonzero().flatten().tolist() == [0, 2]
    # m = 3: {0.1, 0.2, 0.9} (variance 0.38 / 3) beats {0.1, 0.5, 0.9} (0.32 / 3)
    assert filters.max_variance_subset(r, 3).nonzero().flatten().tolist() == [0, 2, 3]
    assert filters.max_variance_subset(r, 0).sum() == 0 and filters.max_variance_subset(r, 4).all()
    assert filters.max_variance_subset(torch.ones(4), 2).nonzero().flatten().tolist() == [0, 1]
    # brute force over every subset of random rewards
    from itertools import combinations
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randint(0, 4, (6,), generator=g).float()
        for m in range(1, 6):
            best = max(float(x[list(c)].var(unbiased=False)) for c in combinations(range(6), m))
            assert float(x[filters.max_variance_subset(x, m)].var(unbiased=False)) == pytest.approx(best)


def test_spread_budget_and_matched_counts():
    assert filters.spread_budget(7, [2, 0], [1, 3], 4) == {2: 4, 0: 3}
    assert filters.spread_budget(10, [2, 0], [1, 3], 4) == {2: 4, 0: 4, 1: 1, 3: 1}
    assert filters.spread_budget(0, [2], [1], 4) == {}
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0])  # groups of 4: varies, uniform, varies
    w_in = [0.5, 1.0, 1.5, 2.0, 2.5]
    keep, w = filters.max_variance_matched(5, rewards, 4, w_in, seed=0, iteration=2)
    assert int(keep.sum()) == 5 and not keep[4:8].any()  # the budget goes to the groups that vary
    assert sorted(w[keep].tolist()) == w_in and (w[~keep] == 0).all()
    for grp in (0, 2):  # each varying group keeps a max-variance subset of its size
        k = keep[grp * 4:(grp + 1) * 4]
        sub = rewards[grp * 4:(grp + 1) * 4]
        assert float(sub[k].var(unbiased=False)) == pytest.approx(
            float(sub[filters.max_variance_subset(sub, int(k.sum()))].var(unbiased=False)))
    again = filters.max_variance_matched(5, rewards, 4, w_in, seed=0, iteration=2)
    assert torch.equal(again[0], keep) and torch.equal(again[1], w)
    keep_all, _ = filters.max_variance_matched(10, rewards, 4, None, seed=0, iteration=2)
    assert keep_all[:4].all() and keep_all[8:].all() and int(keep_all[4:8].sum()) == 2
    with pytest.raises(ValueError, match="cannot keep 13 of 12"):
        filters.max_variance_matched(13, rewards, 4, None, 0, 0)


@pytest.fixture(scope="module")
def ippo_grpo_run(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("mv") / "ippo"
    n = torch.get_num_threads()
    train(load_config(None, fast_overrides(tiny_model_dir, run) + ["ppo.advantage=grpo", "influence.on_empty=skip"]))
    torch.set_num_threads(n)
    return run


@pytest.mark.parametrize("weights", ["matched", "uniform"])
def test_max_variance_control_in_the_trainer(make_cfg, ippo_grpo_run, tmp_path, weights):
    run = tmp_path / "mv"
    train(make_cfg("ppo.advantage=grpo", "influence.enabled=false", "control.filter=max_variance",
                   f"control.match_run={ippo_grpo_run}", f"control.weights={weights}", "influence.on_empty=skip",
                   run_dir=run))
    ip, mv = _jsonl(ippo_grpo_run / "influence.jsonl"), _jsonl(run / "influence.jsonl")
    for it in range(2):
        a = [r for r in ip if r["iteration"] == it]
        b = [r for r in mv if r["iteration"] == it]
        assert sum(r["kept"] for r in a) == sum(r["kept"] for r in b)
        if weights == "matched":
            assert sorted(r["weight"] for r in a if r["kept"]) == pytest.approx(
                sorted(r["weight"] for r in b if r["kept"]))
        else:
            assert all(r["weight"] == float(r["kept"]) for r in b)
        for g in range(4):  # each prompt keeps a max-variance subset of the size it was given
            rw = torch.tensor([r["reward"] for r in b[g * 4:(g + 1) * 4]])
            k = torch.tensor([r["kept"] for r in b[g * 4:(g + 1) * 4]])
            best = rw[filters.max_variance_subset(rw, int(k.sum()))]
            assert not k.any() or float(rw[k].var(unbiased=False)) == pytest.approx(float(best.var(unbiased=False)))
