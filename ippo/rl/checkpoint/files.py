"""One file of a checkpoint: atomic writes (temp name, fsync, ``os.replace``) that hash the bytes as
they are written, sha256 of a file on disk, and reading one file back, where every failure becomes a
one-line ``CheckpointError`` naming the file.

Tensors are stored with safetensors or ``torch.save`` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .layout import iteration_of

CPU = torch.device("cpu")
_CHUNK = 1 << 20

Report = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message is one line naming the file."""


def warn(message: str) -> None:
    print(f"ippo: warning: {message}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {msg[:300] + '...' if len(msg) > 300 else msg}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """Where ``path`` is written before ``os.replace`` moves it into place (hidden, one per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _temp_name(path)
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


def write_stream(path: Path, write: Callable[[Any], None]) -> dict:
    """``write(file)`` into a temp file, fsync, move into place; the record of the bytes written."""
    tmp = _temp_name(path)
    with open(tmp, "wb") as f:
        hf = _HashingFile(f)
        write(hf)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": hf.size, "sha256": hf.sha256.hexdigest()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """safetensors writes the file itself (no copy of the tensors in memory): hash it after the fsync."""
    tmp = _temp_name(path)
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def nonfinite_problem(groups: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """Why these tensors must not be checkpointed (the first one holding a NaN/Inf, by group and name), or None.

    One reduction over everything first (a sum, NaN/Inf propagated); only when it is not finite -- an
    overflow of finite values included -- is each tensor looked at."""
    floats = [(g, k, t.to_local() if hasattr(t, "to_local") else t) for g, ts in groups.items() for k, t in ts.items()
              if t.is_floating_point()]
    floats = [(g, k, t.detach()) for g, k, t in floats if t.numel()]
    if not floats or torch.isfinite(torch.stack([t.sum(dtype=torch.float32).cpu() for _, _, t in floats]).sum()):
        return None
    for g, k, t in floats:
        if not bool(torch.isfinite(t).all()):
            return f"{g} tensor {k} holds NaN/Inf values"
    return None


def attempt_write(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, why)`` in one line when it fails as writing a checkpoint fails: a full or
    read-only disk (OSError; safetensors' and torch.save's own errors for it), or a CheckpointError."""
    try:
        return fn(), None
    except CheckpointError as e:
        return None, str(e)
    except (OSError, SafetensorError, RuntimeError) as e:
        return None, one_line(e)


def write_failure(tmp: Path, name: str, root: Path, why: str) -> CheckpointError:
    """Remove the half-written ``tmp`` (not leaving a full disk fuller); the one-line error to raise."""
    shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(f"cannot write checkpoint {name} under {root} ({why}); {root / 'latest'} still names the "
                           "previous checkpoint")


@contextlib.contextmanager
def writing(tmp: Path, name: str, root: Path) -> Iterator[None]:
    """Writing checkpoint ``name`` into ``tmp`` in one process: a failure removes ``tmp`` and becomes one
    CheckpointError (``attempt_write``, ``write_failure``)."""
    try:
        yield
    except CheckpointError:  # (already one line: the written checkpoint did not verify)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, SafetensorError, RuntimeError) as e:
        raise write_failure(tmp, name, root, one_line(e)) from None


# ---------------------------------------------------------------------------------------------
# reading


def _state_json(data: bytes, path: Path) -> dict:
    state = json.loads(data)
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise TypeError("expected an object with an integer 'iteration'")
    if iteration_of(path) is not None and state["iteration"] != iteration_of(path):
        raise ValueError(f"it says iteration {state['iteration']}, the directory is {path.name}")
    return state


def parse_file(path: Path, name: str, device: torch.device) -> Any:
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
        raise CheckpointError(f"{name}: cannot be read ({one_line(e)})") from None


def apply_file(name: str, fn: Callable[[], None]) -> None:
    """``fn()`` puts what was read from file ``name`` into live objects; any failure becomes a
    CheckpointError naming the file."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  -- e.g. a checkpoint of another model or config
        raise CheckpointError(f"{name}: does not fit this run ({one_line(e)})") from None
