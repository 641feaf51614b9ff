"""influence.timing=in_update with any micro-batch size, and with nothing kept (issue 15, items 1 and 4)."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ippo.rl.batches import minibatch_order
from ippo.rl.config import load_config
from ippo.rl.loop import train

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke_cpu.yaml"


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _final_weights(run_dir):
    root = run_dir / "checkpoints"
    ck = root / (root / "latest").read_text()
    out = {f"policy.{k}": v for k, v in load_file(str(ck / "policy.safetensors")).items()}
    if (ck / "value.safetensors").exists():
        out.update({f"value.{k}": v for k, v in load_file(str(ck / "value.safetensors")).items()})
    return out


def test_in_update_runs_with_every_micro_batch_size(tiny_model_dir, tmp_path):
    """`ippo train configs/smoke_cpu.yaml influence.timing=in_update ppo.micro_batch_size=k` for k = 1..E.

    E = 16 episodes in mini-batches of 8: k = 7 splits each into 7 + 1 (the issue's crash: the batch-1
    forward came back with the batch of the previous one), k = 8 is one micro-batch per mini-batch (a
    micro-batch larger than its mini-batch is a config error). The first mini-batch is scored at theta_old
    however it is split, so its episodes' scores must not depend on k.
    """
    first_mb = None
    scores = {}
    for k in range(1, 9):
        run = tmp_path / f"mb{k}"
        cfg = load_config(SMOKE, [f"run_dir={run}", f"model.path={tiny_model_dir}", "iterations=1", "eval.every=0",
                                  "log.progress=false", "influence.timing=in_update", f"ppo.micro_batch_size={k}"])
        assert train(cfg)["stopped"] is None, k
        first_mb = minibatch_order(torch.arange(16), cfg.seed, 0, 0)[:cfg.ppo.mini_batch_size]
        recs = _jsonl(run / "influence.jsonl")
        assert len(recs) == 16 and all(r["score"] is not None for r in recs), k
        scores[k] = torch.tensor([recs[i]["score"] for i in first_mb], dtype=torch.float64)
    ref = scores[8]
    assert float(ref.norm()) > 0
    for k, s in scores.items():
        assert float((s - ref).norm() / ref.norm()) < 1e-4, k


def test_in_update_keeping_nothing_takes_no_step_like_before_update(make_cfg, tmp_path):
    """Every episode filtered: before_update makes no optimizer step, and neither may in_update (its KL and
    value terms used to step on the dropped episodes); both stop with the weights untouched."""
    runs = {}
    for timing in ("before_update", "in_update"):
        runs[timing] = run = tmp_path / timing
        summary = train(make_cfg("iterations=2", "influence.threshold=1e9", f"influence.timing={timing}",
                                 "ppo.kl_coef=0.05", run_dir=run))
        assert summary["iterations_done"] == 1 and "no episode kept" in summary["stopped"], timing
        m = _jsonl(run / "metrics.jsonl")
        assert len(m) == 1 and m[0]["updates"] == 0 and m[0]["kept"] == 0, (timing, m)
    a, b = _final_weights(runs["before_update"]), _final_weights(runs["in_update"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
