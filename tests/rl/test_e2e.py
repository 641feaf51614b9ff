"""End-to-end runs of the trainer on a tiny random Llama (CPU): PPO, I-PPO, GRPO, empty-filter handling."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ippo.rl.loop import train


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _weights(run_dir):
    root = run_dir / "checkpoints"
    return load_file(str(root / (root / "latest").read_text() / "policy.safetensors"))


def _initial(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_ppo_end_to_end(make_cfg, tmp_path, tiny_model_dir):
    run = tmp_path / "ppo"
    cfg = make_cfg("influence.enabled=false", "ppo.loss_agg=seq_mean", run_dir=run)
    summary = train(cfg)
    assert summary == {"iterations_done": 2, "stopped": None, "run_dir": str(run)}
    m = _jsonl(run / "metrics.jsonl")
    assert [r["iteration"] for r in m] == [0, 1]
    for r in m:
        assert r["kept_frac"] == 1.0 and r["updates"] == 4  # 16 episodes / 8 per mini-batch x 2 epochs
        assert "score_mean" not in r
        for k in ("reward", "kl_ref", "pg_loss", "vf_loss", "entropy", "time_generate", "time_ref_old_logprobs",
                  "time_update"):
            assert r[k] is not None, k
    assert m[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert m[1]["kl_loss"] > 0 and m[1]["kl_ref"] >= 0
    w0, w1 = _initial(tiny_model_dir), _weights(run)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    recs = _jsonl(run / "influence.jsonl")
    assert len(recs) == 32 and all(r["kept"] and r["weight"] == 1.0 and r["score"] is None for r in recs)


def test_ippo_end_to_end(make_cfg, tmp_path):
    run = tmp_path / "ippo"
    cfg = make_cfg("influence.mode=exact", "eval.every=1", f"data.test_path={cfg_test()}", "eval.k=2",
                   "eval.max_new_tokens=6", "eval.num_prompts=4", run_dir=run)
    assert train(cfg)["stopped"] is None
    m = _jsonl(run / "metrics.jsonl")
    assert len(m) == 2
    recs = _jsonl(run / "influence.jsonl")
    assert len(recs) == 2 * 16
    for it in (0, 1):
        rs = [r for r in recs if r["iteration"] == it]
        kept = [r for r in rs if r["kept"]]
        assert all((r["score"] > 0) == r["kept"] for r in rs)  # the paper's filter: score <= 0 dropped
        assert sum(r["weight"] for r in kept) / len(kept) == pytest.approx(1.0, rel=1e-5)  # score / mean(kept)
        assert all(r["weight"] == 0 for r in rs if not r["kept"])
        assert m[it]["kept"] == len(kept)
        scores = [r["score"] for r in rs]
        assert m[it]["score_max"] == pytest.approx(max(scores)) and m[it]["score_min"] == pytest.approx(min(scores))
        for k in ("time_val_grad", "time_scoring", "time_update"):
            assert m[it][k] > 0
    top = _jsonl(run / "influence_topk.jsonl")
    assert len(top) == 2 and top[0]["proponents"][0]["score"] == max(r["score"] for r in recs if r["iteration"] == 0)
    ev = _jsonl(run / "eval.jsonl")
    assert len(ev) == 2 and {"greedy_acc", "mean_acc", "maj@2", "pass@2"} <= set(ev[0])
    assert ev[0]["eval_prompts"] == 4


def cfg_test():
    from .conftest import DATA

    return DATA / "arith_test.jsonl"


@pytest.mark.parametrize("mode", ["target", "sketch"])
def test_ippo_other_modes_and_filters(make_cfg, tmp_path, mode):
    run = tmp_path / mode
    cfg = make_cfg(f"influence.mode={mode}", "influence.rank=4", "influence.filter=bottom_fraction",
                   "influence.fraction=0.25", "influence.reweight=false", "iterations=1", "ppo.advantage=grpo",
                   run_dir=run)
    train(cfg)
    recs = _jsonl(run / "influence.jsonl")
    assert sum(r["kept"] for r in recs) == 12  # 16 - floor(0.25 * 16)
    assert all(r["weight"] == (1.0 if r["kept"] else 0.0) for r in recs)


def test_empty_filter_stops_and_records_why(make_cfg, tmp_path, tiny_model_dir):
    run = tmp_path / "stop"
    summary = train(make_cfg("influence.threshold=1e9", "iterations=3", run_dir=run))
    assert summary["iterations_done"] == 1 and "no episode kept" in summary["stopped"]
    m = _jsonl(run / "metrics.jsonl")
    assert len(m) == 1 and m[0]["updates"] == 0 and "no episode kept" in m[0]["stop_reason"]
    state = json.loads((run / "checkpoints" / "iter_000001" / "state.json").read_text())
    assert "no episode kept" in state["stopped"]
    w0, w1 = _initial(tiny_model_dir), _weights(run)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # resuming a stopped run does nothing more
    cfg = make_cfg("influence.threshold=1e9", "iterations=3", "resume=true", run_dir=run)
    assert train(cfg)["iterations_done"] == 1


def test_empty_filter_skip_continues(make_cfg, tmp_path):
    run = tmp_path / "skip"
    summary = train(make_cfg("influence.threshold=1e9", "influence.on_empty=skip", run_dir=run))
    assert summary["stopped"] is None and summary["iterations_done"] == 2
    m = _jsonl(run / "metrics.jsonl")
    assert [r["updates"] for r in m] == [0, 0] and all(r["empty_action"] == "skip" for r in m)


def test_lora_and_gradient_checkpointing_with_influence(make_cfg, tmp_path, tiny_model_dir):
    run = tmp_path / "lora"
    cfg = make_cfg("model.lora=true", "model.lora_r=4", "model.gradient_checkpointing=true", "iterations=1",
                   "ppo.lr=1e-2", run_dir=run)
    assert train(cfg)["stopped"] is None
    recs = _jsonl(run / "influence.jsonl")
    assert any(r["score"] != 0 for r in recs)  # the engine scored through LoRA adapters + checkpointing
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    saved = load_file(str(ck / "policy.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # only the adapters are checkpointed
    # resume with LoRA loads the adapters back
    cfg = make_cfg("model.lora=true", "model.lora_r=4", "iterations=1", "ppo.lr=1e-2", "resume=true", run_dir=run)
    assert train(cfg)["iterations_done"] == 1


def test_ippo_weights_and_filter_change_the_update(make_cfg, tmp_path):
    """Same episodes (seeded), different use of the scores -> different weights; fails if either is ignored."""
    finals = {}
    for name, extra in {"reweight": [], "uniform": ["influence.reweight=false"],
                        "keep_all": ["influence.threshold=-1e9", "influence.reweight=false"]}.items():
        run = tmp_path / name
        train(make_cfg("iterations=1", *extra, run_dir=run))
        finals[name] = _weights(run)
        kept = sum(r["kept"] for r in _jsonl(run / "influence.jsonl"))
        assert kept == 16 if name == "keep_all" else kept < 16
    for a, b in (("reweight", "uniform"), ("uniform", "keep_all")):
        assert any(not torch.equal(finals[a][k], finals[b][k]) for k in finals[a]), (a, b)


def test_cli_eval(make_cfg, tmp_path, tiny_model_dir, capsys):
    from ippo import cli

    from .conftest import DATA, fast_overrides

    y = tmp_path / "c.yaml"
    y.write_text("{}\n")
    rc = cli.main(["eval", str(y), *fast_overrides(tiny_model_dir, tmp_path / "ev"),
                   f"data.test_path={DATA / 'arith_test.jsonl'}", "eval.num_prompts=3", "eval.k=2",
                   "eval.max_new_tokens=4", "--base"])  # a run without checkpoints: the starting model, asked for
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["eval_prompts"] == 3 and 0 <= res["pass@2"] <= 1 and res["checkpoint"] is None
