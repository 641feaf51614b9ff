"""What a run may do to its run dir and to its weights (issue 22, items 1-4 and 7): one process per run dir, no
silent wipe on a fresh start, no silent config change on resume, no NaN learning rate, no step that leaves
NaN/Inf weights behind, every number of the config within its range."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from ippo import cli
from ippo.errors import ConfigError, RunDirError
from ippo.rl import step_guard
from ippo.rl.config import load_config, to_dict
from ippo.rl.config_checks import RANGE_CHECKED_ELSEWHERE, RANGES, dotted_keys
from ippo.rl.loop import train
from ippo.rl.run_dir import HISTORY, RunDirLock, check_resumed_state, open_run_dir

from .checkpoint.common import save
from .conftest import DATA, fast_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli_train(tiny_model_dir, tmp_path, capsys):
    """``ippo train CONFIG <fast overrides> run_dir=RUN <extra>`` as a user runs it: (exit code, stderr)."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")

    def run(run_dir: Path, *extra: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = cli.main(["train", str(cfg_file), *fast_overrides(tiny_model_dir, run_dir), *extra])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return rc, err
    return run


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------- 1. the lock


HOLD = ("import sys, time; from pathlib import Path; from ippo.rl.run_dir import RunDirLock; "
        "RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(300)")


def test_a_second_process_on_a_run_dir_in_use_is_refused_naming_the_holder(cli_train, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = cli_train(run)
        assert rc == 2 and err.count("\n") == 1 and f"in use by another ippo process (pid {holder.pid}" in err
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, no stale lock is left behind
        holder.wait()
        holder.stdout.close()
    lock = RunDirLock(run)
    lock.acquire()
    lock.release()


def test_under_torchrun_every_rank_fails_cleanly_on_a_locked_run_dir(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunDirLock(run)
    lock.acquire()  # held by this (pytest) process
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                              f"--master_port={port}", "-m", "ippo.cli", "train", str(cfg_file),
                              *fast_overrides(tiny_model_dir, run)], check=False, cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=240)
    finally:
        lock.release()
    assert res.returncode != 0  # (torchrun reports its failed children with a traceback of its own)
    assert res.stderr.count(f"in use by another ippo process (pid {os.getpid()}") == 2, res.stderr[-3000:]
    # (the first rank to exit 2 may get the other stopped by torchrun before it exits 2 itself)
    assert res.stderr.count("exitcode  : 2") >= 1 and f'File "{ROOT / "ippo"}' not in res.stderr


# ---------------------------------------------------------------------------------------------- 2. fresh starts


def test_a_fresh_start_in_a_run_dir_with_checkpoints_is_refused_and_wipes_nothing(cli_train, tmp_path):
    """The issue's run: 4 iterations, restarted with iterations=1 and resume=false, lost iter_3, iter_4 and 3 of
    the 4 lines of metrics.jsonl."""
    run = tmp_path / "run"
    save(run, 3)
    save(run, 4)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(4)))
    rc, err = cli_train(run, "iterations=1")
    assert rc == 2 and "has checkpoints: pass resume=true, or overwrite=true to start over" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000003", "iter_000004", "latest"]
    assert len(_jsonl(run / "metrics.jsonl")) == 4
    rc, err = cli_train(run, "resume=true", "overwrite=true")
    assert rc == 2 and "contradict" in err


