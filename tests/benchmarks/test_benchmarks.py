"""Each benchmark's ``--smoke`` mode runs and writes a JSON whose numbers agree (timings are not checked).

Subprocesses, not in-process calls: the scoring benchmark reconfigures glibc's allocator for its
peak-memory pass, and every benchmark sets torch's thread count.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(name: str, tmp_path: Path, *extra: str, json_name: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # benchmarks never time the interpreter
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"), "--smoke", "--threads", "1",
                           "--out", str(tmp_path), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|" in proc.stdout  # a table was printed
    path = tmp_path / (json_name or f"{name}_smoke.json")
    assert path.is_file(), list(tmp_path.iterdir())
    return json.loads(path.read_text())


def check_env(res: dict, name: str) -> None:
    assert res["benchmark"] == name and res["mode"] == "smoke"
    env = res["env"]
    for key in ("device", "device_slug", "torch", "transformers", "threads", "load_avg", "git_commit", "date"):
        assert key in env, key
    assert env["threads"] == 1
    assert res["wall_s"] > 0


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_bench_scoring_smoke(tmp_path):
    res = run_smoke("scoring", tmp_path)
    check_env(res, "scoring")
    rows = {r["method"]: r for r in res["rows"]}
    assert {"loop", "func", "plain", "ippo-exact[torch]", "ippo-target-64[torch]", "ippo-sketch-16[torch]"} <= set(rows)
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        assert finite(r["scoring_median_s"]) and r["scoring_median_s"] > 0, name
        assert finite(r["total_s"]), name
        assert r["scoring_peak_mb"] is None or r["scoring_peak_mb"] >= 0, name
    assert rows["ippo-exact[torch]"]["max_rel_err"] == 0.0  # the reference itself
    # Methods that compute the exact score agree with ippo exact to float32 accuracy.
    exact_like = [n for n in rows if n in ("loop", "func", "dattri", "dattri-inv") or n.startswith("ippo-exact")]
    for n in exact_like:
        assert rows[n]["max_rel_err"] < 1e-3, (n, rows[n]["max_rel_err"])
        assert rows[n]["spearman"] > 0.999, (n, rows[n]["spearman"])
    # The smoke target has < 64 validation tokens, so rank-64 target mode is exact too.
    for n in (n for n in rows if n.startswith("ippo-target")):
        assert rows[n]["max_rel_err"] < 1e-3, (n, rows[n]["max_rel_err"])
    for n in (n for n in rows if n.startswith("ippo-sketch")):
        assert -1.0 <= rows[n]["spearman"] <= 1.0
    assert rows["plain"].get("max_rel_err") is None  # plain produces no scores
    assert res["targets"], "the issue's targets are evaluated"
    for d in res["targets"].values():
        assert d["spearman_q64_met"] is True
        assert finite(d["speedup_vs_loop"])
        assert d.get("mem_vs_plain") is None or finite(d["mem_vs_plain"])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-lm-head"])
def test_bench_scoring_on_your_model(tmp_path, tied):
    """--model: a local model directory (random weights from its config; --pretrained its own weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model_dir = tmp_path / "my-model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    out = tmp_path / "out"
    res = run_smoke("scoring", out, "--model", str(model_dir), "--pretrained", "--E", "6", "--T", "12",
                    "--methods", "loop,plain,exact,target", "--no-plots",
                    json_name="scoring_smoke-model-my-model.json")
    rows = {r["method"]: r for r in res["rows"]}
    assert {"loop", "plain", "ippo-exact[torch]", "ippo-target-64[torch]"} <= set(rows)
    assert all(r["preset"] == "model:my-model" and r["E"] == 6 and r["T"] == 12 for r in rows.values())
    assert res["settings"]["presets"]["model:my-model"]["hidden_size"] == 32
    assert res["settings"]["presets"]["model:my-model"]["weights"] == "pretrained"
    for n in (n for n in rows if n.startswith("ippo-")):
        assert rows[n]["max_rel_err"] < 1e-3, (n, rows[n]["max_rel_err"])
    if tied:  # the loop differentiates the shared weight (both uses); ippo scores its linear use: they differ
        assert "tied weights" in rows["loop"]["note"]
        assert rows["loop"]["max_rel_err"] > 1e-3
    else:
        assert "tied" not in rows["loop"]["note"] and rows["loop"]["max_rel_err"] < 1e-3


def test_bench_scoring_model_flag_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--smoke", "--model",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0 and "no such file or directory" in proc.stderr + proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--smoke", "--E", "4",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "apply to --model runs" in proc.stderr


def test_bench_step_on_your_model(tmp_path):
    """bench_step --model: one configuration on a local model directory (its weights and tokenizer)."""
    pytest.importorskip("ippo.rl.loop")
    from ippo.rl.models import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "my-model", hidden=48, layers=3)
    res = run_smoke("step", tmp_path / "out", "--model", str(model_dir), "--E", "4", "--T", "6", "--no-plots",
                    json_name="step_smoke-model-my-model.json")
    (r,) = res["rows"]
    assert (r["model"], r["hidden"], r["layers"], r["E"], r["T"]) == ("my-model", 48, 3, 4, 6)
    assert r["ppo_iteration_s"] > 0 and r["ippo_iteration_s"] > 0 and r["in_update_iteration_s"] > 0
    assert r["ippo_kept_frac"] == 1.0 and r["episodes"] == 4


