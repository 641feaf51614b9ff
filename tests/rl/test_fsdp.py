"""dist.strategy=fsdp: two CPU processes (gloo, torchrun) with FSDP2-sharded policy, critic and reference
against one process with whole models: same scores, keep masks, weights and updated weights; a sharded
checkpoint resumes bit-identically."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ippo.rl.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    layout_problem,
    read_full_tensors,
    read_policy_weights,
    read_shard,
    restore_checkpoint,
    verify_run,
)
from ippo.rl.config import ConfigError, load_config
from ippo.rl.evaluate import run_eval
from ippo.rl.loop import train

from .checkpoint.common import DAMAGE
from .conftest import fast_overrides

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int = 300, **env_vars: str) -> str:
    """Run ``args`` on 2 processes; returns their stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_vars)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", *args]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    assert res.returncode == 0, res.stderr.decode()[-4000:]
    return res.stderr.decode()


def _train_two(tiny_model_dir, tmp_path, run: Path, extra: list[str]) -> str:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    return _torchrun(["-m", "ippo.cli", "train", str(cfg_file), *fast_overrides(tiny_model_dir, run), *extra])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_engine_on_sharded_model_matches_whole_model(tiny_model_dir, tmp_path):
    """Validation gradient, scores (exact, target), in_update's weighted gradient, clipping and an
    update on a sharded model equal the whole model's on the whole batch (fp32); generation runs
    gathered once, with different lengths per rank; the vLLM weight sync (and LoRA adapter) of a sharded
    policy sends whole tensors (see the worker's docstring)."""
    out = tmp_path / "errors.json"
    _torchrun([str(ROOT / "tests/rl/fsdp_engine_worker.py"), str(tiny_model_dir), str(out)], timeout=240)
    errors = json.loads(out.read_text())
    assert len(errors) == 14  # 6 quantities x 2 modes, the vLLM weight sync and its LoRA adapter
    for name, err in errors.items():
        assert err <= 1e-5, (name, err)  # measured: <= 2.3e-7, target-mode scores 1.1e-6


# in_update compares with one process when each micro-batch is one episode: a micro-batch's selection
# is then its own (weight 1 if kept), whereas larger micro-batches group episodes differently on one
# and on two processes (README: in_update selects per micro-batch and per rank).
SETTINGS = {
    # with evaluation of 5 prompts: 3 on one rank, 2 on the other (generation gathered once)
    "exact-before_update": ["influence.mode=exact", "ppo.micro_batch_size=2", "eval.every=1",
                            f"data.test_path={ROOT / 'tests/rl/data/arith_test.jsonl'}", "eval.k=2",
                            "eval.max_new_tokens=4", "eval.num_prompts=5"],
    # LoRA adapters (PEFT) on sharded frozen base weights; checkpoints keep the adapters only
    "target-in_update-lora": ["influence.mode=target", "influence.rank=4", "influence.timing=in_update",
                              "ppo.mini_batch_size=16", "ppo.micro_batch_size=1", "model.lora=true",
                              "model.lora_r=4"],
}


