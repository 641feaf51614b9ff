"""Old log-probs of epoch 0's first mini-batch come from the update's own forward (at theta_old)."""

import json

import pytest
import torch

from ippo.rl import components, loop
from ippo.rl.loop import train


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _count_no_grad_policy_forwards(monkeypatch):
    """Rows of the policy forwards run without grad outside generate (the separate old-log-prob pass)."""
    rows = []
    real = loop.response_logits  # the no-grad pass runs in the loop's own phase

    def counting(model, ids, *a, **k):
        if not torch.is_grad_enabled() and model is policy_ref[0]:
            rows.append(ids.shape[0])
        return real(model, ids, *a, **k)

    policy_ref = [None]
    real_load = components.load_policy

    def load_policy(*a, **k):
        policy_ref[0] = real_load(*a, **k)
        return policy_ref[0]

    monkeypatch.setattr(loop, "response_logits", counting)
    monkeypatch.setattr(components, "load_policy", load_policy)
    return rows


@pytest.mark.parametrize("mini_batch,expected_rows", [(16, 0), (8, 8 * 2)])
def test_first_minibatch_skips_the_old_logprob_forward(make_cfg, tmp_path, monkeypatch, mini_batch, expected_rows):
    """One epoch on one mini-batch of 16: no separate old-log-prob forward at all, and the ratio is
    exactly 1 (clipfrac and approx_kl 0). Mini-batches of 8: only the other 8 episodes are forwarded."""
    rows = _count_no_grad_policy_forwards(monkeypatch)
    run = tmp_path / "ppo"
    assert train(make_cfg("influence.enabled=false", "ppo.epochs=1", f"ppo.mini_batch_size={mini_batch}",
                          f"ppo.micro_batch_size={mini_batch}", run_dir=run))["stopped"] is None
    assert sum(rows) == expected_rows  # 2 iterations
    if mini_batch == 16:
        assert all(r["approx_kl"] == 0.0 and r["clipfrac"] == 0.0 for r in _jsonl(run / "metrics.jsonl"))


def test_old_logprobs_from_the_update_equal_the_scoring_pass(make_cfg, tmp_path):
    """PPO (old log-probs from the update's forward) and I-PPO keeping every episode with weight 1
    (old log-probs from its scoring pass) make the same update: same KL to the reference, losses and
    rewards in the second iteration, whose rollouts come from the updated policies."""
    common = ("ppo.epochs=1", "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "ppo.kl_coef=0.1")
    runs = {"ppo": tmp_path / "ppo", "ippo": tmp_path / "ippo"}
    train(make_cfg(*common, "influence.enabled=false", run_dir=runs["ppo"]))
    train(make_cfg(*common, "influence.filter=bottom_fraction", "influence.fraction=0.0", "influence.reweight=false",
                   run_dir=runs["ippo"]))
    ppo, ippo = (_jsonl(runs[k] / "metrics.jsonl") for k in ("ppo", "ippo"))
    assert ippo[1]["kept"] == 16
    assert ppo[1]["kl_ref"] > 0
    for key in ("reward", "kl_ref", "pg_loss", "kl_loss", "vf_loss", "response_len"):
        assert ppo[1][key] == pytest.approx(ippo[1][key], rel=1e-4, abs=1e-7), key
