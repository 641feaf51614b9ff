"""Checkpoints verify themselves: the manifest, verification of each kind of damage, the fall-back on restore,
and `latest` moving only after the new checkpoint verifies. Tiny modules, no training (the trainer-level
fall-back tests are in tests/rl/test_checkpoint_damage.py)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import ippo.rl.checkpoint as ck
from ippo import cli
from ippo.rl.checkpoint import (
    CheckpointError,
    restore_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    verify_run,
)


def _parts(seed: int):
    torch.manual_seed(seed)
    policy, value = torch.nn.Linear(4, 3), torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=0.1)
    (policy(torch.randn(2, 4)).sum() + value(torch.randn(2, 4)).sum()).backward()
    opt.step()  # the optimizer has state to save
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return policy, value, opt, sched


def _save(run: Path, it: int, keep_last: int = 2):
    policy, value, opt, sched = _parts(it)
    save_checkpoint(run, it, policy=policy, value=value, optimizer=opt, scheduler=sched, state={"stopped": None},
                    trainable_only=False, keep_last=keep_last)
    return policy


def _restore(run: Path, messages: list[str]):
    policy, value, opt, sched = _parts(99)
    state = restore_checkpoint(run, policy=policy, value=value, optimizer=opt, scheduler=sched,
                               trainable_only=False, device=torch.device("cpu"), report=messages.append)
    return state, policy


def _truncate(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def _flip_tensor_bit(f: Path) -> None:
    """Flip the lowest bit of one byte inside the tensor data (after safetensors' header)."""
    data = bytearray(f.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start + (len(data) - start) // 2] ^= 0x01
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated policy": ("policy.safetensors", _truncate),
    "flipped tensor bit": ("policy.safetensors", _flip_tensor_bit),
    "missing value": ("value.safetensors", Path.unlink),
    "broken state.json": ("state.json", lambda f: f.write_text('{"iteration": 2, "stopp')),
    "empty optimizer": ("optimizer.pt", lambda f: f.write_bytes(b"")),
    "truncated rng": ("rng.pt", _truncate),
    "missing manifest": ("manifest.json", Path.unlink),
    "broken manifest": ("manifest.json", lambda f: f.write_text("{")),
}


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    _save(tmp_path, 1)
    d = tmp_path / "checkpoints" / "iter_000001"
    manifest = json.loads((d / "manifest.json").read_text())
    files = manifest["files"]
    assert sorted(files) == sorted(p.name for p in d.iterdir() if p.name != "manifest.json")
    for name, rec in files.items():
        assert rec["bytes"] == (d / name).stat().st_size
        assert rec["sha256"] == ck.sha256_file(d / name)
    assert verify_checkpoint(d).status == "ok"
    assert json.loads((d / "state.json").read_text())["checkpoint_format"] == ck.FORMAT


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_damage_is_found_and_named_and_restore_falls_back(tmp_path, kind):
    name, damage = DAMAGE[kind]
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    damage(tmp_path / "checkpoints" / "iter_000002" / name)
    verdict = verify_checkpoint(tmp_path / "checkpoints" / "iter_000002")
    assert verdict.status == "damaged" and name in verdict.problem and "\n" not in verdict.problem
    messages = []
    state, policy = _restore(tmp_path, messages)
    assert state["iteration"] == 1
    assert torch.equal(policy.weight, _parts(1)[0].weight)
    assert len(messages) == 2 and name in messages[0] and "falling back" in messages[0]
    assert "iter_000001" in messages[1]


@pytest.mark.parametrize("kind", ["truncated policy", "missing value", "empty optimizer"])
def test_a_damaged_only_checkpoint_is_a_one_line_error(tmp_path, kind):
    name, damage = DAMAGE[kind]
    _save(tmp_path, 1, keep_last=1)
    damage(tmp_path / "checkpoints" / "iter_000001" / name)
    messages = []
    with pytest.raises(CheckpointError) as e:
        _restore(tmp_path, messages)
    assert name in str(e.value) and "iter_000001" in str(e.value) and "\n" not in str(e.value)
    assert messages == []  # the error says it all


def test_load_errors_after_verification_are_named_and_fall_back(tmp_path):
    """A checkpoint that verifies but does not fit the run (e.g. another model) is not a traceback either."""
    _save(tmp_path, 1)
    d2 = tmp_path / "checkpoints" / "iter_000002"
    shutil.copytree(tmp_path / "checkpoints" / "iter_000001", d2)  # iter_2 says iteration 1: wrong
    (tmp_path / "checkpoints" / "latest").write_text("iter_000002")
    messages = []
    state, _ = _restore(tmp_path, messages)
    assert state["iteration"] == 1 and "state.json" in messages[0] and "iteration 1" in messages[0]

    policy, value, opt, sched = torch.nn.Linear(5, 3), torch.nn.Linear(4, 1), *_parts(0)[2:]
    with pytest.raises(CheckpointError, match=r"policy\.safetensors: does not fit this run"):
        restore_checkpoint(tmp_path, policy=policy, value=value, optimizer=opt, scheduler=sched,
                           trainable_only=False, device=torch.device("cpu"), report=lambda m: None)


def test_latest_moves_only_after_the_new_checkpoint_verifies(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real_fsync_dir = ck.fsync_path

    def lose_data(path):  # the disk loses part of rng.pt after the manifest recorded it
        if path.name.startswith("iter_000002.tmp"):
            _truncate(path / "rng.pt")
        real_fsync_dir(path)

    monkeypatch.setattr(ck, "fsync_path", lose_data)
    with pytest.raises(CheckpointError, match=r"iter_000002 does not verify .*rng\.pt"):
        _save(tmp_path, 2, keep_last=1)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_000001"
    assert verify_checkpoint(tmp_path / "checkpoints" / "iter_000001").status == "ok"  # not pruned
    state, _ = _restore(tmp_path, [])
    assert state["iteration"] == 1  # the unverified iter_2 is newer than latest: skipped


def test_keep_last_prunes_older_checkpoints_and_superseded_newer_ones(tmp_path):
    for it in (1, 2, 3, 4):
        _save(tmp_path, it, keep_last=3)
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["iter_000002", "iter_000003", "iter_000004"]
    _save(tmp_path, 3, keep_last=3)  # the run went back to iteration 2 (resume=false, or a fall-back): 4 is stale
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["iter_000002", "iter_000003"]
    _save(tmp_path, 1, keep_last=1)
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["iter_000001"]


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    """Written by the previous ippo: no manifest, no checkpoint_format. Loaded unverified, and said so."""
    _save(tmp_path, 1)
    d = tmp_path / "checkpoints" / "iter_000001"
    (d / "manifest.json").unlink()
    state = json.loads((d / "state.json").read_text())
    del state["checkpoint_format"]
    (d / "state.json").write_text(json.dumps(state))
    assert verify_checkpoint(d).status == "unverified"
    messages = []
    state, policy = _restore(tmp_path, messages)
    assert state["iteration"] == 1 and torch.equal(policy.weight, _parts(1)[0].weight)
    assert len(messages) == 1 and "unverified" in messages[0]
    _truncate(d / "rng.pt")  # without a manifest a file that no longer parses is still found
    assert verify_checkpoint(d).status == "damaged"


def test_missing_or_broken_latest_pointer_falls_back_to_the_directories(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").unlink()
    messages = []
    state, _ = _restore(tmp_path, messages)
    assert state["iteration"] == 2 and "latest is missing" in messages[0]
    (tmp_path / "checkpoints" / "latest").write_text("iter_000007")
    messages = []
    state, _ = _restore(tmp_path, messages)
    assert state["iteration"] == 2 and "iter_000007" in messages[0]
    assert _restore(tmp_path / "fresh", [])[0] is None  # no checkpoint yet: a fresh start


def test_ippo_verify_prints_each_checkpoint_and_exits_nonzero_when_latest_is_damaged(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 1
    assert "no checkpoints" in capsys.readouterr().out
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    assert cli.main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") == 2 and "would load iter_000002" in out

    _truncate(tmp_path / "checkpoints" / "iter_000002" / "policy.safetensors")
    assert cli.main(["verify", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    (bad,) = [x for x in lines if "iter_000002" in x and "damaged" in x]
    assert "latest" in bad and "policy.safetensors" in bad and "truncated" in bad
    assert "would load iter_000001 (the newest that verifies)" in lines[-1]

    _flip_tensor_bit(tmp_path / "checkpoints" / "iter_000001" / "policy.safetensors")
    lines, rc = verify_run(tmp_path)
    assert rc == 1 and "would stop" in lines[-1]


def test_eval_reads_only_a_checkpoint_that_verifies(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    d2 = tmp_path / "checkpoints" / "iter_000002"
    _flip_tensor_bit(d2 / "policy.safetensors")
    messages = []
    assert ck.verified_policy_checkpoint(tmp_path, report=messages.append).name == "iter_000001"
    assert "iter_000002" in messages[0] and "policy.safetensors" in messages[0]
    with pytest.raises(CheckpointError, match=r"iter_000002 is damaged: policy\.safetensors"):
        ck.verified_policy_checkpoint(tmp_path, explicit=d2)
    policy = torch.nn.Linear(4, 3)
    ck.load_policy_into(tmp_path / "checkpoints" / "iter_000001", policy, False, torch.device("cpu"))
    assert torch.equal(policy.weight, _parts(1)[0].weight)
    assert ck.verified_policy_checkpoint(tmp_path / "none") is None


def test_rng_and_scheduler_states_are_read_to_the_cpu_whatever_the_run_device(tmp_path):
    """torch.set_rng_state takes a CPU byte tensor: a GPU run's resume must not map rng.pt onto its device
    (only the optimizer state goes there). "meta" stands in for cuda on this CPU machine."""
    _save(tmp_path, 1)
    d = tmp_path / "checkpoints" / "iter_000001"
    rng = ck._parse(d, "rng.pt", torch.device("meta"))
    assert rng["torch"].device.type == "cpu" and rng["numpy"][1].device.type == "cpu"
    ck.set_rng_state(rng)
    assert ck._parse(d, "optimizer.pt", torch.device("meta"))["state"][0]["exp_avg"].device.type == "meta"


def _fake_sharded(d: Path, world: int = 2, skip: str | None = None) -> None:
    """A sharded checkpoint's files and manifest, written by one process (plain tensors: nothing sharded)."""
    d.mkdir(parents=True)
    files = {}
    for kind in ("policy", "optimizer"):
        for r in range(world):
            name = ck.shard_file(kind, r, world)
            files[name] = ck.write_shard(d / name, {"w": torch.full((2,), float(r))})
    for name in ck.SHARED_FILES:
        files[name] = ck._write_stream(d / name, lambda f: f.write(b'{"iteration": 1}'))
    files.pop(skip, None)
    ck._write_manifest(d, 1, files, world_size=world)


def test_a_sharded_manifest_must_list_every_shard_of_every_rank(tmp_path):
    d = tmp_path / "checkpoints" / "iter_000001"
    _fake_sharded(d)
    assert verify_checkpoint(d).status == "ok"
    assert ck.layout_of(d) == ("sharded", 2) and ck.layout_problem(d, 2) is None
    assert "dist.strategy=fsdp and 2 processes" in ck.layout_problem(d, None)
    # rank 1 checks its own shards and the shared files; rank 0 does not read rank 1's
    _truncate(d / ck.shard_file("optimizer", 1, 2))
    assert ck._verify_share(d, 0).status == "ok"
    v = ck._verify_share(d, 1)
    assert v.status == "damaged" and "optimizer.shard-00001-of-00002.safetensors" in v.problem
    assert "optimizer.shard-00001-of-00002.safetensors" in verify_checkpoint(d).problem

    d2 = tmp_path / "checkpoints" / "iter_000002"
    _fake_sharded(d2, skip=ck.shard_file("policy", 1, 2))  # rank 1's policy shard not in the manifest
    v = verify_checkpoint(d2)
    assert v.status == "damaged" and "lists no policy.shard-00001-of-00002.safetensors" in v.problem
    (d2 / "manifest.json").unlink()  # a sharded checkpoint without manifest is never loaded unverified
    assert verify_checkpoint(d2).status == "damaged" and "manifest.json: missing" in verify_checkpoint(d2).problem
    assert ck.layout_of(d2) == ("sharded", 2)  # told by the file names when the manifest is gone
