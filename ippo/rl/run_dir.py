"""The run directory between runs: one process at a time, what a start may do to what is there, and the record
of every start.

* **Lock.** A run holds an exclusive OS lock (``fcntl.flock``) on ``run_dir/.ippo.lock`` from before it reads
  or writes anything there until it returns; a second ``ippo train`` on the same run dir is refused in one
  line naming the holder's pid. The kernel releases the lock when the holder dies (SIGKILL included), so a
  killed run never leaves a stale lock. Under torchrun rank 0 takes it and tells the other ranks the
  outcome, so that every rank fails alike.
* **Fresh starts.** ``resume=false`` in a run dir that holds checkpoints is refused unless ``overwrite=true``,
  which deletes the old checkpoints and logs first.
* **Resumes.** ``resume=true`` compares the config with the run's ``config.json`` (the config of the start that
  wrote the checkpoints): a difference in a key that changes what the run computes is refused, naming every
  such key, unless ``resume_allow_changes`` lists it (a dotted key or a section). The keys in
  ``ALWAYS_ALLOWED`` may change freely: they change how long the run goes, where and how fast it runs, what
  it logs and evaluates, and how it checkpoints, but not one number it trains. ``check_resumed_state``
  checks the checkpoint's own ``state.json`` (seed, prompts consumed) once it is loaded.
* **History.** Every start appends a line to ``config_history.jsonl``: time, pid, fresh / resume /
  overwrite, and the keys that changed (old and new values).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ippo.errors import ConfigError, RunDirError
from ippo.rl.checkpoint import checkpoint_dirs, warn
from ippo.rl.config import INPUT_PATHS, TrainConfig, to_dict
from ippo.rl.config_checks import dotted_keys, suggestion
from ippo.rl.parallel import distributed as dist

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the other checks still run)
    fcntl = None

LOCK = ".ippo.lock"
HISTORY = "config_history.jsonl"
# what overwrite=true deletes (the lock, the history and a built model such as tiny-llama/ stay)
RUN_OUTPUTS = ("checkpoints", "tb", "wandb", "config.json", "metrics.jsonl", "eval.jsonl", "influence.jsonl",
               "influence_topk.jsonl")
# keys a resume may change without asking: none changes what is computed (the run's length; where, how fast
# and with how much memory it runs; what it logs, evaluates and checkpoints; the start's own switches)
ALWAYS_ALLOWED = ("iterations", "run_dir", "resume", "overwrite", "resume_allow_changes", "threads", "device",
                  "log", "eval", "checkpoint", "data.test_path", "data.test_split", "data.max_test_rows",
                  "data.streaming", "model.gradient_checkpointing", "model.ref_offload", "influence.top_k_log",
                  "dist.fsdp_reshard_after_forward")


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.ippo.lock`` holding the holder's pid (released by ``release``, or by
    the kernel when the process ends however it ends)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"run_dir {self.path.parent} is in use by another ippo process (pid {holder}): "
                              "wait for it to end, or use another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def holds_run_dir(train: Callable[[TrainConfig], dict]) -> Callable[[TrainConfig], dict]:
    """``train(cfg)`` with the run dir locked and checked first (``open_run_dir``), unlocked when it returns."""
    @functools.wraps(train)
    def locked(cfg: TrainConfig) -> dict:
        lock = open_run_dir(cfg)
        try:
            return train(cfg)
        finally:
            if lock is not None:
                lock.release()
    return locked


def open_run_dir(cfg: TrainConfig) -> RunDirLock | None:
    """Rank 0 creates and locks the run dir and applies the fresh / overwrite / resume rules; every rank gets
    its verdict before any of them goes on (the same RunDirError everywhere). Returns rank 0's lock."""
    dist.init_from_env(cfg.device)
    lock, problem, error = None, None, None
    if dist.is_main():
        try:
            lock = prepare(cfg)
        except Exception as e:  # noqa: BLE001  -- told to every rank first, so that none waits for rank 0
            problem, error = str(e), e
    problem = dist.broadcast_object(problem)
    if error is not None and not isinstance(error, ConfigError):
        raise error  # (an unexpected failure keeps its traceback on rank 0)
    if problem is not None:
        raise error if error is not None else RunDirError(problem)
    return lock