@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
def test_fsdp_two_processes_match_one(tiny_model_dir, tmp_path, restore_threads, setting):
    """Policy, separate critic and reference sharded over 2 ranks. val_batch=1 and small micro-batches
    give the ranks different numbers of passes, so the lock-step stand-ins run (counted in the metrics)."""
    common = ["iterations=1", "threads=1", "rollout.seed_per_prompt=true", "influence.n_val=5",
              "influence.val_batch=1", "dist.strategy=fsdp", *SETTINGS[setting]]
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, fast_overrides(tiny_model_dir, one) + common))  # one process: nothing to shard
    _train_two(tiny_model_dir, tmp_path, two, common)

    a, b = _jsonl(one / "influence.jsonl"), _jsonl(two / "influence.jsonl")
    assert len(a) == len(b) == 16
    assert [r["response"] for r in a] == [r["response"] for r in b]  # same global batch
    assert [r["kept"] for r in a] == [r["kept"] for r in b]
    assert 0 < sum(r["kept"] for r in b) < 16
    sa, sb = torch.tensor([r["score"] for r in a]), torch.tensor([r["score"] for r in b])
    torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-7 * float(sa.abs().max()))
    torch.testing.assert_close(torch.tensor([r["weight"] for r in b]), torch.tensor([r["weight"] for r in a]),
                               rtol=1e-5, atol=1e-6)
    ma, mb = _jsonl(one / "metrics.jsonl")[0], _jsonl(two / "metrics.jsonl")[0]
    assert ma["updates"] == mb["updates"] and ma["kept"] == mb["kept"]
    assert mb["fsdp_stand_ins"] > 0 and "fsdp_stand_ins" not in ma

    ck_one, ck_two = latest_checkpoint(one), latest_checkpoint(two)
    assert not (ck_two / "policy.safetensors").exists()  # the 2-rank run wrote shards
    wa, wb = read_policy_weights(ck_one), read_policy_weights(ck_two)
    assert wa.keys() == wb.keys()
    # Adam divides by sqrt(v): coordinates whose gradient is near its rounding noise move by a few
    # 1e-4 of a step (lr 1e-3) whatever the strategy (ddp measures the same); atol 1e-5 = 1% of a step
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)
    va, vb = load_file(str(ck_one / "value.safetensors")), read_full_tensors(ck_two, "value")
    for k in va:
        torch.testing.assert_close(vb[k], va[k], rtol=1e-5, atol=1e-5)
    if "model.lora=true" in common:
        assert all("lora_" in k for k in wa) and any("lora_B" in k and wa[k].abs().max() > 1e-4 for k in wa)
    else:
        init = load_file(str(tiny_model_dir / "model.safetensors"))
        assert any((wa[k] - init[k]).abs().max() > 1e-4 for k in wa)  # training moved the weights
    if "eval.every=1" not in common:
        return
    ea, eb = _jsonl(one / "eval.jsonl")[0], _jsonl(two / "eval.jsonl")[0]
    assert ea["eval_prompts"] == eb["eval_prompts"] == 5 and ea["greedy_acc"] == pytest.approx(eb["greedy_acc"])
    # `ippo eval` reads the sharded checkpoint (whole tensors) like a whole one
    cfg = load_config(None, fast_overrides(tiny_model_dir, two) + common)
    assert run_eval(cfg, str(ck_two))["greedy_acc"] == pytest.approx(eb["greedy_acc"])


