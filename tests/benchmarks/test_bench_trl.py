"""``benchmarks/bench_trl.py --smoke``: ippo's rows are timed, the JSON is well-formed, and each TRL row is either
timed (that TRL is installed) or skipped with a reason (CI installs no TRL). Timings are not checked."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch


def finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_trl_smoke(tmp_path):
    pytest.importorskip("ippo.rl.loop")
    from benchmarks import bench_trl

    threads = torch.get_num_threads()
    try:
        res = bench_trl.main(["--smoke", "--no-plots", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main sets torch's thread count for this process
    path = tmp_path / "trl_smoke.json"
    assert path.is_file(), list(tmp_path.iterdir())
    on_disk = json.loads(path.read_text())
    assert on_disk["benchmark"] == "trl" and on_disk["mode"] == "smoke"
    for key in ("device", "torch", "transformers", "threads", "load_avg", "git_commit", "date"):
        assert key in on_disk["env"], key
    assert on_disk["wall_s"] > 0 and on_disk["settings"]["params"] > 0
    assert {r["key"] for r in on_disk["rows"]} == {r["key"] for r in res["rows"]}
    rows = {r["key"]: r for r in on_disk["rows"]}

    # ippo and the floors: always timed
    ippo_keys = ("ippo-ppo", "ippo-ppo-shared", "ippo-ippo", "ippo-ippo-in-update", "ippo-ippo-in-update-shared",
                 "ippo-grpo")
    for key in (*ippo_keys, "floor-generate", "floor-fwd-bwd"):
        assert finite_pos(rows[key]["step_s"]), (key, rows[key])
    s = on_disk["settings"]
    for key in ippo_keys:
        r = rows[key]
        assert r["episodes"] == s["E"] and r["response_len"] == s["T"], r  # exactly E x T sampled tokens
        assert r["phases_s"]["generate"] > 0 and r["phases_s"]["update"] > 0
    assert rows["ippo-ippo"]["phases_s"]["scoring"] > 0 and rows["ippo-ippo"]["phases_s"]["val_grad"] > 0
    assert rows["ippo-ppo"]["phases_s"]["scoring"] == 0
    assert rows["ippo-ppo"]["ippo_ppo_ratio"] == 1.0

    # TRL: timed when that version is installed, else skipped with a reason
    installed = {"trl-grpo": importlib.util.find_spec("trl") is not None,
                 "trl-ppo": (bench_trl.TRL_112_DIR / "trl" / "__init__.py").is_file()}
    for key, have in installed.items():
        r = rows[key]
        assert "error" not in r, r.get("error")
        if have:
            assert finite_pos(r["step_s"]), r
            assert r["completion_len_mean"] == s["T"] and r["completions_per_step"] == s["E"], r
            assert r["trl_version"].startswith("1.16" if key == "trl-grpo" else "1.12"), r["trl_version"]
        else:
            assert isinstance(r.get("skipped"), str) and r["skipped"], r
            assert r.get("step_s") is None
    if installed["trl-ppo"]:
        assert rows["trl-ppo"]["gc_calls_per_step"] == 2 and rows["trl-ppo"]["gc_s"] > 0
        assert rows["trl-ppo"]["step_no_gc_s"] < rows["trl-ppo"]["step_s"]
    goals = {g["goal"]: g for g in on_disk["goals"]}
    assert len(goals) == 4  # two goals, each for the separate and the shared critic
    for g in goals.values():
        assert g["status"] in ("met", "missed", "not measured"), g
        assert (g["ratio"] is None) == (g["status"] == "not measured"), g