def test_bench_kernels_smoke(tmp_path):
    res = run_smoke("kernels", tmp_path)
    check_env(res, "kernels")
    ops = {r["op"] for r in res["rows"]}
    assert ops == {"exact_token_scores", "projected_token_scores", "segment_sketch", "segment_sum", "select_episodes"}
    assert "torch" in {r["backend"] for r in res["rows"]}
    for r in res["rows"]:
        assert "error" not in r, r
        assert r["rel_err"] < 1e-5, r
        assert finite(r["time_s"]) and finite(r["x_floor"]) and r["x_floor"] > 0
        if r["op"] == "select_episodes":
            assert r["keep_match"] is True, r


def test_bench_step_smoke(tmp_path):
    pytest.importorskip("ippo.rl.loop")
    res = run_smoke("step", tmp_path)
    check_env(res, "step")
    assert len(res["rows"]) == 1
    r = res["rows"][0]
    for ph in ("generate", "ref_old_logprobs", "update", "iteration"):
        assert r[f"ppo_{ph}_s"] > 0 and r[f"ippo_{ph}_s"] > 0, ph
    assert r["ippo_val_grad_s"] > 0 and r["ippo_scoring_s"] > 0
    assert not r["ppo_val_grad_s"] and not r["ppo_scoring_s"]  # PPO never scores
    assert r["ippo_kept_frac"] == 1.0  # the benchmark keeps every episode (same update work)
    assert finite(r["overhead"]) and r["overhead"] > 0
    assert r["in_update_iteration_s"] > 0 and finite(r["overhead_in_update"])  # scored inside the update
    assert r["in_update_pg_iteration_s"] > 0 and finite(r["overhead_in_update_pg"])  # + the unweighted KL stream
    # peak memory of each run (a model, its copies and the iterations): positive, and the ratios consistent
    assert r["ppo_peak_mb"] > 0 and r["ippo_peak_mb"] > 0 and r["in_update_peak_mb"] > 0
    assert r["mem_overhead"] == pytest.approx(r["ippo_peak_mb"] / r["ppo_peak_mb"])
    assert r["mem_overhead_in_update"] == pytest.approx(r["in_update_peak_mb"] / r["ppo_peak_mb"])


def test_bench_rollout_smoke(tmp_path):
    """HF generate measured on the trainer's own sampler; the vLLM row says why it was skipped on the CPU."""
    res = run_smoke("rollout", tmp_path)
    check_env(res, "rollout")
    rows = {r["engine"]: r for r in res["rows"]}
    hf = rows["hf"]
    assert "error" not in hf, hf.get("error")
    assert hf["episodes"] == 4 * 2 and 0 < hf["tokens"] <= 8 * 8 and finite(hf["tokens_per_s"]) and hf["tokens_per_s"] > 0
    assert "CUDA" in rows["vllm"]["skipped"]


def test_bench_target_memory_smoke(tmp_path):
    """One I-PPO iteration per target basis, the target alone, and the 8B projection: the formula
    predicts the bytes the target really holds (Target.memory_bytes) exactly."""
    pytest.importorskip("ippo.rl.loop")
    res = run_smoke("target_memory", tmp_path)
    check_env(res, "target_memory")
    runs = [r["run"] for r in res["iterations"]]
    assert runs == ["I-PPO target, dense basis", "I-PPO target, factor basis"]  # --smoke: these two only
    assert all(r["peak_mb"] is None or r["peak_mb"] > 0 for r in res["iterations"])
    held = {r["basis"]: r for r in res["target"]}
    for r in held.values():
        assert r["held_mb"] == pytest.approx(r["predicted_held_mb"], rel=1e-9)
    assert held["factor"]["kept_mb"] < held["factor"]["held_mb"]  # the factors are freed after the basis
    assert held["dense"]["kept_mb"] == held["dense"]["held_mb"]
    p = res["projection"]
    assert [r["N_val/rank"] for r in p] == [2048, 8192, 32768]
    assert p[0]["exact_GiB"] == pytest.approx(4 * 7_504_658_432 / 2**30)  # Llama-3-8B's hooked linear weights
    assert p[0]["factor_peak_GiB"] < p[0]["dense_peak_GiB"] < p[2]["factor_peak_GiB"]


def test_bench_demo_cost_smoke(tmp_path):
    res = run_smoke("demo_cost", tmp_path, json_name="demo_cost_smoke.json")
    assert res["benchmark"] == "demo_cost" and res["threads"] == 1
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"ppo", "ippo_before_update_exact", "ippo_in_update_exact"}
    assert rows["ppo"]["overhead"] == 1.0 and rows["ppo"]["val_grad"] == 0
    for name in ("ippo_before_update_exact", "ippo_in_update_exact"):
        r = rows[name]
        assert r["val_grad"] > 0 and finite(r["overhead"]) and finite(r["over_floor"])
        # the floor is PPO + this run's validation target + the measured score ops
        assert r["floor"] == pytest.approx(rows["ppo"]["iteration"] + r["val_grad"] + res["score_ops"]["seconds"])
    assert rows["ippo_before_update_exact"]["scoring"] > 0 and rows["ippo_in_update_exact"]["scoring"] == 0
    assert res["score_ops"]["layers"] > 0 and res["score_ops"]["tokens"] > 0
