"""The on-disk names of a checkpoint: its files, its directory under ``run_dir/checkpoints``, and which
layout (whole models, or sharded over W processes) a checkpoint directory holds.

Everything else in the package reads and writes through these names; this module reads nothing but the
manifest and the file names (``layout_of``), so that verification and both layouts can share it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1  # checkpoint_format in state.json and the manifest; absent = written before manifests
CORE_FILES = ("policy.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
# a sharded checkpoint's files besides the shards (rank 0 writes them, every rank reads them)
SHARED_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
_SHARD_NAME = re.compile(r"^(policy|value|optimizer)\.shard-(\d{5})-of-(\d{5})\.safetensors$")


def iteration_of(path: Path) -> int | None:
    """``iter_000012`` -> 12; None for anything else (temp dirs of writers included)."""
    num = path.name.removeprefix("iter_")
    return int(num) if num != path.name and num.isdigit() else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint directories (complete or damaged), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    inside = root.resolve()  # (a link named like a checkpoint that leads elsewhere is not one of this run's)
    found = [p for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None and p.resolve().parent == inside]
    return sorted(found, key=iteration_of)


def shard_file(kind: str, rank: int, world: int) -> str:
    return f"{kind}.shard-{rank:05d}-of-{world:05d}.safetensors"


def shard_kind(name: str) -> str | None:
    m = _SHARD_NAME.match(name)
    return m.group(1) if m else None


def shard_rank(name: str) -> int | None:
    """The rank that wrote shard file ``name``; None for the files rank 0 writes for everyone."""
    m = _SHARD_NAME.match(name)
    return int(m.group(2)) if m else None


def sharded_files(world: int, with_value: bool) -> list[str]:
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
