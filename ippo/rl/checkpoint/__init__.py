"""Atomic checkpoints that verify themselves: a run killed at any instant resumes from the last complete
one, and a damaged checkpoint is found before anything is loaded from it.

Layout under ``run_dir/checkpoints``::

    iter_000012/          complete checkpoint (written as iter_000012.tmp-<pid>, then renamed)
        policy.safetensors  value.safetensors  optimizer.pt  scheduler.pt  rng.pt  state.json
        manifest.json     size and sha256 of each file above (written last)
    latest                text file naming the newest checkpoint that verified on disk (replaced atomically)

A run sharded over W > 1 processes (``dist.strategy=fsdp``) writes each rank's part of the weights and
optimizer state instead of the whole-model files (section "sharded checkpoints" below)::

    iter_000012/
        policy.shard-RRRRR-of-WWWWW.safetensors  value.shard-...  optimizer.shard-...   one of each per rank
        optimizer.pt  scheduler.pt  rng.pt  state.json  manifest.json                    written by rank 0

Its manifest lists every shard file of every rank (size and sha256, each recorded by the rank that wrote
it) and ``world_size``; it is verified before ``latest`` moves and before a resume loads anything, as
a whole checkpoint is.

Writing: every file goes to a temporary name, is fsynced, then ``os.replace``d; the manifest records
the sha256 of the bytes as they were written (safetensors writes its file itself: that one is hashed
right after its fsync); the directory is renamed only when all its files are durable. The new
checkpoint is then re-read and checked against its manifest, and only when it verifies does
``latest`` move to it and are older checkpoints pruned (``keep_last``).

Resuming (``restore_checkpoint``): the checkpoint ``latest`` names, then older ones, newest first.
Each is verified (every file present, with the size and sha256 its manifest records) before any of
its files is read, every file is parsed before any live object changes, and any failure is reported
in one line naming the file; the run then falls back to the next one, or stops with a one-line
``CheckpointError`` when none loads. Checkpoints written before manifests existed (no
``manifest.json`` and no ``checkpoint_format`` in ``state.json``) load with a warning: the atomic
rename guarantees they are complete, but damage inside them cannot be detected. A checkpoint of the
other layout (sharded vs whole) or of another number of processes stops the resume at once with a
one-line error (the older checkpoints of the run were written by the same launch). In a run of several
processes rank 0 lists the candidates and every rank's findings are gathered, so that all ranks fall
back to the same checkpoint.

Tensors are stored with safetensors or ``torch.save`` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT = 1  # checkpoint_format in state.json and the manifest; absent = written before manifests
CORE_FILES = ("policy.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
# a sharded checkpoint's files besides the shards (rank 0 writes them, every rank reads them)
SHARED_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
CPU = torch.device("cpu")
_CHUNK = 1 << 20

Report = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message is one line naming the file."""


def warn(message: str) -> None:
    print(f"ippo: warning: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {msg[:300] + '...' if len(msg) > 300 else msg}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class _HashingFile:
    """A binary file that hashes what passes through ``write``."""

    def __init__(self, f):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha256.update(b)
        self.size += memoryview(b).nbytes
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_stream(path: Path, write: Callable[[Any], None]) -> dict:
    """``write(file)`` into a temp file, fsync, move into place; the record of the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        hf = _HashingFile(f)
        write(hf)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": hf.size, "sha256": hf.sha256.hexdigest()}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """safetensors writes the file itself (no copy of the tensors in memory): hash it after the fsync."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def state_tensors(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """CPU copies (so tied weights do not trip safetensors' shared-memory check)."""
    named = model.named_parameters() if trainable_only else model.state_dict().items()
    out = {}
    for k, v in named:
        if trainable_only and not v.requires_grad:
            continue
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def load_tensors_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], trainable_only: bool) -> None:
    if trainable_only:
        params = dict(model.named_parameters())
        missing = [k for k, p in params.items() if p.requires_grad and k not in tensors]
        if missing:
            raise RuntimeError(f"checkpoint lacks trainable tensors: {missing[:5]}")
        unknown = [k for k in tensors if k not in params]
        if unknown:
            raise RuntimeError(f"checkpoint has tensors the model lacks: {unknown[:5]}")
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)
    else:
        model.load_state_dict(tensors, strict=True)


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    py = st["python"]
    np_st = st["numpy"]
    # plain containers only, so the file loads with weights_only=True
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_st[0], torch.from_numpy(np_st[1].astype(np.int64)), int(np_st[2]), int(np_st[3]),
                  float(np_st[4])],
        "torch": st["torch"],
        **({"cuda": st["cuda"]} if "cuda" in st else {}),
    }


