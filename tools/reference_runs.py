"""Fixed-seed reference runs and their fingerprints: proof that a refactor changed no result.

    python tools/reference_runs.py record OUT_DIR [--only NAME ...] [--jobs 2]   # run + write OUT_DIR/fingerprints.json
    python tools/reference_runs.py compare A.json B.json                        # exit 1 on any difference

Each run goes through the CLI (``python -m ippo.cli train`` / ``torchrun`` / ``ippo demo``), so the same
script measures the code before and after a change. A run's fingerprint hashes what it computed:
``metrics.jsonl`` and ``eval.jsonl`` without their wall-clock ``time_*`` fields, ``influence.jsonl`` and
``influence_topk.jsonl`` byte for byte as they were before ``ippo inspect``'s fields (``INSPECT_FIELDS``, which
restate what the other fields hash: the response's tokens, the advantages, the score's normalisers) were
added, so that recordings of older commits still compare, and every tensor of the final checkpoint (names, dtypes, shapes
and raw bytes; not the file bytes, whose metadata may legitimately differ). Bit-identical results give
identical fingerprints; the comparison names every run and file that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke_cpu.yaml")

# name -> (launcher, overrides). launcher: "train" (one process), "torchrun2" (2 gloo processes), "demo".
RUNS: dict[str, tuple[str, list[str]]] = {
    "before_update": ("train", []),
    "in_update": ("train", ["influence.timing=in_update"]),
    "ppo": ("train", ["influence.enabled=false"]),
    "control_zero_variance": ("train", ["influence.enabled=false", "control.filter=zero_variance"]),
    "control_random": ("train", ["influence.enabled=false", "control.filter=random",
                                 "control.match_run={out}/before_update"]),
    "grpo_target": ("train", ["ppo.advantage=grpo", "influence.mode=target", "influence.rank=8",
                              "ppo.kl_coef=0.01", "ppo.entropy_coef=0.01", "influence.episode_loss=policy"]),
    "shared_all_in_update": ("train", ["ppo.critic=shared", "influence.episode_loss=all",
                                       "influence.timing=in_update", "ppo.micro_batch_size=4"]),
    "kl_in_reward_seq_mean": ("train", ["ppo.kl_in_reward=true", "ppo.loss_agg=seq_mean",
                                        "influence.filter=bottom_fraction", "influence.fraction=0.25",
                                        "influence.reweight=false"]),
    "sketch_skip": ("train", ["influence.mode=sketch", "influence.rank=16", "influence.on_empty=skip",
                              "ppo.mini_batch_size=4", "ppo.micro_batch_size=2", "ppo.warmup_iters=2"]),
    "stop_empty": ("train", ["influence.threshold=1.0e9"]),
    "in_update_skip_empty": ("train", ["influence.timing=in_update", "influence.threshold=1.0e9",
                                       "influence.on_empty=skip", "iterations=2"]),
    "ddp2": ("torchrun2", []),
    "fsdp2": ("torchrun2", ["dist.strategy=fsdp", "reward.fn=tests.rl.toy_rewards:has_digit"]),
    "fsdp2_in_update": ("torchrun2", ["dist.strategy=fsdp", "influence.timing=in_update",
                                      "reward.fn=tests.rl.toy_rewards:has_digit"]),
    "demo": ("demo", ["--seeds", "0", "1", "--iterations", "4", "demo.test_problems=100"]),
}


def _command(name: str, out: Path) -> list[str]:
    launcher, args = RUNS[name]
    args = [a.format(out=out) for a in args]
    run_dir = out / name
    if launcher == "train":
        return [sys.executable, "-m", "ippo.cli", "train", SMOKE, f"run_dir={run_dir}", "log.progress=false", *args]
    if launcher == "torchrun2":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "ippo.cli", "train", SMOKE, f"run_dir={run_dir}", "log.progress=false", *args]
    return [sys.executable, "-m", "ippo.cli", "demo", "--out", str(run_dir), "--jobs", "2", *args]


def _run(name: str, out: Path) -> tuple[str, int]:
    log = out / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as fh:
        rc = subprocess.run(_command(name, out), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            check=False).returncode
    return name, rc


INSPECT_FIELDS = ("response_tokens", "advantage", "token_norm", "seq_norm", "scored_after_steps")


def _without_inspect_fields(row):
    if isinstance(row, list):
        return [_without_inspect_fields(r) for r in row]
    if isinstance(row, dict):
        return {k: _without_inspect_fields(v) for k, v in row.items() if k not in INSPECT_FIELDS}
    return row


def _influence_log(path: Path) -> str:
    """sha256 of the log's bytes as the trainer wrote them without ``INSPECT_FIELDS`` (json.dumps keeps the
    key order and float reprs of the row it re-reads)."""
    h = hashlib.sha256()
    for line in path.read_text().splitlines():
        h.update((json.dumps(_without_inspect_fields(json.loads(line))) + "\n").encode())
    return h.hexdigest()


def _jsonl_without_times(path: Path) -> str:
    h = hashlib.sha256()
    for line in path.read_text().splitlines():
        row = json.loads(line)
        row = {k: v for k, v in row.items() if not k.startswith("time_") and k != "seconds"}
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()


def _tensors(path: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_run(run_dir: Path) -> dict[str, str]:
    """Hashes of one training run's outputs (or, for a demo folder, of each of its runs)."""
    fp: dict[str, str] = {}
    for f in ("metrics.jsonl", "eval.jsonl"):
        if (run_dir / f).is_file():
            fp[f] = _jsonl_without_times(run_dir / f)
    for f in ("influence.jsonl", "influence_topk.jsonl"):
        if (run_dir / f).is_file():
            fp[f] = _influence_log(run_dir / f)
    ckpts = sorted((run_dir / "checkpoints").glob("iter_*")) if (run_dir / "checkpoints").is_dir() else []
    if ckpts:
        last = ckpts[-1]
        for st in sorted(last.rglob("*.safetensors")):
            fp[f"final/{st.relative_to(last)}"] = _tensors(st)
    return fp


