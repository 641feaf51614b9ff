"""A run killed with SIGKILL at arbitrary moments resumes to exactly the weights of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ippo.rl.checkpoint import latest_checkpoint
from ippo.rl.config import load_config
from ippo.rl.loop import train

from .conftest import fast_overrides

ROOT = Path(__file__).resolve().parents[2]


def _final(run: Path) -> dict:
    ck = latest_checkpoint(run)
    out = {f"policy.{k}": v for k, v in load_file(str(ck / "policy.safetensors")).items()}
    out.update({f"value.{k}": v for k, v in load_file(str(ck / "value.safetensors")).items()})
    return out


def _launch(overrides: list[str], cfg_file: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "ippo.cli", "train", str(cfg_file), *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _checkpoints_done(run: Path) -> int:
    ptr = run / "checkpoints" / "latest"
    try:
        return int(ptr.read_text().strip().split("_")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def test_sigkill_and_resume_gives_identical_weights(tiny_model_dir, tmp_path, restore_threads):
    common = ["iterations=6", "checkpoint.every=1", "checkpoint.keep_last=1", "influence.mode=exact"]
    # uninterrupted reference (in this process)
    ref_run = tmp_path / "ref"
    train(load_config(None, fast_overrides(tiny_model_dir, ref_run) + common))

    run = tmp_path / "killed"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    overrides = fast_overrides(tiny_model_dir, run) + common
    rng = random.Random(0)
    kills = 0
    for target_ckpt in (1,):  # kill at a random moment after the first checkpoint (mid-iteration or mid-write)
        proc = _launch(overrides + ["resume=true"], cfg_file)
        deadline = time.time() + 120
        while _checkpoints_done(run) < target_ckpt and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            # killed before the last checkpoint, or the resumed run has nothing left to prove
            kills += _checkpoints_done(run) < 6
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
    assert kills >= 1, "the run got to its last checkpoint before it was killed: the test proved nothing"
    proc = _launch(overrides + ["resume=true"], cfg_file)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()[-3000:]

    a, b = _final(ref_run), _final(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # logs were cut back on resume: one line per iteration, same rewards and kept counts
    ref_m = [json.loads(x) for x in (ref_run / "metrics.jsonl").read_text().splitlines()]
    got_m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in got_m] == [0, 1, 2, 3, 4, 5]
    assert [(m["reward"], m["kept"]) for m in got_m] == [(m["reward"], m["kept"]) for m in ref_m]
    assert not list((run / "checkpoints").glob("*.tmp-*"))