def set_rng_state(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------
# writing


def iteration_of(path: Path) -> int | None:
    """``iter_000012`` -> 12; None for anything else (temp dirs of writers included)."""
    num = path.name.removeprefix("iter_")
    return int(num) if num != path.name and num.isdigit() else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint directories (complete or damaged), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None]
    return sorted(found, key=iteration_of)


def save_checkpoint(run_dir: str | Path, iteration: int, *, policy: torch.nn.Module,
                    value: torch.nn.Module | None, optimizer, scheduler, state: dict, trainable_only: bool,
                    keep_last: int = 2) -> Path:
    """Write checkpoint ``iteration`` (= iterations completed) atomically, verify it, then prune older ones.

    Raises ``CheckpointError`` when the written checkpoint does not verify; ``latest`` then still names
    the previous one and nothing is pruned.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:06d}"
    final = root / name
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {"policy.safetensors": _write_safetensors(tmp / "policy.safetensors",
                                                      state_tensors(policy, trainable_only))}
    if value is not None:
        files["value.safetensors"] = _write_safetensors(tmp / "value.safetensors", state_tensors(value, trainable_only))
    files["optimizer.pt"] = _write_stream(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
    files["scheduler.pt"] = _write_stream(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
    files["rng.pt"] = _write_stream(tmp / "rng.pt", lambda f: torch.save(rng_state(), f))
    state_bytes = json.dumps({"iteration": iteration, "checkpoint_format": FORMAT, **state}, indent=1).encode()
    files["state.json"] = _write_stream(tmp / "state.json", lambda f: f.write(state_bytes))
    _write_manifest(tmp, iteration, files)
    _require_verified(verify_checkpoint(_rename_into_place(root, tmp, name)), root)
    _advance_latest(root, final, keep_last)
    return final


def _write_manifest(tmp: Path, iteration: int, files: dict[str, dict], **layout) -> None:
    manifest = {"checkpoint_format": FORMAT, "iteration": iteration, **layout, "files": files}
    atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())


def _rename_into_place(root: Path, tmp: Path, name: str) -> Path:
    """The fully written directory ``tmp`` becomes ``root/name``."""
    final = root / name
    fsync_path(tmp)
    if final.exists():  # a previous attempt got this far before dying, or a damaged one: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    return final


def _require_verified(verdict: Verdict, root: Path) -> None:
    if verdict.status != "ok":
        raise CheckpointError(f"checkpoint {verdict.path} does not verify right after it was written "
                              f"({verdict.problem}); {root / 'latest'} still names the previous checkpoint and "
                              "nothing was pruned")


def _advance_latest(root: Path, final: Path, keep_last: int) -> None:
    """``latest`` names ``final`` (which verified), then prune."""
    atomic_write_bytes(root / "latest", final.name.encode())
    # prune: older checkpoints beyond keep_last; newer ones, which this run has superseded (a run restarted
    # with resume=false, or retracing after a fall-back) and which a fall-back must never pick; temp dirs
    others = [p for p in checkpoint_dirs(root.parent) if p != final]
    older = [p for p in others if iteration_of(p) < iteration_of(final)]
    kept = older[max(0, len(older) - (max(1, keep_last) - 1)):]
    for old in others:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# verifying


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
        raise CheckpointError(f"{MANIFEST}: not a valid manifest ({_one_line(e)})") from None
    for name in files:
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            raise CheckpointError(f"{MANIFEST}: lists {name!r}, which is not a file of the checkpoint")
    required = list(CORE_FILES) if world is None else _sharded_files(world, any(_shard_kind(n) == "value"
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
            _check_against_manifest(path, _read_manifest(path)["files"])
            return Verdict(path, "ok")
        if _legacy_format(path) is not None:
            raise CheckpointError(f"{MANIFEST}: missing (state.json says this checkpoint was written with one)")
        if layout_of(path)[0] == "sharded":
            raise CheckpointError(f"{MANIFEST}: missing (a sharded checkpoint is always written with one)")
        # written before manifests: the best check left is that every file parses
        for name in CORE_FILES + (("value.safetensors",) if (path / "value.safetensors").exists() else ()):
            _parse(path, name, CPU)
        return Verdict(path, "unverified")
    except CheckpointError as e:
        return Verdict(path, "damaged", str(e))
    except OSError as e:
        return Verdict(path, "damaged", _one_line(e))


def _verify_share(path: Path, rank: int) -> Verdict:
    """Rank ``rank``'s part of verifying a sharded checkpoint: its own shard files and the files every rank
    reads (the ranks together check every file once, in parallel; ``_agreed`` combines their verdicts)."""
    try:
        if not path.is_dir():
            raise CheckpointError("the directory does not exist")
        if not (path / MANIFEST).is_file():
            raise CheckpointError(f"{MANIFEST}: missing (a sharded checkpoint is always written with one)")
        files = _read_manifest(path)["files"]
        _check_against_manifest(path, {n: r for n, r in files.items() if _shard_rank(n) in (None, rank)})
        return Verdict(path, "ok")
    except CheckpointError as e:
        return Verdict(path, "damaged", str(e))
    except OSError as e:
        return Verdict(path, "damaged", _one_line(e))


def _agreed(found):
    """What every rank acts on: the first rank's problem (a damaged Verdict, or a message), else rank 0's
    finding. The same on all ranks, so that they fall back in step. Identity in one process."""
    from ippo.rl.parallel import distributed as dist

    everyone = dist.all_gather_object(found)
    bad = [f for f in everyone if (f.problem if isinstance(f, Verdict) else f) is not None]
    return bad[0] if bad else everyone[0]


# ---------------------------------------------------------------------------------------------
# loading


def _state_json(data: bytes, path: Path) -> dict:
    state = json.loads(data)
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise TypeError("expected an object with an integer 'iteration'")
    if iteration_of(path) is not None and state["iteration"] != iteration_of(path):
        raise ValueError(f"it says iteration {state['iteration']}, the directory is {path.name}")
    return state


def _parse(path: Path, name: str, device: torch.device) -> Any:
    """Read and decode one file of a checkpoint; any failure becomes a CheckpointError naming it."""
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"{name}: missing")
    try:
        if name.endswith(".safetensors"):
            return load_file(str(f), device=str(device))
        if name == "state.json":
            return _state_json(f.read_bytes(), path)
        # optimizer state goes to the run's device; RNG states must stay on the CPU (torch.set_rng_state
        # and torch.cuda.set_rng_state_all take CPU byte tensors), and so does the scheduler's state
        return torch.load(f, map_location=device if name == "optimizer.pt" else CPU, weights_only=True)
    except Exception as e:  # noqa: BLE001  -- safetensors, zip, pickle, JSON: all mean "this file is bad"
        raise CheckpointError(f"{name}: cannot be read ({_one_line(e)})") from None


def _apply(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  -- e.g. a checkpoint of another model or config
        raise CheckpointError(f"{name}: does not fit this run ({_one_line(e)})") from None


def _load(path: Path, *, policy, value, optimizer, scheduler, trainable_only: bool, device: torch.device) -> dict:
    """Parse every file, then restore weights, optimizer, scheduler and RNG states; returns state.json."""
    parsed = {name: _parse(path, name, device) for name in
              ("policy.safetensors", *(("value.safetensors",) if value is not None else ()),
               "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")}
    # every file decoded: only now do live objects change (a failure below is overwritten by the fallback)
    _apply("policy.safetensors", lambda: load_tensors_into(policy, parsed["policy.safetensors"], trainable_only))
    if value is not None:
        _apply("value.safetensors", lambda: load_tensors_into(value, parsed["value.safetensors"], trainable_only))
    _apply("optimizer.pt", lambda: optimizer.load_state_dict(parsed["optimizer.pt"]))
    _apply("scheduler.pt", lambda: scheduler.load_state_dict(parsed["scheduler.pt"]))
    _apply("rng.pt", lambda: set_rng_state(parsed["rng.pt"]))
    return parsed["state.json"]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory ``latest`` names (the newest checkpoint that verified when written), unchecked."""
    root = Path(run_dir) / "checkpoints"
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    path = root / ptr.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{ptr} names {path}, which is incomplete")
    return path


