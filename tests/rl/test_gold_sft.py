"""control.sft_coef: PPO + λ x SFT on exactly the gold validation solutions I-PPO's target uses."""

from __future__ import annotations

import json

import pytest
import torch

from ippo.rl.components import build
from ippo.rl.config import ConfigError
from ippo.rl.data import iteration_val_indices
from ippo.rl.gold_sft import GoldSFT
from ippo.rl.loop import train
from ippo.rl.losses import sft_loss_sum
from ippo.rl.models import causal_lm_logits


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_gradient_is_lambda_times_the_sft_gradient_on_the_target_draw(make_cfg):
    """GoldSFT's gradient equals λ x the token-mean SFT loss gradient over I-PPO's validation draw of the
    iteration, written out independently (one example at a time)."""
    cfg = make_cfg("influence.n_val=5", "influence.val_batch=2", "control.sft_coef=0.7")
    c = build(cfg)
    assert isinstance(c.gold_sft, GoldSFT)
    policy, fmt, val = c.policy, c.data.fmt, c.data.val
    it = 3
    draw = iteration_val_indices(len(val), cfg.influence.n_val, cfg.seed, it)
    assert len(draw) == 5
    policy.zero_grad(set_to_none=True)
    loss, finite = c.gold_sft.backward(it)
    got = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert finite and got

    policy.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for i in draw:
        s, lab = fmt.sft_ids(val[i].question, val[i].solution)
        ls, n = sft_loss_sum(causal_lm_logits(policy, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)),
                             torch.tensor([lab]))
        total, count = total + ls, count + n
    (0.7 * total / count).backward()
    assert loss == pytest.approx(float(total.detach() / count), rel=1e-5)
    for n, p in policy.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)


def test_ppo_plus_sft_trains_on_the_gold_data(make_cfg, tmp_path):
    """The SFT loss is logged and falls under a large λ; the run differs from plain PPO only by that term."""
    base = ("influence.enabled=false", "iterations=4", "ppo.lr=3e-3")
    sft, ppo = tmp_path / "sft", tmp_path / "ppo"
    train(make_cfg(*base, "control.sft_coef=5.0", run_dir=sft))
    train(make_cfg(*base, run_dir=ppo))
    ms, mp = _jsonl(sft / "metrics.jsonl"), _jsonl(ppo / "metrics.jsonl")
    assert all("sft_loss" in r for r in ms) and all("sft_loss" not in r for r in mp)
    assert ms[-1]["sft_loss"] < ms[0]["sft_loss"]
    assert ms[0]["reward"] == mp[0]["reward"]  # same rollouts before the first update
    assert ms[-1]["pg_loss"] != mp[-1]["pg_loss"]


def test_works_with_influence(make_cfg, tmp_path):
    run = tmp_path / "ippo_sft"
    assert train(make_cfg("control.sft_coef=0.5", run_dir=run))["iterations_done"] == 2
    assert all("sft_loss" in r and "score_mean" in r for r in _jsonl(run / "metrics.jsonl"))


@pytest.mark.parametrize("bad,match", [("control.sft_coef=-1", "control.sft_coef=-1.0: must be a finite number"),
                                       ("control.sft_coef=.inf", "control.sft_coef=inf: must be a finite number")])
def test_config_errors(make_cfg, bad, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(bad)


def test_needs_gold_solutions(make_cfg):
    with pytest.raises(ConfigError, match="control.sft_coef trains on the gold validation solutions"):
        make_cfg("influence.enabled=false", "control.sft_coef=1", "data.val_holdout=0")
