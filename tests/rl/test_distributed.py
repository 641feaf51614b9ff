"""Two CPU processes (gloo, torchrun) vs one process on the same global batch: same scores, keep masks, weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ippo.inspection import inspect_run
from ippo.rl.checkpoint import latest_checkpoint
from ippo.rl.config import load_config
from ippo.rl.loop import train

from .conftest import fast_overrides

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "influence.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tiny_model_dir, tmp_path, restore_threads):
    # seed_per_prompt: each prompt's samples come from its own seeded generate() call, so the episodes
    # do not depend on how prompts are split over ranks; eval exercises the sharded evaluation too
    common = ["iterations=2", "threads=1", "rollout.seed_per_prompt=true", "influence.n_val=5",
              "eval.every=2", f"data.test_path={ROOT / 'tests/rl/data/arith_test.jsonl'}", "eval.k=2",
              "eval.max_new_tokens=4", "eval.num_prompts=5"]
    one = tmp_path / "one"
    train(load_config(None, fast_overrides(tiny_model_dir, one) + common))

    two = tmp_path / "two"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "-m", "ippo.cli", "train", str(cfg_file),
           *fast_overrides(tiny_model_dir, two), *common]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-4000:]

    a, b = _records(one), _records(two)
    assert len(a) == len(b) == 2 * 16
    assert [r["response"] for r in a] == [r["response"] for r in b]  # same global batch
    assert [r["kept"] for r in a] == [r["kept"] for r in b]
    sa = torch.tensor([r["score"] for r in a])
    sb = torch.tensor([r["score"] for r in b])
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-7 * float(sa.abs().max()))
    torch.testing.assert_close(torch.tensor([r["weight"] for r in a]), torch.tensor([r["weight"] for r in b]),
                               rtol=1e-4, atol=1e-5)
    wa = load_file(str(latest_checkpoint(one) / "policy.safetensors"))
    wb = load_file(str(latest_checkpoint(two) / "policy.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any((wa[k] - init[k]).abs().max() > 1e-4 for k in wa)  # training moved the weights
    ea = json.loads((one / "eval.jsonl").read_text().splitlines()[0])
    eb = json.loads((two / "eval.jsonl").read_text().splitlines()[0])
    assert ea["eval_prompts"] == eb["eval_prompts"] == 5
    assert ea["greedy_acc"] == pytest.approx(eb["greedy_acc"])


def _torchrun_two(tiny_model_dir, tmp_path, run: Path, extra: list[str]) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "-m", "ippo.cli", "train", str(cfg_file),
           *fast_overrides(tiny_model_dir, run), *extra]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-4000:]


@pytest.mark.parametrize("critic", [[], ["ppo.critic=shared", "influence.episode_loss=all"]],
                         ids=["separate-critic", "shared-critic-episode-loss-all"])
def test_in_update_two_processes_match_one(tiny_model_dir, tmp_path, restore_threads, critic):
    """in_update on two ranks: each rank scores its own micro-batches inside their backward; the first
    epoch's selections are summed over ranks. One mini-batch = the whole buffer, so every episode is
    scored at theta_old: scores and keep masks equal one process's, and a second epoch (which needs
    every rank to know every episode's selection) runs on the same kept episodes. With a shared critic
    and episode_loss=all the head's weighted gradient comes from its own small backward on each rank."""
    common = ["iterations=1", "threads=1", "rollout.seed_per_prompt=true", "influence.n_val=5",
              "influence.timing=in_update", "ppo.epochs=2", "ppo.mini_batch_size=16", "ppo.micro_batch_size=8",
              *critic]
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, fast_overrides(tiny_model_dir, one) + common))
    _torchrun_two(tiny_model_dir, tmp_path, two, common)
    a, b = _records(one), _records(two)
    assert len(a) == len(b) == 16
    assert [r["response"] for r in a] == [r["response"] for r in b]
    sa, sb = torch.tensor([r["score"] for r in a]), torch.tensor([r["score"] for r in b])
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-7 * float(sa.abs().max()))
    assert [r["kept"] for r in a] == [r["kept"] for r in b]
    assert 0 < sum(r["kept"] for r in b) < 16
    # what ippo inspect rebuilds the scores from, gathered over the ranks; and the rebuilt scores match the log
    scored_with = [[(r["token_norm"], r["seq_norm"], r["scored_after_steps"], r["response_tokens"]) for r in x]
                   for x in (a, b)]
    assert scored_with[0] == scored_with[1] and {r[:3] for r in scored_with[1]} == {(float(sum(
        len(r["response_tokens"]) for r in b)), 16.0, 0)}
    rec = inspect_run(two, [0], tmp_path / "two.html", top=3, sample=1).recomputed[0]
    if critic:  # the shared critic's values and returns that episode_loss=all scores are not logged
        assert "shared critic" in rec.problem and not rec.episodes
    else:
        assert rec.problem is None and len(rec.compared) == len(rec.episodes) == 7 and rec.all_match
    ma = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert ma[0]["kept"] == mb[0]["kept"] and ma[0]["updates"] == mb[0]["updates"] == 2
    if critic:  # the head trained on both (summed over ranks), to about the same place
        ha = load_file(str(latest_checkpoint(one) / "value.safetensors"))
        hb = load_file(str(latest_checkpoint(two) / "value.safetensors"))
        assert all(float(ha[k].abs().sum()) > 0 and float(hb[k].abs().sum()) > 0 for k in ha)
        assert ma[0]["vf_loss"] == pytest.approx(mb[0]["vf_loss"], rel=1e-2)


def test_dynamic_sampling_two_processes_match_one(tiny_model_dir, tmp_path, restore_threads):
    """rollout.dynamic_sampling on two ranks: each rank samples its half of every round, the ranks decide on the
    all-gathered group variances (same rounds everywhere) and exchange the chosen groups, so the batch -- and the
    I-PPO scores on it -- equal one process's (seed_per_prompt: a prompt's samples do not depend on the split)."""
    common = ["iterations=2", "threads=1", "rollout.seed_per_prompt=true", "influence.n_val=5", "ppo.advantage=grpo",
              "rollout.dynamic_sampling=true", "rollout.max_sample_rounds=8", "influence.on_empty=skip"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, fast_overrides(tiny_model_dir, one) + common))
    _torchrun_two(tiny_model_dir, tmp_path, two, common)
    a, b = _records(one), _records(two)
    assert len(a) == len(b) == 2 * 16
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert [r["kept"] for r in a] == [r["kept"] for r in b]
    ma = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    keys = ("sample_rounds", "groups_discarded", "groups_padded", "kept")
    assert [[r[k] for k in keys] for r in ma] == [[r[k] for k in keys] for r in mb]
    assert any(r["sample_rounds"] > 1 for r in ma)