def resume_candidates(run_dir: str | Path) -> tuple[list[Path], str | None]:
    """Checkpoints to try, newest first: the one ``latest`` names, then older ones; and a note when
    ``latest`` is missing or broken (then every checkpoint directory is a candidate).

    Directories newer than ``latest`` never verified when written (the writer died first): skipped.
    """
    root = Path(run_dir) / "checkpoints"
    dirs = checkpoint_dirs(run_dir)
    ptr = root / "latest"
    note = None
    try:
        named = root / ptr.read_text().strip()
        if iteration_of(named) is None or not named.is_dir():
            note = f"{ptr} names {named.name!r}, which is not a checkpoint directory; trying every checkpoint"
    except FileNotFoundError:
        if not dirs:
            return [], None  # a run that has not checkpointed yet
        note = f"{ptr} is missing; trying every checkpoint directory, newest first"
    except (OSError, UnicodeDecodeError) as e:
        note = f"{ptr} cannot be read ({_one_line(e)}); trying every checkpoint directory, newest first"
    if note is not None:
        return dirs[::-1], note
    return [named] + [p for p in dirs[::-1] if iteration_of(p) < iteration_of(named)], None


def restore_checkpoint(run_dir: str | Path, *, policy: torch.nn.Module, value: torch.nn.Module | None, optimizer,
                       scheduler, trainable_only: bool, device: torch.device, report: Report = warn,
                       sharded: bool = False) -> dict | None:
    """Resume: load the newest checkpoint that verifies and loads; returns its ``state.json``.

    None when the run has no checkpoint yet. Every damaged checkpoint is reported through ``report`` in
    one line naming the file, and so is the fall-back; ``CheckpointError`` (one line) when the run has
    checkpoints but none of them loads, or at once when the newest one tried was written with the other
    layout or by another number of processes.

    In a run of several processes every rank calls this (it holds collectives): rank 0 lists the
    candidates, and each step's findings are gathered (``_agreed``) so that all ranks fall back
    together. ``sharded`` (``dist.strategy=fsdp``): each rank verifies its own shard files and the files
    every rank reads, then loads its own shards.
    """
    from ippo.rl.parallel import distributed as dist

    root = Path(run_dir) / "checkpoints"
    world = dist.world_size() if sharded else None
    candidates, note = dist.broadcast_object(resume_candidates(run_dir) if dist.is_main() else None)
    if note:
        report(note)
    failures = []
    for i, path in enumerate(candidates):
        mismatch = _agreed(layout_problem(path, world))
        if mismatch is not None:
            raise CheckpointError(mismatch)
        verdict = _agreed(_verify_share(path, dist.rank()) if sharded else verify_checkpoint(path))
        problem = verdict.problem
        if verdict.usable:
            try:
                state = (_load_sharded if sharded else _load)(path, policy=policy, value=value, optimizer=optimizer,
                                                              scheduler=scheduler, trainable_only=trainable_only,
                                                              device=device)
            except CheckpointError as e:
                problem = str(e)
            problem = _agreed(problem)  # a rank that could not load: every rank falls back
        if problem is None:
            if verdict.status == "unverified":
                report(f"checkpoint {path} has no {MANIFEST} (written by an older ippo): loaded it unverified")
            if failures:
                report(f"resuming from {path} (iteration {state['iteration']}) instead: the newest checkpoint "
                       f"that verifies and loads")
            return state
        failures.append(f"{path.name}: {problem}")
        if i + 1 < len(candidates):  # the last one's problem is in the error below
            report(f"checkpoint {path} cannot be resumed from: {problem}; falling back to the previous one")
    if failures or note:
        raise CheckpointError(f"resume=true but no checkpoint under {root} loads ({'; '.join(failures) or note}); "
                              "resume=false starts the run over")
    return None


