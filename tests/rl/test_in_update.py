"""influence.timing=in_update: scoring, selection and reweighting inside the update's own backward."""

import json

import pytest
import torch
from safetensors.torch import load_file

import ippo
from ippo.rl.config import ConfigError
from ippo.rl.loop import train


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _weights(run_dir):
    root = run_dir / "checkpoints"
    return load_file(str(root / (root / "latest").read_text() / "policy.safetensors"))


@pytest.mark.parametrize("epochs,episode_loss", [(1, "pg"), (2, "pg"), (2, "policy")])
def test_in_update_equals_separate_pass_at_theta_old(make_cfg, tmp_path, tiny_model_dir, epochs, episode_loss):
    """One mini-batch = the whole buffer: the in-backward scores are taken at theta_old, so scores,
    keep mask and the resulting update equal the paper's separate scoring pass; later epochs reuse
    the first epoch's selection exactly as before_update reuses its own (with episode_loss=policy,
    the KL and entropy terms weighted along, in both timings; with episode_loss=pg they are an
    unweighted stream, which in_update applies to dropped episodes too, so they are off there)."""
    common = ("iterations=1", f"ppo.epochs={epochs}", "ppo.mini_batch_size=16", "ppo.micro_batch_size=16",
              f"influence.episode_loss={episode_loss}")
    if episode_loss == "policy":
        common += ("ppo.kl_coef=0.05", "ppo.entropy_coef=0.01")
    runs = {}
    for timing in ("before_update", "in_update"):
        runs[timing] = tmp_path / timing
        assert train(make_cfg(*common, f"influence.timing={timing}", run_dir=runs[timing]))["stopped"] is None
    before, inside = (_jsonl(runs[t] / "influence.jsonl") for t in ("before_update", "in_update"))
    s_b = torch.tensor([r["score"] for r in before], dtype=torch.float64)
    s_i = torch.tensor([r["score"] for r in inside], dtype=torch.float64)
    assert float((s_b - s_i).norm() / s_b.norm()) < 1e-4
    assert [r["kept"] for r in before] == [r["kept"] for r in inside]
    assert 0 < sum(r["kept"] for r in inside) < 16
    # Same update: AdamW turns fp32-level gradient differences on near-zero gradients into visible
    # steps, so compare the two updates relative to their size (a wrong weighting differs at O(1)).
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    w_b, w_i = _weights(runs["before_update"]), _weights(runs["in_update"])
    for name, w in w_b.items():
        step = w - w0[name if name in w0 else f"model.{name}"]
        assert float((w_i[name] - w).norm()) <= 1e-2 * float(step.norm()), name


def test_in_update_trains_end_to_end(make_cfg, tmp_path):
    run = tmp_path / "iu"
    assert train(make_cfg("influence.timing=in_update", "influence.mode=target", "influence.rank=4",
                          run_dir=run))["stopped"] is None
    m = _jsonl(run / "metrics.jsonl")
    # epoch 0: every episode's two mini-batches; epoch 1: the kept episodes only (as before_update)
    assert len(m) == 2 and all(r["updates"] == 2 + -(-r["kept"] // 8) for r in m)
    assert all("score_mean" in r and 0 <= r["kept_frac"] <= 1 for r in m)
    assert "time_scoring" not in m[0]  # no separate scoring pass


def test_in_update_scores_in_the_first_epoch_only(make_cfg, tmp_path, monkeypatch):
    """Later epochs reuse the first epoch's selection: weighted_backward runs once per micro-batch of
    epoch 0 and never after."""
    calls = []
    real = ippo.InfluenceEngine.weighted_backward
    monkeypatch.setattr(ippo.InfluenceEngine, "weighted_backward",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert train(make_cfg("iterations=1", "ppo.epochs=3", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
                          "influence.timing=in_update", run_dir=tmp_path / "iu"))["stopped"] is None
    assert len(calls) == 16 // 4  # epoch 0's four micro-batches


@pytest.mark.parametrize("episode_loss,backwards", [("pg", 4), ("policy", 0)])
def test_in_update_policy_episode_loss_needs_one_backward(make_cfg, tmp_path, monkeypatch, episode_loss, backwards):
    """With KL as a loss term, episode_loss=pg needs a second, unweighted backward through the policy
    per micro-batch (the KL stream); episode_loss=policy weights it along and needs none (GRPO: no
    critic, so no value stream either)."""
    calls = []
    real = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert train(make_cfg("iterations=1", "ppo.epochs=1", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
                          "ppo.advantage=grpo", "ppo.kl_coef=0.05", "influence.timing=in_update",
                          f"influence.episode_loss={episode_loss}", run_dir=tmp_path / "iu"))["stopped"] is None
    assert len(calls) == backwards


def test_in_update_rejects_sketch_mode(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="in_update"):
        make_cfg("influence.timing=in_update", "influence.mode=sketch")
