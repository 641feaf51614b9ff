"""Short fixed-seed runs pinned to committed metrics: a change that alters what the trainer computes shows here.

The reference (``data/reference_runs.json``) holds every metric but the wall-clock times of 2-iteration PPO,
I-PPO (before_update) and I-PPO (in_update) runs on the tiny test model, and each run's influence-log
summary. Counts must match exactly; floats to 1e-6 relative (a different CPU may round a last bit
differently; a behaviour change moves them far more). A deliberate change of results regenerates it:

    IPPO_UPDATE_REFERENCE=1 python -m pytest -q tests/rl/test_reference_run.py

and the commit says why the numbers moved. ``tools/reference_runs.py`` is the bit-for-bit check of larger
runs (2-process DDP/FSDP, the demo) against a recording of an earlier commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from ippo.rl.loop import train

REFERENCE = Path(__file__).parent / "data" / "reference_runs.json"
RUNS = {
    "ppo": ["influence.enabled=false"],
    "ippo_before_update": ["ppo.kl_coef=0.01"],
    "ippo_in_update": ["influence.timing=in_update", "ppo.micro_batch_size=4"],
}


def _summary(run_dir: Path) -> dict:
    metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    episodes = [json.loads(line) for line in (run_dir / "influence.jsonl").read_text().splitlines()]
    return {"metrics": metrics,
            "kept_episodes": [e["episode"] for e in episodes if e["kept"]],
            "responses": [e["response"] for e in episodes],
            "scores": [e["score"] for e in episodes]}


def _close(a, b, path: str, problems: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                problems.append(f"{path}.{k}: only in {'the run' if k in a else 'the reference'}")
            else:
                _close(a[k], b[k], f"{path}.{k}", problems)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", problems)
    elif isinstance(a, float) and isinstance(b, float):
        if not (math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))):
            problems.append(f"{path}: {a!r} != reference {b!r}")
    elif a != b:
        problems.append(f"{path}: {a!r} != reference {b!r}")


@pytest.mark.parametrize("name", list(RUNS))
def test_short_run_matches_the_committed_reference(make_cfg, tmp_path, name):
    run = tmp_path / name
    train(make_cfg(*RUNS[name], run_dir=run))
    got = _summary(run)
    refs = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    if os.environ.get("IPPO_UPDATE_REFERENCE") == "1":
        refs[name] = got
        REFERENCE.write_text(json.dumps(refs, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"reference for {name} rewritten")
    assert name in refs, f"no reference for {name}: run with IPPO_UPDATE_REFERENCE=1 once"
    problems: list[str] = []
    _close(got, refs[name], name, problems)
    assert not problems, "the run differs from the committed reference:\n" + "\n".join(problems[:20])