def test_overwrite_resume_and_the_history_of_a_run(cli_train, tmp_path):
    run = tmp_path / "run"
    assert cli_train(run, "iterations=1")[0] == 0
    assert cli_train(run, "iterations=2", "resume=true")[0] == 0  # iterations may change: allowed
    assert len(_jsonl(run / "metrics.jsonl")) == 2
    (run / "config.json").unlink()  # nothing to compare the config with: state.json still knows the seed
    rc, err = cli_train(run, "iterations=3", "resume=true", "seed=1")
    assert rc == 2 and "seed 0, the config says seed=1" in err
    assert cli_train(run, "iterations=1", "overwrite=true")[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001", "latest"]
    assert len(_jsonl(run / "metrics.jsonl")) == 1
    history = _jsonl(run / HISTORY)
    assert [h["event"] for h in history] == ["fresh", "resume", "overwrite"]
    assert history[1]["changed"] == {"iterations": [1, 2], "resume": [False, True]}
    assert all(h["time"] and h["pid"] == os.getpid() for h in history)


# ---------------------------------------------------------------------------------------------- 3. resume checks


@pytest.fixture
def checkpointed_run(tiny_model_dir, tmp_path):
    """A run dir as a run of the fast config leaves it (config.json and a checkpoint), without training."""
    run = tmp_path / "run"
    save(run, 1)
    cfg = load_config(None, fast_overrides(tiny_model_dir, run))
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    return run


@pytest.mark.parametrize("change", ["rollout.prompts_per_iter=8", "rollout.samples_per_prompt=2", "ppo.lr=1e-4",
                                    "seed=1", "model.dtype=bfloat16", "influence.enabled=false",
                                    "influence.mode=sketch", f"data.train_path={DATA / 'arith_test.jsonl'}"])
def test_resume_refuses_a_change_of_what_the_run_computes(cli_train, checkpointed_run, change):
    key = change.split("=", 1)[0]
    rc, err = cli_train(checkpointed_run, "resume=true", change)
    assert rc == 2 and err.count("\n") == 1 and "changes what the run computes" in err
    assert f"{key}: " in err and f"resume_allow_changes=[{key}]" in err
    assert not (checkpointed_run / HISTORY).exists()


def test_resume_allows_listed_and_harmless_changes_and_records_them(tiny_model_dir, checkpointed_run):
    cfg = load_config(None, fast_overrides(tiny_model_dir, checkpointed_run) + [
        "resume=true", "iterations=7", "log.progress=true", "eval.every=3", "checkpoint.keep_last=3", "threads=2",
        "ppo.lr=1e-4", "ppo.clip=0.3", "resume_allow_changes=[ppo.lr, ppo.clip]"])
    lock = open_run_dir(cfg)
    lock.release()
    changed = _jsonl(checkpointed_run / HISTORY)[0]["changed"]
    assert changed["ppo.lr"] == [1e-3, 1e-4] and changed["ppo.clip"] == [0.2, 0.3] and changed["iterations"] == [2, 7]
    for sections in (["resume_allow_changes=[ppo]"], ["resume_allow_changes=[ppo.*]"]):
        cfg = load_config(None, fast_overrides(tiny_model_dir, checkpointed_run) + ["resume=true", "ppo.lr=1e-4",
                                                                                     *sections])
        open_run_dir(cfg).release()
    cfg = load_config(None, fast_overrides(tiny_model_dir, checkpointed_run) + ["resume=true",
                                                                                 "resume_allow_changes=[ppo.lrr]"])
    with pytest.raises(ConfigError, match=r"'ppo.lrr' is not a config key or section \(did you mean ppo.lr\?\)"):
        open_run_dir(cfg)


def test_the_checkpoints_seed_and_prompts_consumed_must_match_the_config(make_cfg):
    cfg = make_cfg()
    check_resumed_state({"iteration": 3, "seed": 0, "prompts_consumed": 12}, cfg)
    with pytest.raises(RunDirError, match="seed 5, the config says seed=0"):
        check_resumed_state({"iteration": 3, "seed": 5, "prompts_consumed": 12}, cfg)
    with pytest.raises(RunDirError, match="24 prompts consumed in 3 iterations, but rollout.prompts_per_iter=4"):
        check_resumed_state({"iteration": 3, "seed": 0, "prompts_consumed": 24}, cfg)
    check_resumed_state({"iteration": 3, "seed": 0, "prompts_consumed": 24},
                        make_cfg("resume_allow_changes=[rollout.prompts_per_iter]"))


# ---------------------------------------------------------------------------------------------- 4. non-finite


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400", "nan"])
def test_non_finite_numbers_are_refused_for_every_float(cli_train, tmp_path, value):
    for key in ("ppo.lr", "rollout.temperature", "influence.threshold", "reward.truncated_reward"):
        rc, err = cli_train(tmp_path / "run", f"{key}={value}")
        assert rc == 2 and f"ippo: error: {key}=" in err and "must be a finite number" in err, err
    y = tmp_path / "big.yaml"
    y.write_text("ppo:\n  lr: 1e400\n")
    with pytest.raises(Exception, match="ppo.lr=inf: must be a finite number"):
        load_config(y, ["model.path=m", "data.train_path=d", "data.val_holdout=4"])


def _adamw(lr: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    params = list(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    return params, opt


def test_a_step_that_makes_weights_non_finite_is_undone_exactly():
    params, opt = _adamw(1e-3)
    opt.param_groups[0]["weight_decay"] = 0.0
    for p in params:
        p.grad = -torch.ones_like(p)
    opt.step()  # the optimizer has state; with the same gradient again the next step moves each weight by +lr
    with torch.no_grad():
        params[0].fill_(3.3e38)
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.param_groups[0]["lr"] = 5e37  # float32 overflows: 3.3e38 + 5e37 > 3.4e38
    assert step_guard.guarded_step(opt, params, step_guard.StepGuard(), 1.0) is False
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, state_before[k]), k


def test_an_ordinary_step_takes_no_copy(monkeypatch):
    def no_copy(*args):
        raise AssertionError("a copy was taken for a step that cannot overflow")
    monkeypatch.setattr(step_guard, "snapshot", no_copy)
    params, opt = _adamw(1e-3)
    guard = step_guard.StepGuard()
    assert step_guard.guarded_step(opt, params, guard, 1.0) is True
    assert 0 < guard.max_abs < 10
    with torch.no_grad():
        params[0][0, 0] = float("nan")
    assert step_guard.max_abs(params) != step_guard.max_abs(params)  # NaN is seen


def test_training_skips_a_step_that_poisons_the_weights_and_never_checkpoints_them(make_cfg, tmp_path, monkeypatch):
    real_step, calls = torch.optim.AdamW.step, []

    def poisoned_step(self, *args, **kwargs):  # the 2nd step of the run writes NaN into a weight
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    snapshots = []
    real_snapshot = step_guard.snapshot
    monkeypatch.setattr(step_guard, "may_overflow", lambda *a: True)  # this poisoning is no overflow: copy anyway
    monkeypatch.setattr(step_guard, "snapshot", lambda *a: snapshots.append(1) or real_snapshot(*a))
    run = tmp_path / "run"
    summary = train(make_cfg("influence.enabled=false", "iterations=1", run_dir=run))
    assert summary["stopped"] is None and snapshots
    m = _jsonl(run / "metrics.jsonl")
    assert m[0]["nonfinite_steps"] == 1 and m[0]["updates"] == len(calls) - 1
    from safetensors.torch import load_file
    weights = load_file(str(run / "checkpoints" / "iter_000001" / "policy.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


# ---------------------------------------------------------------------------------------------- 7. ranges


@pytest.mark.parametrize("override,message", [
    ("data.max_train_rows=-1", "data.max_train_rows=-1: must be >= 0 (0 = all rows)"),
    ("ppo.kl_coef=-1", "ppo.kl_coef=-1.0: must be >= 0 (0 = no KL term)"),
    ("ppo.micro_batch_size=16", "ppo.micro_batch_size=16 is larger than ppo.mini_batch_size=8"),
    ("threads=-2", "threads=-2: must be >= 0"),
    ("ppo.adam_betas=[0.9, 1.0]", "ppo.adam_betas=[0.9, 1.0]: must be in [0, 1)"),
    ("seed=-1", "seed=-1: must be in [0,"),
    ("eval.top_p=0", "eval.top_p=0.0: must be in (0, 1]"),
    ("model.lora_dropout=1", "model.lora_dropout=1.0: must be in [0, 1)"),
])
def test_numbers_out_of_range_are_refused_naming_the_key(cli_train, tmp_path, override, message):
    rc, err = cli_train(tmp_path / "run", override)
    assert rc == 2 and f"ippo: error: {message}" in err, err


def test_every_number_of_the_config_has_a_range():
    numeric = set()
    for key, tp in dotted_keys().items():
        args = set(typing.get_args(tp)) | {tp, *(typing.get_args(a) for a in typing.get_args(tp))} - {type(None)}
        flat = {a for a in args if isinstance(a, type)} | {x for a in args if isinstance(a, tuple) for x in a}
        if flat & {int, float}:
            numeric.add(key)
    assert numeric - set(RANGES) - RANGE_CHECKED_ELSEWHERE == set()
    assert set(RANGES) <= numeric and not set(RANGES) & RANGE_CHECKED_ELSEWHERE