def verified_policy_checkpoint(run_dir: str | Path, explicit: str | Path | None = None,
                               report: Report = warn) -> Path | None:
    """For readers of the policy only (``ippo eval``): ``explicit`` if it verifies, else the newest
    checkpoint of the run that verifies (None when the run has none). Raises ``CheckpointError``."""
    if explicit is not None:
        verdict = verify_checkpoint(explicit)
        if not verdict.usable:
            raise CheckpointError(f"checkpoint {explicit} is damaged: {verdict.problem}")
        if verdict.status == "unverified":
            report(f"checkpoint {explicit} has no {MANIFEST} (written by an older ippo): using it unverified")
        return Path(explicit)
    candidates, note = resume_candidates(run_dir)
    if note:
        report(note)
    for path in candidates:
        verdict = verify_checkpoint(path)
        if verdict.usable:
            if path != candidates[0]:
                report(f"using {path}, the newest checkpoint that verifies")
            return path
        report(f"checkpoint {path} is damaged: {verdict.problem}")
    if candidates:
        raise CheckpointError(f"no checkpoint under {Path(run_dir) / 'checkpoints'} verifies")
    return None


def load_policy_into(path: str | Path, policy: torch.nn.Module, trainable_only: bool, device: torch.device) -> None:
    """The policy weights of checkpoint ``path`` (no other state), whole tensors from either layout (a
    sharded checkpoint's shards joined); ``CheckpointError`` naming the file."""
    tensors = read_policy_weights(path, device)
    sharded = layout_of(Path(path))[0] == "sharded"
    _apply("the policy shards" if sharded else "policy.safetensors",
           lambda: load_tensors_into(policy, tensors, trainable_only))


