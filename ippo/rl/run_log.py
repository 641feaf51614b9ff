"""Run logs: ``metrics.jsonl`` (one line per iteration), the influence log, TensorBoard / W&B.

Files under the run dir (written by rank 0 only):
* ``metrics.jsonl``: one JSON object per iteration (and ``eval.jsonl`` per evaluation);
* ``influence.jsonl``: one record per episode per iteration (prompt row, response, reward,
  advantage sum, score, kept, weight; and what ``ippo inspect`` rebuilds the episode from: response tokens,
  advantages, the score's loss normalisers, ``ippo.rl.loop.episode_rows``);
* ``influence_topk.jsonl``: the top-k proponents and opponents of each iteration.
On resume the files are cut back to the iterations before the checkpoint, so a killed-and-resumed
run has the same logs as an uninterrupted one (modulo wall times).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/Inf
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _clean(v.item())
    return v


def _truncate_jsonl(path: Path, before_iteration: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", -1) < before_iteration:
                keep.append(line)
        except json.JSONDecodeError:
            pass  # a line cut by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


class RunLogger:
    def __init__(self, run_dir: str | Path, config: dict, *, enabled: bool, start_iteration: int = 0,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str = "ippo",
                 influence_log: bool = True):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.influence_enabled = influence_log
        self._tb = self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "eval.jsonl", "influence.jsonl", "influence_topk.jsonl"):
            _truncate_jsonl(self.dir / name, start_iteration)
        (self.dir / "config.json").write_text(json.dumps(config, indent=1))
        self._files = {n: open(self.dir / n, "a", encoding="utf-8")  # noqa: SIM115 -- open for the run
                       for n in ("metrics.jsonl", "eval.jsonl", "influence.jsonl", "influence_topk.jsonl")}
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_iteration)
        if wandb:
            if importlib.util.find_spec("wandb") is None:
                raise RuntimeError("log.wandb=true but wandb is not installed")
            import wandb as wb

            self._wandb = wb.init(project=wandb_project, dir=str(self.dir), config=config, resume="allow")

    def _write(self, name: str, record: dict) -> None:
        f = self._files[name]
        f.write(json.dumps(_clean(record)) + "\n")
        f.flush()

    def metrics(self, iteration: int, record: dict, name: str = "metrics.jsonl") -> None:
        if not self.enabled:
            return
        self._write(name, {"iteration": iteration, **record})
        prefix = "eval/" if name == "eval.jsonl" else ""
        for k, v in record.items():
            if self._tb is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._tb.add_scalar(prefix + k, v, iteration)
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in _clean(record).items()
                             if isinstance(v, (int, float))}, step=iteration)

    def influence(self, iteration: int, episodes: list[dict], top_k: int) -> None:
        """Per-episode records, and the iteration's top-k proponents (highest scores) and opponents."""
        if not self.enabled or not self.influence_enabled:
            return
        for e in episodes:
            self._write("influence.jsonl", {"iteration": iteration, **e})
        scored = [e for e in episodes if e.get("score") is not None]
        if scored:
            order = sorted(scored, key=lambda e: e["score"])
            self._write("influence_topk.jsonl", {
                "iteration": iteration,
                "proponents": order[::-1][:top_k],
                "opponents": order[:top_k],
            })

    def close(self) -> None:
        if not self.enabled:
            return
        for f in self._files.values():
            f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
