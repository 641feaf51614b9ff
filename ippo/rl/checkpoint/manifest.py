"""Each checkpoint's ``manifest.json`` (size and sha256 of every file), verification against it, and
the last steps of writing a checkpoint, which only a verified checkpoint passes.

Writing: every file goes to a temporary name, is fsynced, then ``os.replace``d; the manifest records
the sha256 of the bytes as they were written (safetensors writes its file itself: that one is hashed
right after its fsync); the directory is renamed into place (``rename_into_place``) only when all its
files are durable. The new checkpoint is then re-read and checked against its manifest
(``require_verified``), and only when it verifies does ``latest`` move to it and are older checkpoints
pruned (``advance_latest``).

Verifying: every file the manifest lists is present with the size and sha256 it records, and the
manifest lists every file the checkpoint's layout must have. Checkpoints written before manifests
existed (no ``manifest.json`` and no ``checkpoint_format`` in ``state.json``) are ``unverified``: the
atomic rename guarantees they are complete, but the best check left is that their files parse.
In a sharded checkpoint each rank verifies its own shard files and the files every rank reads
(``verify_share``), and ``agreed`` gives every rank the same finding.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ippo.rl.parallel import distributed as dist

from .files import CPU, CheckpointError, atomic_write_bytes, fsync_path, one_line, parse_file, sha256_file
from .layout import (
    CORE_FILES,
    FORMAT,
    MANIFEST,
    checkpoint_dirs,
    iteration_of,
    layout_of,
    shard_kind,
    shard_rank,
    sharded_files,
)


@dataclass(frozen=True)
class Verdict:
    """What ``verify_checkpoint`` found.

    status: ``ok`` (matches its manifest), ``unverified`` (written before manifests; its files parse, but
    damage inside them cannot be detected) or ``damaged``. problem: one line naming the file, or None.
    """

    path: Path
    status: str
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.status != "damaged"


def write_manifest(tmp: Path, iteration: int, files: dict[str, dict], **layout) -> None:
    manifest = {"checkpoint_format": FORMAT, "iteration": iteration, **layout, "files": files}
    atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())


def _read_manifest(path: Path) -> dict:
    """The manifest of ``path``, checked for form: it lists every file the checkpoint must have."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
                for r in files.values()):
            raise ValueError("'files' must map each file name to its bytes and sha256")
        world = manifest.get("world_size")  # sharded checkpoints only
        if world is not None and (type(world) is not int or world < 1):
            raise ValueError(f"'world_size' must be a positive integer, not {world!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{MANIFEST}: not a valid manifest ({one_line(e)})") from None
    for name in files:
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            raise CheckpointError(f"{MANIFEST}: lists {name!r}, which is not a file of the checkpoint")
    required = list(CORE_FILES) if world is None else sharded_files(world, any(shard_kind(n) == "value"
                                                                               for n in files))
    absent = [f for f in required if f not in files]
    if absent:
        raise CheckpointError(f"{MANIFEST}: lists no {absent[0]}")
    return manifest


def _check_against_manifest(path: Path, files: dict[str, dict]) -> None:
    """``files`` (name -> record, from the manifest) are on disk with the recorded size and sha256."""
    for name, rec in files.items():  # the cheap checks first: a missing or cut file needs no hashing
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{name}: missing (the manifest lists it)")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{name}: {size} bytes, the manifest says {rec['bytes']} (truncated or overwritten)")
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(files)))) as pool:  # hashlib releases the GIL
        digests = dict(zip(files, pool.map(sha256_file, [path / n for n in files])))
    for name, rec in files.items():
        if digests[name] != rec["sha256"]:
            raise CheckpointError(f"{name}: its sha256 differs from the manifest's (bytes changed on disk)")


def _check_unlisted(path: Path, files: dict[str, dict], rank: int | None = None) -> None:
    """No file the loader may read sits in ``path`` unlisted by the manifest (it would load unverified); with
    ``rank``, only the files that rank reads (its own shards and the shared files)."""
    for f in sorted(path.iterdir()):
        name = f.name
        if name in files or not (name in CORE_FILES or name == "value.safetensors" or shard_kind(name)):
            continue
        if rank is None or shard_rank(name) in (None, rank):
            raise CheckpointError(f"{name}: on disk but not in {MANIFEST} (it cannot be verified, and the loader "
                                  "would read it)")


def _check_iteration(path: Path, manifest: dict) -> None:
    """The manifest and state.json name the iteration of the directory they are in (one rule for verify and
    resume: a checkpoint renamed or copied to another iteration's name is damaged)."""
    it = iteration_of(path)
    if it is None:
        return
    parse_file(path, "state.json", CPU)  # a CheckpointError naming state.json when its iteration differs
    if manifest.get("iteration", it) != it:
        raise CheckpointError(f"{MANIFEST}: says iteration {manifest.get('iteration')!r}, the directory is {path.name}")


