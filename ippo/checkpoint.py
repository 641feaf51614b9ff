"""Atomic checkpoints that verify themselves: a run killed at any instant resumes from the last complete
one, and a damaged checkpoint is found before anything is loaded from it.

Layout under ``run_dir/checkpoints``::

    iter_000012/          complete checkpoint (written as iter_000012.tmp-<pid>, then renamed)
        policy.safetensors  value.safetensors  optimizer.pt  scheduler.pt  rng.pt  state.json
        manifest.json     size and sha256 of each file above (written last)
    latest                text file naming the newest checkpoint that verified on disk (replaced atomically)

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
rename guarantees they are complete, but damage inside them cannot be detected.

Tensors are stored with safetensors or ``torch.save`` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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
_CHUNK = 1 << 20

Report = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message is one line naming the file."""


def warn(message: str) -> None:
    print(f"ippo: warning: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {msg[:300] + '...' if len(msg) > 300 else msg}"


def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)


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


def _sha256_file(path: Path) -> str:
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


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """safetensors writes the file itself (no copy of the tensors in memory): hash it after the fsync."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": _sha256_file(path)}


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
    manifest = {"checkpoint_format": FORMAT, "iteration": iteration, "files": files}
    atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # a previous attempt got this far before dying, or a damaged one: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    verdict = verify_checkpoint(final)
    if verdict.status != "ok":
        raise CheckpointError(f"checkpoint {final} does not verify right after it was written ({verdict.problem}); "
                              f"{root / 'latest'} still names the previous checkpoint and nothing was pruned")
    atomic_write_bytes(root / "latest", name.encode())
    # prune: older checkpoints beyond keep_last; newer ones, which this run has superseded (a run restarted
    # with resume=false, or retracing after a fall-back) and which a fall-back must never pick; temp dirs
    others = [p for p in checkpoint_dirs(run_dir) if p != final]
    older = [p for p in others if iteration_of(p) < iteration]
    kept = older[max(0, len(older) - (max(1, keep_last) - 1)):]
    for old in others:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


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


def _read_manifest(path: Path) -> dict[str, dict]:
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
                for r in files.values()):
            raise ValueError("'files' must map each file name to its bytes and sha256")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{MANIFEST}: not a valid manifest ({_one_line(e)})") from None
    for name in files:
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            raise CheckpointError(f"{MANIFEST}: lists {name!r}, which is not a file of the checkpoint")
    absent = [f for f in CORE_FILES if f not in files]
    if absent:
        raise CheckpointError(f"{MANIFEST}: lists no {absent[0]}")
    return files


def _check_against_manifest(path: Path) -> None:
    files = _read_manifest(path)
    for name, rec in files.items():  # the cheap checks first: a missing or cut file needs no hashing
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{name}: missing (the manifest lists it)")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{name}: {size} bytes, the manifest says {rec['bytes']} (truncated or overwritten)")
    with ThreadPoolExecutor(max_workers=min(4, len(files))) as pool:  # hashlib releases the GIL
        digests = dict(zip(files, pool.map(_sha256_file, [path / n for n in files])))
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
            _check_against_manifest(path)
            return Verdict(path, "ok")
        if _legacy_format(path) is not None:
            raise CheckpointError(f"{MANIFEST}: missing (state.json says this checkpoint was written with one)")
        # written before manifests: the best check left is that every file parses
        for name in CORE_FILES + (("value.safetensors",) if (path / "value.safetensors").exists() else ()):
            _parse(path, name, torch.device("cpu"))
        return Verdict(path, "unverified")
    except CheckpointError as e:
        return Verdict(path, "damaged", str(e))
    except OSError as e:
        return Verdict(path, "damaged", _one_line(e))


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
        return torch.load(f, map_location=device, weights_only=True)
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
                       scheduler, trainable_only: bool, device: torch.device, report: Report = warn) -> dict | None:
    """Resume: load the newest checkpoint that verifies and loads; returns its ``state.json``.

    None when the run has no checkpoint yet. Every damaged checkpoint is reported through ``report`` in
    one line naming the file, and so is the fall-back; ``CheckpointError`` (one line) when the run has
    checkpoints but none of them loads.
    """
    root = Path(run_dir) / "checkpoints"
    candidates, note = resume_candidates(run_dir)
    if note:
        report(note)
    failures = []
    for i, path in enumerate(candidates):
        verdict = verify_checkpoint(path)
        problem = verdict.problem
        if verdict.usable:
            try:
                state = _load(path, policy=policy, value=value, optimizer=optimizer, scheduler=scheduler,
                              trainable_only=trainable_only, device=device)
            except CheckpointError as e:
                problem = str(e)
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
    """The policy weights of checkpoint ``path`` (no other state); ``CheckpointError`` naming the file."""
    tensors = _parse(Path(path), "policy.safetensors", device)
    _apply("policy.safetensors", lambda: load_tensors_into(policy, tensors, trainable_only))


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
