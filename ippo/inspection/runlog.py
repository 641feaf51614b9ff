"""What ``ippo inspect`` reads from a run directory: its config, the influence log (with each row's line number)
and which iterations still have their theta_old.

theta_old of iteration N is the policy the iteration sampled and scored with: the checkpoint written after N
iterations (``checkpoints/iter_<N>``), or for N = 0 the starting model itself (``model.path``, LoRA adapters
drawn from the run's seed). ``checkpoint.keep_last`` prunes all but the newest checkpoints;
``checkpoint.keep_every=K`` keeps every K-th for good.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ippo.errors import ConfigError
from ippo.rl.checkpoint import CheckpointError, checkpoint_dirs, iteration_of, verify_checkpoint
from ippo.rl.config import TrainConfig, load_config

LOG = "influence.jsonl"
# what a row must hold to rebuild its episode's scoring loss (written since ippo inspect exists)
REBUILD_FIELDS = ("response_tokens", "advantage", "token_norm", "seq_norm", "scored_after_steps")


@dataclass
class Row:
    """One episode of one iteration, as ``influence.jsonl`` logged it."""

    line: int  # 1-based line number in influence.jsonl
    data: dict

    def __getitem__(self, key: str):
        return self.data[key]

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    @property
    def episode(self) -> int:
        return int(self.data["episode"])


def run_config(run_dir: Path) -> TrainConfig:
    """The run's own config (``config.json``), pointed at ``run_dir`` wherever the run now lives."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.json (ippo train writes one)")
    cfg = load_config(path)
    cfg.run_dir = str(run_dir)
    return cfg


def read_log(run_dir: Path) -> dict[int, list[Row]]:
    """iteration -> its episodes in episode order, from ``influence.jsonl`` (a line cut by a kill is skipped)."""
    path = run_dir / LOG
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the run logged no influence (log.influence_log=false?)")
    out: dict[int, list[Row]] = defaultdict(list)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and "iteration" in data and "episode" in data:
                out[int(data["iteration"])].append(Row(n, data))
    if not out:
        raise ConfigError(f"{path} holds no episode")
    for rows in out.values():
        rows.sort(key=lambda r: r.episode)
    return dict(sorted(out.items()))


def theta_old_sources(run_dir: Path, iterations: list[int]) -> dict[int, Path | None]:
    """The logged ``iterations`` whose theta_old is still there: iteration -> its checkpoint (None for iteration 0,
    the starting model). A checkpoint is verified against its manifest only when it is loaded
    (``verified_checkpoint``)."""
    found: dict[int, Path | None] = {0: None} if 0 in iterations else {}
    for path in checkpoint_dirs(run_dir):
        if iteration_of(path) in iterations:
            found[iteration_of(path)] = path
    return dict(sorted(found.items()))


def verified_checkpoint(path: Path | None) -> Path | None:
    """``path`` once it verifies against its manifest (``CheckpointError`` naming the damage otherwise)."""
    if path is None:
        return None
    verdict = verify_checkpoint(path)
    if not verdict.usable:
        raise CheckpointError(f"checkpoint {path} (theta_old of iteration {iteration_of(path)}) is damaged: "
                              f"{verdict.problem}")
    return path


def missing_theta_old(cfg: TrainConfig, iteration: int, available: dict[int, Path | None]) -> str:
    """Why iteration ``iteration`` cannot be recomputed, in one line naming the settings that decide it."""
    ck = cfg.checkpoint
    have = ", ".join(str(i) for i in available) or "none"
    return (f"iteration {iteration} has no theta_old: checkpoints/iter_{iteration:06d} (written after {iteration} "
            f"iterations) is not in the run (checkpoint.every={ck.every}, keep_last={ck.keep_last}, "
            f"keep_every={ck.keep_every}); iterations that have one: {have}. Train with checkpoint.keep_every=K "
            "(and checkpoint.every dividing K) to keep every K-th")


def rebuildable(rows: list[Row]) -> str | None:
    """None when the rows hold what rebuilding their scoring loss needs, else why not."""
    lacking = sorted({k for r in rows for k in REBUILD_FIELDS if k not in r.data})
    if lacking:
        return (f"{LOG} lacks {', '.join(lacking)} (written by an ippo older than ippo inspect): the episodes cannot "
                "be rebuilt exactly")
    return None