def prepare(cfg: TrainConfig) -> RunDirLock:
    """Create and lock ``cfg.run_dir``, then refuse or carry out what this start asks of it (rank 0 only)."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(run_dir)
        lock.acquire()
    except OSError as e:
        raise RunDirError(f"run_dir {run_dir} cannot be used ({e.strerror or e}): it must be a writable "
                          "directory, or a path where one can be created") from None
    try:
        record = start_record(cfg, run_dir)
        with open(run_dir / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        lock.release()
        raise RunDirError(f"run_dir {run_dir}: {e}") from None
    except BaseException:
        lock.release()
        raise
    return lock


def has_checkpoints(run_dir: Path) -> bool:
    return bool(checkpoint_dirs(run_dir)) or (run_dir / "checkpoints" / "latest").exists()


def start_record(cfg: TrainConfig, run_dir: Path) -> dict:
    """What this start does to the run dir (after refusing what it may not do), as a config_history.jsonl line."""
    if cfg.resume and cfg.overwrite:
        raise RunDirError("resume=true and overwrite=true contradict each other: resume the run, or start it over")
    check_allowed_keys(cfg.resume_allow_changes)
    record: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), "event": "fresh"}
    if not has_checkpoints(run_dir):
        return record
    if not cfg.resume:
        if not cfg.overwrite:
            raise RunDirError(f"run_dir {run_dir} has checkpoints: pass resume=true, or overwrite=true to start over "
                              "(which deletes its checkpoints and logs)")
        remove_outputs(run_dir)
        return {**record, "event": "overwrite"}
    changed = resume_changes(cfg, run_dir)
    newest = newest_state(run_dir)
    if newest is not None:  # (checked again on the checkpoint the resume loads: restore may fall back)
        check_resumed_state(newest, cfg)
    return {**record, "event": "resume", "changed": {k: list(v) for k, v in changed.items()}}


def newest_state(run_dir: Path) -> dict | None:
    """The ``state.json`` of the newest checkpoint whose state.json reads (None when none does)."""
    for d in reversed(checkpoint_dirs(run_dir)):
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("iteration"), int):
            return state
    return None


def remove_outputs(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_allowed_keys(allowed: list[str]) -> None:
    """Every entry of ``resume_allow_changes`` names a key or a section of the config."""
    known = dotted_keys(sections=True)
    for entry in allowed:
        if entry.removesuffix(".*") not in known:
            raise ConfigError(f"resume_allow_changes: {entry!r} is not a config key or section"
                              f"{suggestion(entry.removesuffix('.*'), known)}")


def is_allowed(key: str, allowed: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in (a.removesuffix(".*") for a in allowed))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def comparable(key: str, value: Any) -> Any:
    """Input paths compare by the file they name (a relative and an absolute path to one file are equal)."""
    if key in INPUT_PATHS and isinstance(value, str) and value and ":" not in value.split("/")[0]:
        return os.path.realpath(os.path.expanduser(value))
    return value


def resume_changes(cfg: TrainConfig, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ from the run's ``config.json`` (old, new); RunDirError naming each one that
    changes what the run computes and that ``resume_allow_changes`` does not allow."""
    try:
        old = flatten(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    except FileNotFoundError:
        warn(f"{run_dir / 'config.json'} is missing: cannot check that the resumed run has the same config")
        return {}
    except (OSError, ValueError) as e:
        raise RunDirError(f"{run_dir / 'config.json'} cannot be read ({e}): cannot check the resumed config "
                          "against it") from None
    new = flatten(to_dict(cfg))
    changed = {k: (old[k], new[k]) for k in new
               if k in old and comparable(k, old[k]) != comparable(k, new[k])}
    refused = [k for k in changed if not is_allowed(k, ALWAYS_ALLOWED) and not is_allowed(k, cfg.resume_allow_changes)]
    if refused:
        diffs = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise RunDirError(f"resume=true with a config that changes what the run computes ({diffs}): resume with the "
                          f"run's config ({run_dir / 'config.json'}), or allow the change with "
                          f"resume_allow_changes=[{','.join(refused)}]")
    return changed


def check_resumed_state(state: dict, cfg: TrainConfig) -> None:
    """The loaded checkpoint's ``state.json`` agrees with the config: the same seed, and as many prompts consumed
    as ``iteration`` iterations of ``rollout.prompts_per_iter`` (unless those keys may change on resume)."""
    allowed, where = cfg.resume_allow_changes, f"the state.json of checkpoint {state['iteration']} of {cfg.run_dir}"
    seed = state.get("seed")
    if seed is not None and seed != cfg.seed and not is_allowed("seed", allowed):
        raise RunDirError(f"{where}: seed {seed}, the config says seed={cfg.seed}: resume with seed={seed}")
    consumed = state.get("prompts_consumed")
    expected = state["iteration"] * cfg.rollout.prompts_per_iter
    if consumed is not None and consumed != expected and not is_allowed("rollout.prompts_per_iter", allowed):
        raise RunDirError(f"{where}: {consumed} prompts consumed in {state['iteration']} iterations, but "
                          f"rollout.prompts_per_iter={cfg.rollout.prompts_per_iter} makes {expected}: resume with the "
                          "run's rollout.prompts_per_iter")
