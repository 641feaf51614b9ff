"""influence.stop_kept_frac / stop_patience: the practical early stop, on a synthetic kept-fraction sequence."""

from __future__ import annotations

import json

import pytest
import torch

from ippo.rl import filters
from ippo.rl.config import ConfigError
from ippo.rl.loop import train

# kept episodes per iteration (of 16): fractions .75 .25 .75 .25 .25 .25 ...; with f = 0.5, k = 3 the streak is
# 0 1 0 1 2 3 -> the run stops after iteration 5 (which still trains)
KEPT = [12, 4, 12, 4, 4, 4, 12, 12, 12, 12]
STOP = ("influence.stop_kept_frac=0.5", "influence.stop_patience=3")


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def scripted_kept(monkeypatch):
    """The influence filter keeps KEPT[it] episodes in iteration it (the first ones, weight 1)."""
    state = {"it": 0}

    def select(scores, ic):
        n = KEPT[state["it"]]
        state["it"] += 1
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[:n] = True
        return filters.IterationSelection(keep, keep.to(scores.dtype), n, len(scores) - n, 1.0)

    monkeypatch.setattr(filters, "select_and_weight", select)
    return state


def test_stops_after_patience_iterations_below_the_fraction(make_cfg, tmp_path, scripted_kept):
    run = tmp_path / "run"
    out = train(make_cfg(*STOP, "iterations=10", run_dir=run))
    assert out["iterations_done"] == 6
    assert "kept fraction below influence.stop_kept_frac=0.5 for 3 iterations in a row" in out["stopped"]
    m = _jsonl(run / "metrics.jsonl")
    assert [r["kept"] for r in m] == KEPT[:6]
    assert [r["low_kept_streak"] for r in m] == [0, 1, 0, 1, 2, 3]
    assert m[5]["updates"] > 0 and m[5]["early_stop"] is True  # the iteration that completes the streak trains
    assert [r.get("stop_reason") is not None for r in m] == [False] * 5 + [True]
    state = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "state.json").read_text())
    assert state["stopped"] == out["stopped"] and state["low_kept_streak"] == 3
    # a stopped run stays stopped on resume
    assert train(make_cfg(*STOP, "iterations=10", "resume=true", run_dir=run))["iterations_done"] == 6


def test_off_by_default_and_never_for_a_full_buffer(make_cfg, tmp_path, scripted_kept):
    run = tmp_path / "off"
    assert train(make_cfg("iterations=6", run_dir=run))["stopped"] is None
    assert all("low_kept_streak" not in r for r in _jsonl(run / "metrics.jsonl"))


def test_resume_just_before_the_stop_stops_where_the_uninterrupted_run_does(make_cfg, tmp_path, scripted_kept):
    """Killed right after the checkpoint of iteration 4 (streak 2 of 3): the resumed run carries the streak and
    stops after iteration 5, with the same metrics as the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = train(make_cfg(*STOP, "iterations=10", run_dir=full))
    scripted_kept["it"] = 0
    assert train(make_cfg(*STOP, "iterations=5", run_dir=cut))["stopped"] is None
    state = json.loads((cut / "checkpoints" / "iter_000005" / "state.json").read_text())
    assert state["low_kept_streak"] == 2
    scripted_kept["it"] = 5  # the filter's script continues where the run does
    out = train(make_cfg(*STOP, "iterations=10", "resume=true", run_dir=cut))
    assert out["iterations_done"] == ref["iterations_done"] == 6
    assert out["stopped"] == ref["stopped"]

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]

    assert strip(_jsonl(cut / "metrics.jsonl")) == strip(_jsonl(full / "metrics.jsonl"))


@pytest.mark.parametrize("bad,match", [("influence.stop_kept_frac=1.5", "stop_kept_frac=1.5: must be in"),
                                       ("influence.stop_kept_frac=-0.1", "stop_kept_frac=-0.1: must be in"),
                                       ("influence.stop_patience=0", "stop_patience=0: must be >= 1")])
def test_config_errors(make_cfg, bad, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(bad)
