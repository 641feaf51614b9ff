"""Whole-model checkpoints (one process, or ``dist.strategy=ddp``): the policy's and the value model's
tensors in safetensors files, optimizer, scheduler and RNG states with ``torch.save``, ``state.json``.

``save_checkpoint`` writes one atomically and verifies it before ``latest`` moves (``manifest``);
``load_whole`` parses every file before it changes any live object (``restore`` picks the checkpoint).
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

from .files import (
    CheckpointError,
    apply_file,
    nonfinite_problem,
    parse_file,
    write_safetensors,
    write_stream,
    writing,
)
from .layout import FORMAT
from .manifest import advance_latest, rename_into_place, require_verified, verify_checkpoint, write_manifest


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


def save_checkpoint(run_dir: str | Path, iteration: int, *, policy: torch.nn.Module,
                    value: torch.nn.Module | None, optimizer, scheduler, state: dict, trainable_only: bool,
                    keep_last: int = 2, keep_every: int = 0) -> Path:
    """Write checkpoint ``iteration`` (= iterations completed) atomically, verify it, then prune older ones
    (all but the newest ``keep_last`` and every ``keep_every``-th).

    Raises ``CheckpointError`` when the written checkpoint does not verify; ``latest`` then still names
    the previous one and nothing is pruned.
    """
    root = Path(run_dir) / "checkpoints"
    name = f"iter_{iteration:06d}"
    final = root / name
    tensors = {"policy": state_tensors(policy, trainable_only)}
    if value is not None:
        tensors["value"] = state_tensors(value, trainable_only)
    problem = nonfinite_problem(tensors)
    if problem is not None:  # a verified checkpoint of broken weights would be resumed from
        raise CheckpointError(f"refusing to write checkpoint {name} under {root}: the {problem}")
    tmp = root / f"{name}.tmp-{os.getpid()}"
    with writing(tmp, name, root):
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {f"{k}.safetensors": write_safetensors(tmp / f"{k}.safetensors", t) for k, t in tensors.items()}
        files["optimizer.pt"] = write_stream(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
        files["scheduler.pt"] = write_stream(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
        files["rng.pt"] = write_stream(tmp / "rng.pt", lambda f: torch.save(rng_state(), f))
        state_bytes = json.dumps({"iteration": iteration, "checkpoint_format": FORMAT, **state}, indent=1).encode()
        files["state.json"] = write_stream(tmp / "state.json", lambda f: f.write(state_bytes))
        write_manifest(tmp, iteration, files)
        require_verified(verify_checkpoint(rename_into_place(root, tmp, name)), root)
        advance_latest(root, final, keep_last, keep_every)
    return final


def load_whole(path: Path, *, policy, value, optimizer, scheduler, trainable_only: bool,
               device: torch.device) -> dict:
    """Parse every file, then restore weights, optimizer, scheduler and RNG states; returns state.json."""
    parsed = {name: parse_file(path, name, device) for name in
              ("policy.safetensors", *(("value.safetensors",) if value is not None else ()),
               "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")}
    # every file decoded: only now do live objects change (a failure below is overwritten by the fallback)
    apply_file("policy.safetensors",
               lambda: load_tensors_into(policy, parsed["policy.safetensors"], trainable_only))
    if value is not None:
        apply_file("value.safetensors",
                   lambda: load_tensors_into(value, parsed["value.safetensors"], trainable_only))
    apply_file("optimizer.pt", lambda: optimizer.load_state_dict(parsed["optimizer.pt"]))
    apply_file("scheduler.pt", lambda: scheduler.load_state_dict(parsed["scheduler.pt"]))
    apply_file("rng.pt", lambda: set_rng_state(parsed["rng.pt"]))
    return parsed["state.json"]
