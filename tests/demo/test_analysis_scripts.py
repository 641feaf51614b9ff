"""scripts/early_stop_analysis.py and scripts/regimes_table.py on small hand-made run folders."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def early_stop():
    return _load("early_stop_analysis")


@pytest.fixture(scope="module")
def regimes():
    return _load("regimes_table")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stop_iteration_counts_a_streak_below_the_threshold(early_stop):
    kept = [0.7, 0.4, 0.3, 0.6, 0.2, 0.1, 0.45, 0.9]
    assert early_stop.stop_iteration(kept, 0.5, 2) == 2  # 0.4, 0.3
    assert early_stop.stop_iteration(kept, 0.5, 3) == 6  # 0.2, 0.1, 0.45 (the 0.6 broke the first streak)
    assert early_stop.stop_iteration(kept, 0.5, 4) is None
    assert early_stop.stop_iteration(kept, 0.05, 1) is None


def test_early_stop_analysis_reads_accuracy_and_seconds_at_the_stop(early_stop, tmp_path):
    kept = [0.8, 0.8, 0.3, 0.3, 0.3, 0.8]
    _write_jsonl(tmp_path / "ippo" / "seed0" / "metrics.jsonl",
                 [{"kept_frac": k, "time_cumulative": float(i + 1)} for i, k in enumerate(kept)])
    _write_jsonl(tmp_path / "ippo" / "seed0" / "eval.jsonl",
                 [{"iteration": i, "test_acc": a} for i, a in ((1, 0.5), (3, 0.7), (5, 0.9))])
    _write_jsonl(tmp_path / "ppo" / "seed0" / "eval.jsonl",
                 [{"iteration": i, "test_acc": a} for i, a in ((1, 0.4), (3, 0.6), (5, 0.8))])
    result = early_stop.analyse(tmp_path, "ippo")
    rule = next(r for r in result["rules"] if (r["stop_kept_frac"], r["stop_patience"]) == (0.4, 2))
    seed = rule["seeds"][0]
    assert seed["stop_iteration"] == 3 and seed["iterations_run"] == 4
    assert seed["acc_at_stop"] == 0.7  # the evaluation after iteration 3 (index) is at or before the stop
    assert seed["ppo_best_within"] == 0.6
    assert seed["ippo_final"] == 0.9
    assert seed["seconds_saved_frac"] == pytest.approx(1 - 4 / 6)
    never = next(r for r in result["rules"] if (r["stop_kept_frac"], r["stop_patience"]) == (0.3, 2))
    assert never["stopped"] == 0 and never["mean_seconds_saved"] == 0.0


def _run(seed: int, final: float, curve: float, reach: float | None) -> dict:
    return {"seed": seed, "final_acc": final, "curve_mean_acc": curve, "sec_per_iter": 3.0, "mean_kept_frac": 1.0,
            "seconds_to_ppo_final": reach}


def test_regimes_table_pairs_methods_by_seed_and_tests_the_difference(regimes):
    runs = {
        "ppo": [_run(s, 0.90, 0.80, 30.0) for s in range(3)],
        "ppo_sft": [_run(s, 0.95, 0.85 + 0.01 * s, 20.0) for s in range(3)],
        "ippo_in_update": [_run(s, 0.96, 0.90 + 0.01 * s + 0.001 * s * s, None if s == 2 else 25.0)
                           for s in (2, 0, 1)],  # out of order: pairing is by seed, not position
    }
    rows = regimes.regime_rows({"runs": runs})
    vs = rows["ippo_in_update"]["vs"]["ppo_sft"]["curve_mean_acc"]
    diffs = [0.05, 0.051, 0.054]  # I-PPO - PPO + SFT, seeds 0, 1, 2
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    assert vs["mean"] == pytest.approx(mean) and vs["se"] == pytest.approx(se) and vs["n"] == 3
    assert vs["t"] == pytest.approx(mean / se) and vs["t_crit"] == pytest.approx(4.303)
    assert vs["real"] is True
    assert rows["ippo_in_update"]["reached_ppo_final"] == "2/3"
    final_vs_ppo = rows["ippo_in_update"]["vs"]["ppo"]["final_acc"]
    assert final_vs_ppo["mean"] == pytest.approx(0.06) and final_vs_ppo["se"] == pytest.approx(0.0, abs=1e-12)
    assert "ppo_sft" not in rows["ppo_sft"]["vs"]


def test_regimes_table_leaves_out_missing_regimes_and_refuses_none(regimes, tmp_path):
    with pytest.raises(SystemExit, match="no regime summaries"):
        regimes.main([str(tmp_path), "--out", str(tmp_path / "out")])