def verify_run(run_dir: str | Path) -> tuple[list[str], int]:
    """``ippo verify RUN_DIR``: one line per checkpoint (newest first) and what resume would do.

    Exit code 0 when the checkpoint ``latest`` names verifies against its manifest; 1 otherwise (it is
    damaged, has no manifest, is missing, or the run has no checkpoint): resume would then fall back,
    load it unverified, or stop.
    """
    root = Path(run_dir) / "checkpoints"
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return [f"no checkpoints under {root}"], 1
    candidates, note = resume_candidates(run_dir)
    latest = None if note else candidates[0]
    verdicts = {p: verify_checkpoint(p) for p in dirs}
    lines = [f"{root}:"] + ([f"  note: {note}"] if note else [])
    for p in reversed(dirs):
        v = verdicts[p]
        if v.status == "damaged":
            detail = v.problem
        else:
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            detail = f"{sum(1 for f in p.iterdir() if f.is_file())} files, {size / 2**20:.1f} MiB"
            kind, world = layout_of(p)
            if kind == "sharded":
                detail += f", sharded over {world} processes (dist.strategy=fsdp)"
            if v.status == "unverified":
                detail += f"; no {MANIFEST} (written by an older ippo): its files parse, damage cannot be detected"
        where = ""
        if p == latest:
            where = "latest"
        elif latest is not None and iteration_of(p) > iteration_of(latest):
            where = "unfinished"  # renamed into place, but the writer died before it verified: resume skips it
        lines.append(f"  {p.name}  {v.status:<10}  {where:<10}  {detail}")
    resume = next((p for p in candidates if verdicts[p].usable), None)
    if resume is None:
        lines.append("resume=true would stop: no checkpoint verifies")
    elif resume == latest and verdicts[resume].status == "ok":
        lines.append(f"resume=true would load {resume.name}")
    else:
        why = "the latest, unverified" if resume == latest else "the newest that verifies"
        lines.append(f"resume=true would load {resume.name} ({why})")
    return lines, 0 if latest is not None and verdicts[latest].status == "ok" else 1


