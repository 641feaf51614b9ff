"""A non-finite loss or gradient norm skips the optimizer step and, repeated, stops the run (issue 15, item 3)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import ippo.rl.advantages as advantages_module  # the estimators call gae() there
from ippo.rl.loop import train


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _ckpt(run, name):
    d = run / "checkpoints" / name
    return load_file(str(d / "policy.safetensors")), json.loads((d / "state.json").read_text())


@pytest.fixture
def nan_advantages_from(monkeypatch):
    """Advantages turn NaN from iteration ``first`` on (so every loss that uses them is NaN)."""
    def install(first: int, fn: str):
        real, calls = getattr(advantages_module, fn), []

        def poisoned(*args, **kwargs):
            adv, returns = real(*args, **kwargs)
            calls.append(1)
            return (adv * float("nan") if len(calls) > first else adv), returns

        monkeypatch.setattr(advantages_module, fn, poisoned)
    return install


def test_ppo_skips_nonfinite_steps_then_stops_keeping_the_last_good_checkpoint(make_cfg, tmp_path, nan_advantages_from):
    nan_advantages_from(1, "gae")  # iteration 0 trains normally; iteration 1's losses are all NaN
    run = tmp_path / "ppo"
    summary = train(make_cfg("influence.enabled=false", "iterations=4", "checkpoint.keep_last=1", run_dir=run))
    assert summary["iterations_done"] == 2
    assert "3 optimizer steps in a row had a non-finite loss" in summary["stopped"]
    assert "\n" not in summary["stopped"]
    m = _jsonl(run / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in m] == [0, 3] and m[0]["updates"] == 4 and m[1]["updates"] == 0
    assert "non-finite" in m[1]["stop_reason"] and "stop_reason" not in m[0]
    good, good_state = _ckpt(run, "iter_000001")  # kept although keep_last=1: the last good checkpoint stays
    final, final_state = _ckpt(run, "iter_000002")
    assert final_state["stopped"] == summary["stopped"] and good_state["stopped"] is None
    for k in good:  # skipped steps change nothing: the weights are those of the last finite step
        assert torch.isfinite(final[k]).all() and torch.equal(good[k], final[k]), k
    # resuming a stopped run does nothing more
    assert train(make_cfg("influence.enabled=false", "iterations=4", "resume=true", run_dir=run))["iterations_done"] == 2


def test_nonfinite_streak_spans_iterations_and_resumes(make_cfg, tmp_path, nan_advantages_from):
    """The count is of skipped steps in a row (a finite step resets it), carried across iterations and
    through a checkpoint: 4 skipped in iteration 1, the 5th (first of iteration 2, after a resume) stops."""
    nan_advantages_from(1, "gae")
    run = tmp_path / "streak"
    common = ("influence.enabled=false", "ppo.max_nonfinite_steps=5")
    assert train(make_cfg(*common, "iterations=2", run_dir=run))["stopped"] is None
    _, state = _ckpt(run, "iter_000002")
    assert state["nonfinite_streak"] == 4
    summary = train(make_cfg(*common, "iterations=4", "resume=true", run_dir=run))
    assert summary["iterations_done"] == 3 and "5 optimizer steps in a row" in summary["stopped"]
    assert [r["nonfinite_steps"] for r in _jsonl(run / "metrics.jsonl")] == [0, 4, 1]


@pytest.mark.parametrize("timing", ["before_update", "in_update"])
def test_ippo_stops_cleanly_on_nonfinite_scoring(make_cfg, tmp_path, nan_advantages_from, timing):
    """I-PPO used to die with a raw ValueError; now the run stops with a one-line reason and no update."""
    nan_advantages_from(1, "gae")
    run = tmp_path / timing
    summary = train(make_cfg(f"influence.timing={timing}", "iterations=3", run_dir=run))
    assert summary["iterations_done"] == 2 and "non-finite" in summary["stopped"] and "diverged" in summary["stopped"]
    m = _jsonl(run / "metrics.jsonl")
    assert m[1]["stop_reason"] == summary["stopped"] and m[1]["kept"] == 0
    assert m[1]["updates"] == 0
    _, state = _ckpt(run, "iter_000002")
    assert state["stopped"] == summary["stopped"]


def test_max_nonfinite_steps_is_validated(make_cfg):
    from ippo.rl.config import ConfigError

    assert make_cfg().ppo.max_nonfinite_steps == 3
    assert make_cfg("ppo.max_nonfinite_steps=1").ppo.max_nonfinite_steps == 1
    with pytest.raises(ConfigError, match="ppo.max_nonfinite_steps=0: must be > 0"):
        make_cfg("ppo.max_nonfinite_steps=0")
