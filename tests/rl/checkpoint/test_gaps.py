"""Verification gaps beside the damage kinds of ``common.DAMAGE`` (issue 22, item 5), and what a checkpoint may
never be: written with non-finite weights, or left half-written on a full disk (items 4 and 8)."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

from ippo.rl.checkpoint import (
    CheckpointError,
    files,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    verify_run,
)

from .common import flip_tensor_bit, parts, restore, save


def _ckpt(run, it):
    return run / "checkpoints" / f"iter_{it:06d}"


def test_a_loadable_file_missing_from_the_manifest_is_damage(tmp_path):
    """(a) the manifest lost value.safetensors' entry and the file was damaged: it used to verify ok and load."""
    save(tmp_path, 1)
    save(tmp_path, 2)
    d = _ckpt(tmp_path, 2)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["files"]["value.safetensors"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    flip_tensor_bit(d / "value.safetensors")
    verdict = verify_checkpoint(d)
    assert verdict.status == "damaged" and "value.safetensors" in verdict.problem and "not in manifest" in verdict.problem
    messages = []
    assert restore(tmp_path, messages)[0]["iteration"] == 1 and "value.safetensors" in messages[0]
    (d / "notes.txt").write_text("a file the loader never reads is no damage")
    assert verify_checkpoint(_ckpt(tmp_path, 1)).status == "ok"


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/iter_000002", "/abs/iter_000002", "link"])
def test_latest_never_leads_outside_the_runs_checkpoints(tmp_path, pointer):
    """(b) ``latest`` naming another run's checkpoint: resume used to load it silently, verify to crash."""
    run, other = tmp_path / "run", tmp_path / "other"
    save(run, 1)
    save(other, 1)
    save(other, 2)
    root = run / "checkpoints"
    if pointer == "link":  # a checkpoint-looking name that is a link to the other run
        (root / "iter_000002").symlink_to(_ckpt(other, 2))
        pointer = "iter_000002"
    (root / "latest").write_text(pointer)
    messages = []
    state, policy = restore(run, messages)
    assert "iter_000002" in messages[0] and "trying every checkpoint" in messages[0]
    assert state["iteration"] == 1 and torch.equal(policy.weight, parts(1)[0].weight)  # this run's own
    lines, rc = verify_run(run)
    assert rc == 1 and any("note:" in line for line in lines)
    with pytest.raises(CheckpointError, match="not a checkpoint directory of this run|resolves outside"):
        latest_checkpoint(run)


def test_verify_and_resume_apply_one_rule_to_the_iteration(tmp_path):
    """(c) a checkpoint copied under another iteration's name: verify used to say ok while resume refused it."""
    save(tmp_path, 1)
    shutil.copytree(_ckpt(tmp_path, 1), _ckpt(tmp_path, 4))
    (tmp_path / "checkpoints" / "latest").write_text("iter_000004")
    verdict = verify_checkpoint(_ckpt(tmp_path, 4))
    assert verdict.status == "damaged" and "state.json" in verdict.problem and "iteration 1" in verdict.problem
    lines, rc = verify_run(tmp_path)
    assert rc == 1 and "iter_000004  damaged" in "\n".join(lines)
    messages = []
    assert restore(tmp_path, messages)[0]["iteration"] == 1 and "state.json" in messages[0]


def test_a_file_on_a_checkpoints_name_does_not_break_later_saves(tmp_path):
    """(d) checkpoints/iter_000002 is a file: resume falls back, and saving iteration 2 used to crash in the rename
    (NotADirectoryError)."""
    save(tmp_path, 1)
    (tmp_path / "checkpoints" / "iter_000002").write_text("not a checkpoint")
    (tmp_path / "checkpoints" / "latest").write_text("iter_000002")
    messages = []
    assert restore(tmp_path, messages)[0]["iteration"] == 1
    save(tmp_path, 2)
    assert verify_checkpoint(_ckpt(tmp_path, 2)).status == "ok" and verify_run(tmp_path)[1] == 0


def test_weights_with_nan_are_never_checkpointed(tmp_path):
    save(tmp_path, 1)
    policy, value, opt, sched = parts(2)
    with torch.no_grad():
        value.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"refusing to write checkpoint iter_000002 .*value tensor bias"):
        save_checkpoint(tmp_path, 2, policy=policy, value=value, optimizer=opt, scheduler=sched, state={},
                        trainable_only=False)
    assert not _ckpt(tmp_path, 2).exists() and (tmp_path / "checkpoints" / "latest").read_text() == "iter_000001"
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EROFS, "Read-only file system"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"),
])
@pytest.mark.parametrize("writer", ["save_file", "write_stream"])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_no_temp_dir(tmp_path, monkeypatch, failure, writer):
    save(tmp_path, 1)
    if writer == "save_file":  # safetensors' writer
        def fail(*args, **kwargs):
            raise failure
        monkeypatch.setattr(files, "save_file", fail)
    else:  # torch.save of the optimizer (the first file written through write_stream)
        real = files.write_stream

        def fail_stream(path, write):
            real(path, lambda f: f.write(b"partial"))
            raise failure
        monkeypatch.setattr(files, "write_stream", fail_stream)
        monkeypatch.setattr("ippo.rl.checkpoint.whole.write_stream", fail_stream)
    policy, value, opt, sched = parts(2)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 2, policy=policy, value=value, optimizer=opt, scheduler=sched, state={},
                        trainable_only=False)
    msg = str(e.value)
    assert "cannot write checkpoint iter_000002" in msg and "\n" not in msg and str(failure.args[-1])[:20] in msg
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"]  # no .tmp dir left on the disk
    assert (root / "latest").read_text() == "iter_000001"