# ---------------------------------------------------------------------------------------------
# sharded checkpoints (dist.strategy=fsdp on W > 1 processes)
#
# Layout, for W ranks (r = 00000 .. W-1)::
#
#     iter_000012/
#         policy.shard-RRRRR-of-WWWWW.safetensors     this rank's dim-0 shard of every sharded tensor,
#         value.shard-RRRRR-of-WWWWW.safetensors      plus every replicated tensor (in each file)
#         optimizer.shard-RRRRR-of-WWWWW.safetensors  optimizer state tensors, keyed "state.<index>.<name>"
#         optimizer.pt  scheduler.pt  rng.pt  state.json    written by rank 0 (param groups, no tensors)
#         manifest.json                                     written by rank 0, last; lists every file above
#
# Why not torch.distributed.checkpoint (DCP): its reader unpickles the ``.metadata`` file and
# loads non-tensor entries with ``torch.load(weights_only=False)``; ippo loads checkpoints with
# safetensors or ``weights_only=True`` only. FSDP2 shards are dim-0 chunks (``torch.chunk``
# semantics) in rank order, so the files need no other index: each safetensors header lists the
# keys that are sharded, the full tensor is their concatenation (``read_full_tensors``), and a
# resume on the same number of ranks reads back exactly the bytes it wrote (bit-identical).
# Every rank writes its files (temp name, fsync, rename) into one temporary directory that rank 0
# creates, and hashes them as it goes (in parallel over the ranks); rank 0 gathers the records into
# the manifest, renames the directory into place once every file of every rank is durable, the ranks
# verify it (each its own shards), and only then does rank 0 move ``latest``.
# The run directory must be on a filesystem that every rank sees (one node, or shared storage).

SHARD_FORMAT = "ippo-fsdp-shard-1"
_SHARD_NAME = re.compile(r"^(policy|value|optimizer)\.shard-(\d{5})-of-(\d{5})\.safetensors$")


def shard_file(kind: str, rank: int, world: int) -> str:
    return f"{kind}.shard-{rank:05d}-of-{world:05d}.safetensors"


def _shard_kind(name: str) -> str | None:
    m = _SHARD_NAME.match(name)
    return m.group(1) if m else None


def _shard_rank(name: str) -> int | None:
    """The rank that wrote shard file ``name``; None for the files rank 0 writes for everyone."""
    m = _SHARD_NAME.match(name)
    return int(m.group(2)) if m else None


def _sharded_files(world: int, with_value: bool) -> list[str]:
    """Every file a sharded checkpoint of ``world`` ranks must hold (the manifest aside)."""
    kinds = ("policy", "value", "optimizer") if with_value else ("policy", "optimizer")
    return [*SHARED_FILES, *(shard_file(k, r, world) for k in kinds for r in range(world))]


def layout_of(path: Path) -> tuple[str, int | None]:
    """``("sharded", W)``, ``("whole", None)``, or ``("unknown", None)`` when nothing in ``path`` says:
    from the manifest, else (a damaged manifest) from the names of the weight files."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
            world = manifest.get("world_size")
            return ("sharded", world) if type(world) is int else ("whole", None)
    except (OSError, ValueError):
        pass
    worlds = sorted({int(m.group(3)) for f in path.glob("*.shard-*-of-*.safetensors")
                     if (m := _SHARD_NAME.match(f.name))})
    if worlds:
        return "sharded", worlds[-1]
    return ("whole", None) if (path / "policy.safetensors").is_file() else ("unknown", None)


def layout_problem(path: Path, world: int | None) -> str | None:
    """Why a run sharded over ``world`` ranks (None: whole models) cannot resume from ``path`` whatever its
    state: a checkpoint of the other layout or of another number of processes. None if it can try."""
    kind, saved = layout_of(path)
    if kind == "unknown" or saved == world:
        return None  # (unknown: nothing to go by; verification reports what is missing)
    if world is None:
        return (f"checkpoint {path} is sharded over {saved} processes (written with dist.strategy=fsdp): resume it "
                f"with dist.strategy=fsdp and {saved} processes")
    if saved is None:
        return (f"checkpoint {path} is not sharded (written with dist.strategy=ddp, or by one process): resume it "
                "with dist.strategy=ddp or on one process")
    return (f"checkpoint {path} was written by {saved} processes, this run has {world}: resume with the same "
            "number of processes")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed cannot hold shards
        return None
    return DTensor


def _is_shard(t: torch.Tensor) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def _check_dim0_shard(name: str, t: torch.Tensor) -> None:
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise NotImplementedError(f"checkpoint: {name} is sharded as {t.placements} over a "
                                  f"{t.device_mesh.ndim}-d mesh; only FSDP's (Shard(0),) on one mesh is supported")


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """This rank's part of ``tensors`` to ``path`` (atomically): a DTensor's local shard, a plain tensor whole.
    Returns the manifest record of the file (size, sha256)."""
    local, sharded = {}, []
    for k, t in tensors.items():
        if _is_shard(t):
            _check_dim0_shard(k, t)
            sharded.append(k)
            t = t.to_local()
        local[k] = t.detach().to("cpu", copy=True).contiguous()
    return _write_safetensors(path, local, {"format": SHARD_FORMAT, "sharded": json.dumps(sorted(sharded))})


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A shard file's tensors (on the CPU) and the names of those that are dim-0 shards."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} is missing")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SHARD_FORMAT:
        raise RuntimeError(f"{path} is not an ippo shard file (format {meta.get('format')!r})")
    return load_file(str(path)), set(json.loads(meta["sharded"]))


def _parse_shard(path: Path, name: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``read_shard`` of ``path/name``; any failure becomes a CheckpointError naming the file."""
    if not (path / name).is_file():
        raise CheckpointError(f"{name}: missing")
    try:
        return read_shard(path / name)
    except Exception as e:  # noqa: BLE001  -- safetensors, JSON metadata: all mean "this file is bad"
        raise CheckpointError(f"{name}: cannot be read ({_one_line(e)})") from None