# bf16 compute over float32 shards (dist.fsdp_param_dtype), a shared critic and in_update
RESUME = ["iterations=2", "threads=1", "rollout.seed_per_prompt=true", "influence.n_val=5", "dist.strategy=fsdp",
          "dist.fsdp_param_dtype=bfloat16", "checkpoint.every=1", "checkpoint.keep_last=2", "ppo.critic=shared",
          "influence.episode_loss=all", "influence.timing=in_update", "ppo.mini_batch_size=16"]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A 2-rank run of 2 iterations, uninterrupted: checkpoints iter_000001 and iter_000002."""
    root = tmp_path_factory.mktemp("fsdp_full")
    _train_two(tiny_model_dir, root, root / "full", RESUME)
    return root / "full"


def _assert_same_end(full: Path, resumed: Path) -> None:
    """Every shard file of the last checkpoint bit-identical, and the same metrics."""
    a, b = full / "checkpoints" / "iter_000002", resumed / "checkpoints" / "iter_000002"
    files = sorted(p.name for p in a.glob("*.shard-*.safetensors"))
    assert len(files) == 6 and files == sorted(p.name for p in b.glob("*.shard-*.safetensors"))
    for name in files:
        ta, sharded = read_shard(a / name)
        tb, _ = read_shard(b / name)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
        if name.startswith("policy"):
            assert sharded  # the policy's weights really are shards
    ma, mb = _jsonl(full / "metrics.jsonl"), _jsonl(resumed / "metrics.jsonl")
    assert [m["iteration"] for m in mb] == [0, 1]
    assert [(m["reward"], m["kept"], m["pg_loss"]) for m in ma] == [(m["reward"], m["kept"], m["pg_loss"]) for m in mb]
    assert verify_run(resumed)[1] == 0  # the new checkpoint verifies (manifest over all shard files)


def test_fsdp_sharded_checkpoint_resumes_bit_identically(full_run, tiny_model_dir, tmp_path):
    """A 2-rank run of 2 iterations against the same run resumed from its checkpoint after iteration 1:
    every shard of policy, shared value head and optimizer state is bit-identical. The manifest lists
    every shard file of every rank."""
    resumed = tmp_path / "resumed"
    # the resumed run: the full run's directory as a kill right after checkpoint 1 would have left it
    shutil.copytree(full_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_000002")
    (resumed / "checkpoints" / "latest").write_text("iter_000001")
    ck1 = resumed / "checkpoints" / "iter_000001"
    manifest = json.loads((ck1 / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sorted(manifest["files"]) == sorted(p.name for p in ck1.iterdir() if p.name != "manifest.json")
    assert sum(".shard-" in n for n in manifest["files"]) == 6  # policy, value head, optimizer x 2 ranks
    # a whole-model run (one process, or ddp) stops at once with the strategy to use; so does a sharded run
    # on another number of processes
    with pytest.raises(CheckpointError, match="sharded over 2 processes .*dist.strategy=fsdp and 2 processes"):
        restore_checkpoint(resumed, policy=None, value=None, optimizer=None, scheduler=None, trainable_only=False,
                           device=torch.device("cpu"))
    assert "written by 2 processes, this run has 3" in layout_problem(ck1, 3)
    assert layout_problem(ck1, 2) is None
    _train_two(tiny_model_dir, tmp_path, resumed, RESUME + ["resume=true"])
    _assert_same_end(full_run, resumed)
    head = read_full_tensors(full_run / "checkpoints" / "iter_000002", "value")
    assert all(float(v.abs().sum()) > 0 for v in head.values())  # the shared head trained


def test_fsdp_damaged_shard_falls_back_and_ends_bit_identical(full_run, tiny_model_dir, tmp_path):
    """One flipped bit in rank 1's policy shard of the latest checkpoint: rank 1 finds it, the resume names
    the shard file in one line, both ranks fall back to iter_000001, retrace iteration 2 and end
    bit-identical to the uninterrupted run."""
    run = tmp_path / "damaged"
    shutil.copytree(full_run, run)
    shard = run / "checkpoints" / "iter_000002" / "policy.shard-00001-of-00002.safetensors"
    DAMAGE["flipped tensor bit"][1](shard)
    lines, rc = verify_run(run)  # ippo verify: a sharded checkpoint is checked file by file too
    assert rc == 1 and any("iter_000002" in x and "damaged" in x and shard.name in x for x in lines), lines
    assert any("iter_000001" in x and " ok " in x and "sharded over 2 processes" in x for x in lines), lines
    err = _train_two(tiny_model_dir, tmp_path, run, RESUME + ["resume=true"])
    said = [x for x in err.splitlines() if x.startswith("ippo:")]  # rank 0 reports, once
    assert len(said) == 2, said
    assert "iter_000002" in said[0] and shard.name in said[0] and "sha256" in said[0] and "falling back" in said[0]
    assert "resuming from" in said[1] and "iter_000001" in said[1]
    _assert_same_end(full_run, run)


def test_fsdp_nonfinite_loss_on_one_rank_skips_the_step_on_both(tiny_model_dir, tmp_path):
    """PPO with a NaN policy loss on rank 1 only, from iteration 1 (fsdp_nan_worker.py): both ranks skip every
    step (rank 0 must not run its sharded backward alone: TORCH_DISTRIBUTED_DEBUG=DETAIL reports the ranks'
    collectives no longer pairing up, as happened before they agreed), the run stops after
    ppo.max_nonfinite_steps, and the weights stay those of iteration 0's last step."""
    run, cfg_file = tmp_path / "nan", tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    _torchrun([str(ROOT / "tests/rl/fsdp_nan_worker.py"), "train", str(cfg_file),
               *fast_overrides(tiny_model_dir, run), "dist.strategy=fsdp", "influence.enabled=false", "threads=1",
               "iterations=3", "ppo.max_nonfinite_steps=2", "checkpoint.keep_last=1"], timeout=120,
              TORCH_DISTRIBUTED_DEBUG="DETAIL")  # every collective checked to be the same op on both ranks
    m = _jsonl(run / "metrics.jsonl")
    assert len(m) == 2 and m[0]["nonfinite_steps"] == 0 and m[0]["updates"] > 0
    assert m[1]["nonfinite_steps"] == 2 and m[1]["updates"] == 0 and "non-finite" in m[1]["stop_reason"]
    good, final = (read_policy_weights(run / "checkpoints" / f"iter_00000{i}") for i in (1, 2))
    assert good.keys() == final.keys() and all(torch.equal(good[k], final[k]) for k in good)


def test_fsdp_config_errors(make_cfg):
    with pytest.raises(ConfigError, match="dist.strategy"):
        make_cfg("dist.strategy=zero3")
    with pytest.raises(ConfigError, match="model.ref_offload"):
        make_cfg("dist.strategy=fsdp", "model.ref_offload=true")
    with pytest.raises(ConfigError, match="dist.fsdp_param_dtype"):
        make_cfg("dist.strategy=fsdp", "dist.fsdp_param_dtype=int8")
    with pytest.raises(ConfigError, match="needs dist.strategy=fsdp"):
        make_cfg("dist.fsdp_param_dtype=bfloat16")
