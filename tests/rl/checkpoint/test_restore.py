"""Reading checkpoints back: a damaged only-checkpoint or one that does not fit the run is a one-line error,
a missing `latest` falls back to the directories, `ippo verify` reports, `ippo eval` reads only what verifies.
The trainer-level fall-back tests are in tests/rl/test_checkpoint_damage.py."""

from __future__ import annotations

import shutil

import pytest
import torch

from ippo import cli
from ippo.rl.checkpoint import (
    CheckpointError,
    load_policy_into,
    restore_checkpoint,
    verified_policy_checkpoint,
    verify_run,
)

from .common import DAMAGE, flip_tensor_bit, parts, restore, save, truncate


@pytest.mark.parametrize("kind", ["truncated policy", "missing value", "empty optimizer"])
def test_a_damaged_only_checkpoint_is_a_one_line_error(tmp_path, kind):
    name, damage = DAMAGE[kind]
    save(tmp_path, 1, keep_last=1)
    damage(tmp_path / "checkpoints" / "iter_000001" / name)
    messages = []
    with pytest.raises(CheckpointError) as e:
        restore(tmp_path, messages)
    assert name in str(e.value) and "iter_000001" in str(e.value) and "\n" not in str(e.value)
    assert messages == []  # the error says it all


def test_load_errors_after_verification_are_named_and_fall_back(tmp_path):
    """A checkpoint that verifies but does not fit the run (e.g. another model) is not a traceback either."""
    save(tmp_path, 1)
    d2 = tmp_path / "checkpoints" / "iter_000002"
    shutil.copytree(tmp_path / "checkpoints" / "iter_000001", d2)  # iter_2 says iteration 1: wrong
    (tmp_path / "checkpoints" / "latest").write_text("iter_000002")
    messages = []
    state, _ = restore(tmp_path, messages)
    assert state["iteration"] == 1 and "state.json" in messages[0] and "iteration 1" in messages[0]

    policy, value, opt, sched = torch.nn.Linear(5, 3), torch.nn.Linear(4, 1), *parts(0)[2:]
    with pytest.raises(CheckpointError, match=r"policy\.safetensors: does not fit this run"):
        restore_checkpoint(tmp_path, policy=policy, value=value, optimizer=opt, scheduler=sched,
                           trainable_only=False, device=torch.device("cpu"), report=lambda m: None)


def test_missing_or_broken_latest_pointer_falls_back_to_the_directories(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").unlink()
    messages = []
    state, _ = restore(tmp_path, messages)
    assert state["iteration"] == 2 and "latest is missing" in messages[0]
    (tmp_path / "checkpoints" / "latest").write_text("iter_000007")
    messages = []
    state, _ = restore(tmp_path, messages)
    assert state["iteration"] == 2 and "iter_000007" in messages[0]
    assert restore(tmp_path / "fresh", [])[0] is None  # no checkpoint yet: a fresh start


def test_ippo_verify_prints_each_checkpoint_and_exits_nonzero_when_latest_is_damaged(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 1
    assert "no checkpoints" in capsys.readouterr().out
    save(tmp_path, 1)
    save(tmp_path, 2)
    assert cli.main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") == 2 and "would load iter_000002" in out

    truncate(tmp_path / "checkpoints" / "iter_000002" / "policy.safetensors")
    assert cli.main(["verify", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    (bad,) = [x for x in lines if "iter_000002" in x and "damaged" in x]
    assert "latest" in bad and "policy.safetensors" in bad and "truncated" in bad
    assert "would load iter_000001 (the newest that verifies)" in lines[-1]

    flip_tensor_bit(tmp_path / "checkpoints" / "iter_000001" / "policy.safetensors")
    lines, rc = verify_run(tmp_path)
    assert rc == 1 and "would stop" in lines[-1]


def test_eval_reads_only_a_checkpoint_that_verifies(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    d2 = tmp_path / "checkpoints" / "iter_000002"
    flip_tensor_bit(d2 / "policy.safetensors")
    messages = []
    assert verified_policy_checkpoint(tmp_path, report=messages.append).name == "iter_000001"
    assert "iter_000002" in messages[0] and "policy.safetensors" in messages[0]
    with pytest.raises(CheckpointError, match=r"iter_000002 is damaged: policy\.safetensors"):
        verified_policy_checkpoint(tmp_path, explicit=d2)
    policy = torch.nn.Linear(4, 3)
    load_policy_into(tmp_path / "checkpoints" / "iter_000001", policy, False, torch.device("cpu"))
    assert torch.equal(policy.weight, parts(1)[0].weight)
    assert verified_policy_checkpoint(tmp_path / "none") is None