def read_full_tensors(path: str | Path, kind: str = "policy", device: str | torch.device = "cpu"
                      ) -> dict[str, torch.Tensor]:
    """Whole tensors from a sharded checkpoint (any process, no torch.distributed): the shards of
    every rank concatenated along dim 0, in rank order. For ``ippo eval``, export and tests.
    ``CheckpointError`` naming the file that is missing or unreadable."""
    path = Path(path)
    layout, world = layout_of(path)
    if layout != "sharded":
        raise CheckpointError(f"{path} is not a sharded checkpoint (no {kind} shards)")
    names = [shard_file(kind, r, world) for r in range(world)]
    parts = [_parse_shard(path, n) for n in names]
    (first, sharded) = parts[0]
    for name, (tensors, _) in zip(names[1:], parts[1:]):
        if tensors.keys() != first.keys():
            raise CheckpointError(f"{name}: holds other tensors than {names[0]}")
    return {k: (torch.cat([p[0][k] for p in parts], 0) if k in sharded else v).to(device) for k, v in first.items()}


def read_policy_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The policy's tensors from a checkpoint of either layout (whole tensors); ``CheckpointError``."""
    path = Path(path)
    if layout_of(path)[0] == "sharded":
        return read_full_tensors(path, "policy", device)
    return _parse(path, "policy.safetensors", torch.device(device))


