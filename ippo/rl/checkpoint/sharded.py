"""Sharded checkpoints (``dist.strategy=fsdp`` on W > 1 processes): each rank writes its own part of
the FSDP2-sharded weights and optimizer state, rank 0 the files every rank reads.

Layout, for W ranks (r = 00000 .. W-1)::

    iter_000012/
        policy.shard-RRRRR-of-WWWWW.safetensors     this rank's dim-0 shard of every sharded tensor,
        value.shard-RRRRR-of-WWWWW.safetensors      plus every replicated tensor (in each file)
        optimizer.shard-RRRRR-of-WWWWW.safetensors  optimizer state tensors, keyed "state.<index>.<name>"
        optimizer.pt  scheduler.pt  rng.pt  state.json    written by rank 0 (param groups, no tensors)
        manifest.json                                     written by rank 0, last; lists every file above

Why not torch.distributed.checkpoint (DCP): its reader unpickles the ``.metadata`` file and
loads non-tensor entries with ``torch.load(weights_only=False)``; ippo loads checkpoints with
safetensors or ``weights_only=True`` only. FSDP2 shards are dim-0 chunks (``torch.chunk``
semantics) in rank order, so the files need no other index: each safetensors header lists the
keys that are sharded, the full tensor is their concatenation (``read_full_tensors``), and a
resume on the same number of ranks reads back exactly the bytes it wrote (bit-identical).
Every rank writes its files (temp name, fsync, rename) into one temporary directory that rank 0
creates, and hashes them as it goes (in parallel over the ranks); rank 0 gathers the records into
the manifest, renames the directory into place once every file of every rank is durable, the ranks
verify it (each its own shards), and only then does rank 0 move ``latest``.
The run directory must be on a filesystem that every rank sees (one node, or shared storage).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ippo.rl.parallel import distributed as dist

from .files import (
    CheckpointError,
    apply_file,
    attempt_write,
    nonfinite_problem,
    one_line,
    parse_file,
    write_failure,
    write_safetensors,
    write_stream,
)
from .layout import FORMAT, SHARED_FILES, layout_of, shard_file
from .manifest import (
    advance_latest,
    agreed,
    rename_into_place,
    require_verified,
    verify_share,
    write_manifest,
)
from .whole import rng_state, set_rng_state

SHARD_FORMAT = "ippo-fsdp-shard-1"


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
    return write_safetensors(path, local, {"format": SHARD_FORMAT, "sharded": json.dumps(sorted(sharded))})


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A shard file's tensors (on the CPU) and the names of those that are dim-0 shards."""
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
        raise CheckpointError(f"{name}: cannot be read ({one_line(e)})") from None


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
    return parse_file(path, "policy.safetensors", torch.device(device))


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
                            keep_last: int = 2, keep_every: int = 0) -> Path:
    """``save_checkpoint`` for FSDP2-sharded models: every rank calls it (it holds collectives).

    Each rank writes and hashes its own shard files; rank 0 writes the rest and the manifest, and
    renames the directory into place once every file of every rank is durable. Every rank then
    re-reads its part against the manifest; ``latest`` moves only when all of them verify (else
    ``CheckpointError`` on every rank, as ``save_checkpoint`` raises). Non-finite weights on any rank, or a
    write failing on any rank (a full disk), is the same CheckpointError on every rank, and nothing is left.
    """
    root = Path(run_dir) / "checkpoints"
    name = f"iter_{iteration:06d}"
    rank, world = dist.rank(), dist.world_size()
    tensors = {"policy": module_tensors(policy, trainable_only)}
    if value is not None:
        tensors["value"] = module_tensors(value, trainable_only)
    problem = agreed(nonfinite_problem(tensors))
    if problem is not None:
        raise CheckpointError(f"refusing to write checkpoint {name} under {root}: the {problem} (on some rank)")
    tmp_name, problem = dist.broadcast_object(attempt_write(lambda: _make_tmp(root, name)) if dist.is_main() else None)
    tmp = root / (tmp_name or f"{name}.tmp")
    opt_tensors, opt_rest = optimizer_tensors(optimizer)
    if problem is None:  # every rank its own shards; all_gather returns once every rank's shards are on disk
        every = dist.all_gather_object(attempt_write(lambda: {
            shard_file(k, rank, world): write_shard(tmp / shard_file(k, rank, world), t)
            for k, t in {**tensors, "optimizer": opt_tensors}.items()}))
        problem = next((why for _, why in every if why is not None), None)
    if problem is None and dist.is_main():
        records = {k: v for rank_files, _ in every for k, v in rank_files.items()}
        _, problem = attempt_write(lambda: _write_shared(root, tmp, name, iteration, records, opt_rest, scheduler,
                                                         state, world))
    problem = dist.broadcast_object(problem)  # (also: the checkpoint is in place)
    if problem is not None:
        raise write_failure(tmp, name, root, problem) if dist.is_main() else CheckpointError(
            f"cannot write checkpoint {name} under {root} ({problem})")
    final = root / name
    require_verified(agreed(verify_share(final, rank)), root)
    problem = attempt_write(lambda: advance_latest(root, final, keep_last, keep_every))[1] if dist.is_main() else None
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise CheckpointError(f"checkpoint {final} is written but {root / 'latest'} could not be moved to it "
                              f"({problem})")
    return final


def _make_tmp(root: Path, name: str) -> str:
    """Rank 0: the empty temporary directory every rank writes its files into."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp.name


def _write_shared(root: Path, tmp: Path, name: str, iteration: int, records: dict, opt_rest: dict, scheduler,
                  state: dict, world: int) -> None:
    """Rank 0: the files every rank reads and the manifest of all files, then the rename into place."""
    records["optimizer.pt"] = write_stream(tmp / "optimizer.pt", lambda f: torch.save(opt_rest, f))
    records["scheduler.pt"] = write_stream(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
    records["rng.pt"] = write_stream(tmp / "rng.pt", lambda f: torch.save(rng_state(), f))
    state_bytes = json.dumps({"iteration": iteration, "checkpoint_format": FORMAT, "world_size": world, **state},
                             indent=1).encode()
    records["state.json"] = write_stream(tmp / "state.json", lambda f: f.write(state_bytes))
    write_manifest(tmp, iteration, records, world_size=world)
    rename_into_place(root, tmp, name)


def load_sharded(path: Path, *, policy, value, optimizer, scheduler, trainable_only: bool,
                 device: torch.device) -> dict:
    """``load_whole`` for a sharded checkpoint, this rank's part: parse its shard files and the shared
    files, then restore."""
    rank, world = dist.rank(), dist.world_size()
    kinds = ("policy", "value", "optimizer") if value is not None else ("policy", "optimizer")
    names = {k: shard_file(k, rank, world) for k in kinds}
    shards = {k: _parse_shard(path, n) for k, n in names.items()}
    parsed = {n: parse_file(path, n, device) for n in SHARED_FILES}
    # every file decoded: only now do live objects change (a failure below is overwritten by the fallback)
    apply_file(names["policy"], lambda: _load_module_shard(policy, *shards["policy"], trainable_only))
    if value is not None:
        apply_file(names["value"], lambda: _load_module_shard(value, *shards["value"], trainable_only))
    apply_file(names["optimizer"], lambda: optimizer.load_state_dict(
        _optimizer_state(optimizer, *shards["optimizer"], parsed["optimizer.pt"])))
    apply_file("scheduler.pt", lambda: scheduler.load_state_dict(parsed["scheduler.pt"]))
    apply_file("rng.pt", lambda: set_rng_state(parsed["rng.pt"]))
    return parsed["state.json"]
