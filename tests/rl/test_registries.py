"""Advantage estimators and episode filters are registries: a new one is one registered function, which the
config accepts by name and the trainer runs, with I-PPO on or off."""

from __future__ import annotations

import json

import pytest
import torch

from ippo.rl import advantages, filters
from ippo.rl.config import ConfigError
from ippo.rl.loop import train


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def registered():
    """Whatever a test registers is removed afterwards, so nothing leaks into other tests."""
    tables = (advantages.ADVANTAGE_ESTIMATORS, filters.EPISODE_FILTERS, filters.CONFIG_CHECKS)
    before = [set(t) for t in tables]
    yield
    for table, keys in zip(tables, before):
        for name in set(table) - keys:
            del table[name]


def test_builtin_registries():
    assert {"gae", "grpo"} <= set(advantages.ADVANTAGE_ESTIMATORS)
    assert advantages.ADVANTAGE_ESTIMATORS["gae"].needs_critic and not advantages.ADVANTAGE_ESTIMATORS["grpo"].needs_critic
    assert {"influence", "none", "zero_variance", "random"} <= set(filters.EPISODE_FILTERS)
    assert "influence" not in filters.control_names()


def test_registering_twice_is_an_error(registered):
    with pytest.raises(ValueError, match="already registered"):
        advantages.register_advantage("grpo")(lambda inp: (inp.rewards, None))
    with pytest.raises(ValueError, match="already registered"):
        filters.register_filter("random")(lambda inp: None)


@pytest.mark.parametrize("influence", [True, False])
def test_a_registered_estimator_runs_in_the_trainer(registered, make_cfg, tmp_path, influence):
    """A leave-one-out baseline written as one function: the config accepts it, the trainer calls it every
    iteration on this rank's episodes, and I-PPO scores the losses built from its advantages."""
    calls = []

    @advantages.register_advantage("loo_test")
    def loo(inp: advantages.AdvantageInputs):
        calls.append(inp.rewards.shape[0])
        r = inp.rewards.view(-1, inp.samples_per_prompt).to(inp.mask.device)
        baseline = (r.sum(1, keepdim=True) - r) / (inp.samples_per_prompt - 1)
        return (r - baseline).reshape(-1, 1) * inp.mask, None

    run = tmp_path / "loo"
    out = train(make_cfg("ppo.advantage=loo_test", f"influence.enabled={str(influence).lower()}", run_dir=run))
    assert out["iterations_done"] == 2 and calls == [16, 16]
    m = _jsonl(run / "metrics.jsonl")
    assert all(r["updates"] > 0 or r["kept"] == 0 for r in m)
    assert ("score_mean" in m[0]) == influence
    with pytest.raises(ConfigError, match="ppo.advantage='nope': expected one of gae | grpo | loo_test"):
        make_cfg("ppo.advantage=nope")


def test_a_registered_filter_runs_as_a_control(registered, make_cfg, tmp_path):
    """``control.filter=<name>`` picks a registered filter; its config check runs at load time."""
    seen = []

    def needs_even_samples(cfg):
        if cfg.rollout.samples_per_prompt % 2:
            raise ConfigError("control.filter=first_half needs an even rollout.samples_per_prompt")

    @filters.register_filter("first_half", check=needs_even_samples)
    def first_half(inp: filters.FilterInputs) -> filters.Filtered:
        seen.append(inp.iteration)
        keep = torch.zeros(inp.E, dtype=torch.bool)
        keep[: inp.E // 2] = True
        return filters.Filtered(keep, keep.float())

    run = tmp_path / "half"
    train(make_cfg("influence.enabled=false", "control.filter=first_half", run_dir=run))
    assert seen == [0, 1]
    assert [r["kept"] for r in _jsonl(run / "metrics.jsonl")] == [8, 8]
    kept = [r["episode"] for r in _jsonl(run / "influence.jsonl") if r["kept"] and r["iteration"] == 0]
    assert kept == list(range(8))
    with pytest.raises(ConfigError, match="needs an even"):
        make_cfg("influence.enabled=false", "control.filter=first_half", "rollout.samples_per_prompt=3")