def module_tensors(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``model``: its state dict, or its trainable parameters only (LoRA)."""
    if trainable_only:
        return {k: p for k, p in model.named_parameters() if p.requires_grad}
    return dict(model.state_dict())


def _load_module_shard(model: torch.nn.Module, tensors: dict[str, torch.Tensor], sharded: set[str],
                       trainable_only: bool) -> None:
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    wanted = module_tensors(model, trainable_only)
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise RuntimeError(f"the shard does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in tensors.items():  # every check first: a mismatch leaves the model as it was
        dst = targets[k]
        if (k in sharded) != _is_shard(dst):
            raise RuntimeError(f"{k} is {'' if k in sharded else 'not '}sharded in the file but the model's is the "
                               "other way round (same dist.strategy needed)")
        local = dst.to_local() if _is_shard(dst) else dst
        if local.shape != v.shape:
            raise RuntimeError(f"{k} has shape {tuple(v.shape)}, this rank's part of the model {tuple(local.shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            dst = targets[k]
            (dst.to_local() if _is_shard(dst) else dst).copy_(v)


def _optimizer_params(optimizer) -> list[torch.Tensor]:
    """Parameters in the order of ``optimizer.state_dict()``'s integer indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into its state tensors ("state.<index>.<name>") and the rest."""
    sd = optimizer.state_dict()
    tensors, rest_state = {}, {}
    for index, entry in sd["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{index}.{name}"] = v
            else:
                rest_state.setdefault(index, {})[name] = v
    return tensors, {"state": rest_state, "param_groups": sd["param_groups"]}


def _optimizer_state(optimizer, tensors: dict[str, torch.Tensor], sharded: set[str], rest: dict) -> dict:
    """The inverse of ``optimizer_tensors``: shards become DTensors laid out like their parameter."""
    DTensor = _dtensor_type()
    params = _optimizer_params(optimizer)
    state: dict[int, dict] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, v in tensors.items():
        _, index, name = key.split(".", 2)
        p = params[int(index)]
        if key in sharded:
            if not _is_shard(p):
                raise RuntimeError(f"optimizer state {key} is sharded but its parameter is not")
            v = DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
        state.setdefault(int(index), {})[name] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def save_sharded_checkpoint(run_dir: str | Path, iteration: int, *, policy: torch.nn.Module,
                            value: torch.nn.Module | None, optimizer, scheduler, state: dict, trainable_only: bool,
                            keep_last: int = 2) -> Path:
    """``save_checkpoint`` for FSDP2-sharded models: every rank calls it (it holds collectives).

    Each rank writes and hashes its own shard files; rank 0 writes the rest and the manifest, and
    renames the directory into place once every file of every rank is durable. Every rank then
    re-reads its part against the manifest; ``latest`` moves only when all of them verify (else
    ``CheckpointError`` on every rank, as ``save_checkpoint`` raises).
    """
    from ippo.rl.parallel import distributed as dist

    root = Path(run_dir) / "checkpoints"
    name = f"iter_{iteration:06d}"
    tmp_name = None
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tmp_name = tmp.name
    tmp = root / dist.broadcast_object(tmp_name)
    rank, world = dist.rank(), dist.world_size()
    files = {shard_file("policy", rank, world): write_shard(tmp / shard_file("policy", rank, world),
                                                            module_tensors(policy, trainable_only))}
    if value is not None:
        files[shard_file("value", rank, world)] = write_shard(tmp / shard_file("value", rank, world),
                                                              module_tensors(value, trainable_only))
    opt_tensors, opt_rest = optimizer_tensors(optimizer)
    files[shard_file("optimizer", rank, world)] = write_shard(tmp / shard_file("optimizer", rank, world), opt_tensors)
    every = dist.all_gather_object(files)  # returns once every rank's shards are on disk
    final = root / name
    if dist.is_main():
        records = {k: v for rank_files in every for k, v in rank_files.items()}
        records["optimizer.pt"] = _write_stream(tmp / "optimizer.pt", lambda f: torch.save(opt_rest, f))
        records["scheduler.pt"] = _write_stream(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
        records["rng.pt"] = _write_stream(tmp / "rng.pt", lambda f: torch.save(rng_state(), f))
        state_bytes = json.dumps({"iteration": iteration, "checkpoint_format": FORMAT, "world_size": world, **state},
                                 indent=1).encode()
        records["state.json"] = _write_stream(tmp / "state.json", lambda f: f.write(state_bytes))
        _write_manifest(tmp, iteration, records, world_size=world)
        _rename_into_place(root, tmp, name)
    dist.barrier()  # the checkpoint is in place
    _require_verified(_agreed(_verify_share(final, rank)), root)
    if dist.is_main():
        _advance_latest(root, final, keep_last)
    dist.barrier()
    return final


def _load_sharded(path: Path, *, policy, value, optimizer, scheduler, trainable_only: bool,
                  device: torch.device) -> dict:
    """This rank's part of ``_load``: parse its shard files and the shared files, then restore."""
    from ippo.rl.parallel import distributed as dist

    rank, world = dist.rank(), dist.world_size()
    kinds = ("policy", "value", "optimizer") if value is not None else ("policy", "optimizer")
    names = {k: shard_file(k, rank, world) for k in kinds}
    shards = {k: _parse_shard(path, n) for k, n in names.items()}
    parsed = {n: _parse(path, n, device) for n in SHARED_FILES}
    # every file decoded: only now do live objects change (a failure below is overwritten by the fallback)
    _apply(names["policy"], lambda: _load_module_shard(policy, *shards["policy"], trainable_only))
    if value is not None:
        _apply(names["value"], lambda: _load_module_shard(value, *shards["value"], trainable_only))
    _apply(names["optimizer"], lambda: optimizer.load_state_dict(
        _optimizer_state(optimizer, *shards["optimizer"], parsed["optimizer.pt"])))
    _apply("scheduler.pt", lambda: scheduler.load_state_dict(parsed["scheduler.pt"]))
    _apply("rng.pt", lambda: set_rng_state(parsed["rng.pt"]))
    return parsed["state.json"]
