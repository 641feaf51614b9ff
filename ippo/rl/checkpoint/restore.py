"""Reading checkpoints back: which checkpoint a run resumes from, the resume itself, the policy for
``ippo eval`` and the report of ``ippo verify``.

Resuming (``restore_checkpoint``): the checkpoint ``latest`` names, then older ones, newest first.
Each is verified (every file present, with the size and sha256 its manifest records) before any of
its files is read, every file is parsed before any live object changes, and any failure is reported
in one line naming the file; the run then falls back to the next one, or stops with a one-line
``CheckpointError`` when none loads. Checkpoints written before manifests existed load with a warning.
A checkpoint of the other layout (sharded vs whole) or of another number of processes stops the resume
at once with a one-line error (the older checkpoints of the run were written by the same launch). In a
run of several processes rank 0 lists the candidates and every rank's findings are gathered, so that
all ranks fall back to the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ippo.rl.parallel import distributed as dist

from .files import CheckpointError, Report, apply_file, one_line, warn
from .layout import MANIFEST, checkpoint_dirs, iteration_of, layout_of, layout_problem
from .manifest import agreed, verify_checkpoint, verify_share
from .sharded import load_sharded, read_policy_weights
from .whole import load_tensors_into, load_whole


def named_by_latest(root: Path, text: str) -> tuple[Path, str | None]:
    """The checkpoint directory ``root/latest`` names by ``text``, and why it is not one of this run's (None when
    it is): ``latest`` holds a bare ``iter_N`` name, and resolves inside ``root`` (no ``..``, no link elsewhere)."""
    named = root / text
    if Path(text).name != text or iteration_of(named) is None:
        return named, f"{root / 'latest'} names {text!r}, which is not a checkpoint directory of this run"
    if named.resolve().parent != root.resolve():
        return named, f"{root / 'latest'} names {text!r}, which resolves outside {root}"
    if not named.is_dir():
        return named, f"{root / 'latest'} names {text!r}, which is not a checkpoint directory"
    return named, None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory ``latest`` names (the newest checkpoint that verified when written), unchecked."""
    root = Path(run_dir) / "checkpoints"
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    path, problem = named_by_latest(root, ptr.read_text().strip())
    if problem is not None:
        raise CheckpointError(problem)
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
        named, problem = named_by_latest(root, ptr.read_text().strip())
        if problem is not None:
            note = f"{problem}; trying every checkpoint directory, newest first"
    except FileNotFoundError:
        if not dirs:
            return [], None  # a run that has not checkpointed yet
        note = f"{ptr} is missing; trying every checkpoint directory, newest first"
    except (OSError, UnicodeDecodeError) as e:
        note = f"{ptr} cannot be read ({one_line(e)}); trying every checkpoint directory, newest first"
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
    candidates, and each step's findings are gathered (``agreed``) so that all ranks fall back
    together. ``sharded`` (``dist.strategy=fsdp``): each rank verifies its own shard files and the files
    every rank reads, then loads its own shards.
    """
    root = Path(run_dir) / "checkpoints"
    world = dist.world_size() if sharded else None
    candidates, note = dist.broadcast_object(resume_candidates(run_dir) if dist.is_main() else None)
    if note:
        report(note)
    failures = []
    for i, path in enumerate(candidates):
        mismatch = agreed(layout_problem(path, world))
        if mismatch is not None:
            raise CheckpointError(mismatch)
        verdict = agreed(verify_share(path, dist.rank()) if sharded else verify_checkpoint(path))
        problem = verdict.problem
        if verdict.usable:
            try:
                load = load_sharded if sharded else load_whole
                state = load(path, policy=policy, value=value, optimizer=optimizer, scheduler=scheduler,
                             trainable_only=trainable_only, device=device)
            except CheckpointError as e:
                problem = str(e)
            problem = agreed(problem)  # a rank that could not load: every rank falls back
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
    apply_file("the policy shards" if sharded else "policy.safetensors",
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
