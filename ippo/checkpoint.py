"""Atomic checkpoints: a run killed at any instant resumes from the last complete one.

Layout under ``run_dir/checkpoints``::

    iter_000012/          complete checkpoint (written as iter_000012.tmp-<pid>, then renamed)
        policy.safetensors  value.safetensors  optimizer.pt  scheduler.pt  rng.pt  state.json
    latest                text file naming the newest complete checkpoint (replaced atomically)

Every file is written to a temporary name, fsynced, then ``os.replace``d; the directory is renamed
only when all its files are durable, and ``latest`` moves only after that. Tensors are stored
with safetensors or ``torch.save`` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


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


def _write_with(path: Path, writer) -> None:
    """Call ``writer(tmp_path)``, fsync the file, and move it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(run_dir: str | Path, iteration: int, *, policy: torch.nn.Module,
                    value: torch.nn.Module | None, optimizer, scheduler, state: dict, trainable_only: bool,
                    keep_last: int = 2) -> Path:
    """Write checkpoint ``iteration`` (= iterations completed) atomically; prune older ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:06d}"
    final = root / name
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_with(tmp / "policy.safetensors", lambda p: save_file(state_tensors(policy, trainable_only), str(p)))
    if value is not None:
        _write_with(tmp / "value.safetensors", lambda p: save_file(state_tensors(value, trainable_only), str(p)))
    _write_with(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
    _write_with(tmp / "scheduler.pt", lambda p: torch.save(scheduler.state_dict(), p))
    _write_with(tmp / "rng.pt", lambda p: torch.save(rng_state(), p))
    atomic_write_bytes(tmp / "state.json", json.dumps({"iteration": iteration, **state}, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # a previous attempt got this far before dying: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_bytes(root / "latest", name.encode())
    # prune: older complete checkpoints beyond keep_last, and temp dirs of dead writers
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_") and ".tmp" not in p.name)
    for old in done[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    path = root / ptr.read_text().strip()
    if not (path / "state.json").is_file():
        raise RuntimeError(f"checkpoint pointer names {path}, which is incomplete")
    return path


def load_checkpoint(path: Path, *, policy: torch.nn.Module, value: torch.nn.Module | None, optimizer, scheduler,
                    trainable_only: bool, device: torch.device) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; returns state.json."""
    load_tensors_into(policy, load_file(str(path / "policy.safetensors"), device=str(device)), trainable_only)
    if value is not None:
        load_tensors_into(value, load_file(str(path / "value.safetensors"), device=str(device)), trainable_only)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