def _verified(path: Path, rank: int | None = None) -> None:
    """``path`` against its manifest: every listed file (for ``rank``: its share), nothing loadable unlisted, the
    iteration it names."""
    manifest = _read_manifest(path)
    files = manifest["files"]
    if rank is not None:
        files = {n: r for n, r in files.items() if shard_rank(n) in (None, rank)}
    _check_against_manifest(path, files)
    _check_unlisted(path, manifest["files"], rank)
    _check_iteration(path, manifest)


def _legacy_format(path: Path) -> int | None:
    """checkpoint_format in state.json (None for checkpoints written before manifests)."""
    try:
        return json.loads((path / "state.json").read_bytes()).get("checkpoint_format")
    except Exception:  # noqa: BLE001  -- an unreadable state.json is reported by the parse below
        return None


def verify_checkpoint(path: str | Path) -> Verdict:
    """Check one checkpoint directory against its manifest, reading every file (nothing is loaded)."""
    path = Path(path)
    try:
        if not path.is_dir():
            raise CheckpointError("the directory does not exist")
        if (path / MANIFEST).is_file():
            _verified(path)
            return Verdict(path, "ok")
        if _legacy_format(path) is not None:
            raise CheckpointError(f"{MANIFEST}: missing (state.json says this checkpoint was written with one)")
        if layout_of(path)[0] == "sharded":
            raise CheckpointError(f"{MANIFEST}: missing (a sharded checkpoint is always written with one)")
        # written before manifests: the best check left is that every file parses
        for name in CORE_FILES + (("value.safetensors",) if (path / "value.safetensors").exists() else ()):
            parse_file(path, name, CPU)
        return Verdict(path, "unverified")
    except CheckpointError as e:
        return Verdict(path, "damaged", str(e))
    except OSError as e:
        return Verdict(path, "damaged", one_line(e))


def verify_share(path: Path, rank: int) -> Verdict:
    """Rank ``rank``'s part of verifying a sharded checkpoint: its own shard files and the files every rank
    reads (the ranks together check every file once, in parallel; ``agreed`` combines their verdicts)."""
    try:
        if not path.is_dir():
            raise CheckpointError("the directory does not exist")
        if not (path / MANIFEST).is_file():
            raise CheckpointError(f"{MANIFEST}: missing (a sharded checkpoint is always written with one)")
        _verified(path, rank)
        return Verdict(path, "ok")
    except CheckpointError as e:
        return Verdict(path, "damaged", str(e))
    except OSError as e:
        return Verdict(path, "damaged", one_line(e))


def agreed(found):
    """What every rank acts on: the first rank's problem (a damaged Verdict, or a message), else rank 0's
    finding. The same on all ranks, so that they fall back in step. Identity in one process."""
    everyone = dist.all_gather_object(found)
    bad = [f for f in everyone if (f.problem if isinstance(f, Verdict) else f) is not None]
    return bad[0] if bad else everyone[0]


# ---------------------------------------------------------------------------------------------
# the last steps of writing: only a checkpoint that verifies becomes ``latest``


def rename_into_place(root: Path, tmp: Path, name: str) -> Path:
    """The fully written directory ``tmp`` becomes ``root/name``."""
    final = root / name
    fsync_path(tmp)
    if final.is_dir() and not final.is_symlink():  # a previous attempt got this far before dying, or a damaged one
        shutil.rmtree(final)
    elif final.exists() or final.is_symlink():  # a file (or link) squatting on the name: never a checkpoint
        final.unlink()
    os.replace(tmp, final)
    fsync_path(root)
    return final


def require_verified(verdict: Verdict, root: Path) -> None:
    if verdict.status != "ok":
        raise CheckpointError(f"checkpoint {verdict.path} does not verify right after it was written "
                              f"({verdict.problem}); {root / 'latest'} still names the previous checkpoint and "
                              "nothing was pruned")


def advance_latest(root: Path, final: Path, keep_last: int, keep_every: int = 0) -> None:
    """``latest`` names ``final`` (which verified), then prune."""
    atomic_write_bytes(root / "latest", final.name.encode())
    # prune: older checkpoints beyond keep_last, except every keep_every-th (kept for ``ippo inspect``); newer
    # ones, which this run has superseded (a run restarted with resume=false, or retracing after a fall-back)
    # and which a fall-back must never pick; temp dirs
    others = [p for p in checkpoint_dirs(root.parent) if p != final]
    older = [p for p in others if iteration_of(p) < iteration_of(final)]
    kept = older[max(0, len(older) - (max(1, keep_last) - 1)):]
    kept += [p for p in older if keep_every > 0 and iteration_of(p) % keep_every == 0 and p not in kept]
    for old in others:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