def fingerprint(out: Path, names: list[str]) -> dict:
    result = {}
    for name in names:
        d = out / name
        if RUNS[name][0] == "demo":
            for sub in sorted(p for p in d.rglob("metrics.jsonl")):
                result[f"{name}/{sub.parent.relative_to(d)}"] = fingerprint_run(sub.parent)
            if (d / "baseline").is_dir():
                result[f"{name}/baseline"] = fingerprint_run(d / "baseline")
        else:
            result[name] = fingerprint_run(d)
    return result


def record(out: Path, only: list[str] | None, jobs: int) -> int:
    names = only or list(RUNS)
    out.mkdir(parents=True, exist_ok=True)
    # control_random matches before_update's kept counts: run it after that run is done
    first = [n for n in names if n != "control_random"]
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        for name, rc in pool.map(lambda n: _run(n, out), first):
            print(f"{'ok' if rc == 0 else 'FAILED'}  {name}", flush=True)
            if rc:
                failed.append(name)
    if "control_random" in names:
        name, rc = _run("control_random", out)
        print(f"{'ok' if rc == 0 else 'FAILED'}  {name}", flush=True)
        if rc:
            failed.append(name)
    fps = fingerprint(out, names)
    path = out / "fingerprints.json"
    if only and path.is_file():  # a partial record updates the runs it re-ran
        fps = {**json.loads(path.read_text()), **fps}
    (out / "fingerprints.json").write_text(json.dumps(fps, indent=1, sort_keys=True) + "\n")
    print(f"fingerprints of {len(fps)} runs: {out / 'fingerprints.json'}")
    return 1 if failed else 0


def compare(a: Path, b: Path) -> int:
    fa, fb = json.loads(a.read_text()), json.loads(b.read_text())
    diffs = []
    for run in sorted(set(fa) | set(fb)):
        ra, rb = fa.get(run), fb.get(run)
        if ra is None or rb is None:
            diffs.append(f"{run}: only in {'B' if ra is None else 'A'}")
            continue
        for f in sorted(set(ra) | set(rb)):
            if ra.get(f) != rb.get(f):
                diffs.append(f"{run}/{f}: differs")
    for d in diffs:
        print(d)
    print(f"{len(set(fa) | set(fb))} runs compared: " + ("bit-identical" if not diffs else f"{len(diffs)} differences"))
    return 1 if diffs else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--only", nargs="+", choices=list(RUNS))
    r.add_argument("--jobs", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "record":
        return record(a.out, a.only, a.jobs)
    return compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
