"""Checkpoints verify themselves: the manifest, verification of each kind of damage (and the fall-back on
restore), and `latest` moving only after the new checkpoint verifies."""

from __future__ import annotations

import json

import pytest
import torch

from ippo.rl.checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_dirs,
    manifest,
    sha256_file,
    verify_checkpoint,
)

from .common import DAMAGE, parts, restore, save, truncate


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    save(tmp_path, 1)
    d = tmp_path / "checkpoints" / "iter_000001"
    files = json.loads((d / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in d.iterdir() if p.name != "manifest.json")
    for name, rec in files.items():
        assert rec["bytes"] == (d / name).stat().st_size
        assert rec["sha256"] == sha256_file(d / name)
    assert verify_checkpoint(d).status == "ok"
    assert json.loads((d / "state.json").read_text())["checkpoint_format"] == FORMAT


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_damage_is_found_and_named_and_restore_falls_back(tmp_path, kind):
    name, damage = DAMAGE[kind]
    save(tmp_path, 1)
    save(tmp_path, 2)
    damage(tmp_path / "checkpoints" / "iter_000002" / name)
    verdict = verify_checkpoint(tmp_path / "checkpoints" / "iter_000002")
    assert verdict.status == "damaged" and name in verdict.problem and "\n" not in verdict.problem
    messages = []
    state, policy = restore(tmp_path, messages)
    assert state["iteration"] == 1
    assert torch.equal(policy.weight, parts(1)[0].weight)
    assert len(messages) == 2 and name in messages[0] and "falling back" in messages[0]
    assert "iter_000001" in messages[1]


def test_latest_moves_only_after_the_new_checkpoint_verifies(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real_fsync_dir = manifest.fsync_path

    def lose_data(path):  # the disk loses part of rng.pt after the manifest recorded it
        if path.name.startswith("iter_000002.tmp"):
            truncate(path / "rng.pt")
        real_fsync_dir(path)

    monkeypatch.setattr(manifest, "fsync_path", lose_data)  # the directory's fsync before its rename
    with pytest.raises(CheckpointError, match=r"iter_000002 does not verify .*rng\.pt"):
        save(tmp_path, 2, keep_last=1)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_000001"
    assert verify_checkpoint(tmp_path / "checkpoints" / "iter_000001").status == "ok"  # not pruned
    state, _ = restore(tmp_path, [])
    assert state["iteration"] == 1  # the unverified iter_2 is newer than latest: skipped


def test_keep_last_prunes_older_checkpoints_and_superseded_newer_ones(tmp_path):
    for it in (1, 2, 3, 4):
        save(tmp_path, it, keep_last=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["iter_000002", "iter_000003", "iter_000004"]
    save(tmp_path, 3, keep_last=3)  # the run went back to iteration 2 (resume=false, or a fall-back): 4 is stale
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["iter_000002", "iter_000003"]
    save(tmp_path, 1, keep_last=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["iter_000001"]


def test_keep_every_keeps_every_kth_checkpoint_for_good(tmp_path):
    """checkpoint.keep_every=3 (for ippo inspect): iter_3 and iter_6 survive keep_last=2; a superseded newer
    one goes all the same (a fall-back must never pick it)."""
    for it in range(1, 8):
        save(tmp_path, it, keep_last=2, keep_every=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["iter_000003", "iter_000006", "iter_000007"]
    save(tmp_path, 5, keep_last=1, keep_every=3)  # the run went back to iteration 4
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["iter_000003", "iter_000005"]


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    """Written by the previous ippo: no manifest, no checkpoint_format. Loaded unverified, and said so."""
    save(tmp_path, 1)
    d = tmp_path / "checkpoints" / "iter_000001"
    (d / "manifest.json").unlink()
    state = json.loads((d / "state.json").read_text())
    del state["checkpoint_format"]
    (d / "state.json").write_text(json.dumps(state))
    assert verify_checkpoint(d).status == "unverified"
    messages = []
    state, policy = restore(tmp_path, messages)
    assert state["iteration"] == 1 and torch.equal(policy.weight, parts(1)[0].weight)
    assert len(messages) == 1 and "unverified" in messages[0]
    truncate(d / "rng.pt")  # without a manifest a file that no longer parses is still found
    assert verify_checkpoint(d).status == "damaged"
