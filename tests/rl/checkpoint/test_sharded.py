"""A sharded checkpoint's manifest and layout, written by one process (the 2-process runs are in
tests/rl/test_fsdp.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from ippo.rl.checkpoint import (
    SHARED_FILES,
    layout_of,
    layout_problem,
    shard_file,
    verify_checkpoint,
    write_shard,
)
from ippo.rl.checkpoint.files import write_stream
from ippo.rl.checkpoint.manifest import verify_share, write_manifest

from .common import truncate


def _fake_sharded(d: Path, world: int = 2, skip: str | None = None) -> None:
    """A sharded checkpoint's files and manifest, written by one process (plain tensors: nothing sharded)."""
    d.mkdir(parents=True)
    files = {}
    for kind in ("policy", "optimizer"):
        for r in range(world):
            name = shard_file(kind, r, world)
            files[name] = write_shard(d / name, {"w": torch.full((2,), float(r))})
    for name in SHARED_FILES:
        files[name] = write_stream(d / name, lambda f: f.write(b'{"iteration": 1}'))
    files.pop(skip, None)
    write_manifest(d, 1, files, world_size=world)


def test_a_sharded_manifest_must_list_every_shard_of_every_rank(tmp_path):
    d = tmp_path / "checkpoints" / "iter_000001"
    _fake_sharded(d)
    assert verify_checkpoint(d).status == "ok"
    assert layout_of(d) == ("sharded", 2) and layout_problem(d, 2) is None
    assert "dist.strategy=fsdp and 2 processes" in layout_problem(d, None)
    # rank 1 checks its own shards and the shared files; rank 0 does not read rank 1's
    truncate(d / shard_file("optimizer", 1, 2))
    assert verify_share(d, 0).status == "ok"
    v = verify_share(d, 1)
    assert v.status == "damaged" and "optimizer.shard-00001-of-00002.safetensors" in v.problem
    assert "optimizer.shard-00001-of-00002.safetensors" in verify_checkpoint(d).problem

    d2 = tmp_path / "checkpoints" / "iter_000002"
    _fake_sharded(d2, skip=shard_file("policy", 1, 2))  # rank 1's policy shard not in the manifest
    v = verify_checkpoint(d2)
    assert v.status == "damaged" and "lists no policy.shard-00001-of-00002.safetensors" in v.problem
    (d2 / "manifest.json").unlink()  # a sharded checkpoint without manifest is never loaded unverified
    assert verify_checkpoint(d2).status == "damaged" and "manifest.json: missing" in verify_checkpoint(d2).problem
    assert layout_of(d2) == ("sharded", 2)  # told by the file names when the manifest is gone
