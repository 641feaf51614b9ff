"""Resume with a damaged latest checkpoint: the damage is named in one line, the run falls back to the previous
checkpoint and ends bit-identical to an uninterrupted run; a damaged only-checkpoint is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ippo import cli
from ippo.rl.config import load_config
from ippo.rl.loop import train

from .checkpoint.common import DAMAGE
from .conftest import fast_overrides

COMMON = ["checkpoint.every=1", "influence.mode=exact"]  # keep_last: its default (2) leaves a fall-back


def _final(run: Path) -> dict:
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    out = {f"policy.{k}": v for k, v in load_file(str(ck / "policy.safetensors")).items()}
    out.update({f"value.{k}": v for k, v in load_file(str(ck / "value.safetensors")).items()})
    return out


def _metrics(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(m["iteration"], m["reward"], m["kept"], m["pg_loss"]) for m in rows]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 3-iteration run, and a run stopped after 2 (checkpoints iter_1 and iter_2) to damage."""
    root = tmp_path_factory.mktemp("damage")
    n = torch.get_num_threads()
    train(load_config(None, fast_overrides(tiny_model_dir, root / "ref") + COMMON + ["iterations=3"]))
    train(load_config(None, fast_overrides(tiny_model_dir, root / "two") + COMMON + ["iterations=2"]))
    torch.set_num_threads(n)
    return root


def _damaged_copy(runs: Path, tmp_path: Path, kind: str, checkpoints=("iter_000002",)) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs / "two", run)
    name, damage = DAMAGE[kind]
    for c in checkpoints:
        damage(run / "checkpoints" / c / name)
    return run


@pytest.mark.parametrize("kind", ["truncated policy", "flipped tensor bit", "missing value", "broken state.json",
                                  "empty optimizer", "truncated rng"])
def test_resume_falls_back_past_damage_and_ends_bit_identical(runs, tiny_model_dir, tmp_path, capsys, kind):
    run = _damaged_copy(runs, tmp_path, kind)
    cfg = load_config(None, fast_overrides(tiny_model_dir, run) + COMMON + ["iterations=3", "resume=true"])
    assert train(cfg)["iterations_done"] == 3
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ippo:")]
    name = DAMAGE[kind][0]
    assert len(said) == 2, said
    assert "iter_000002" in said[0] and name in said[0] and "falling back" in said[0]
    assert "resuming from" in said[1] and "iter_000001" in said[1]
    a, b = _final(runs / "ref"), _final(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run) == _metrics(runs / "ref")  # iteration 1 retraced, logs cut back to it


def test_damaged_only_checkpoint_is_a_one_line_error(runs, tiny_model_dir, tmp_path, capsys):
    run = _damaged_copy(runs, tmp_path, "flipped tensor bit", checkpoints=("iter_000001", "iter_000002"))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    before = (run / "metrics.jsonl").read_text()
    rc = cli.main(["train", str(cfg_file), *fast_overrides(tiny_model_dir, run), *COMMON, "iterations=3",
                   "resume=true"])
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if x.startswith("ippo:")]
    assert rc == 2 and "Traceback" not in err
    assert len(said) == 2 and "iter_000002" in said[0] and "falling back" in said[0]
    assert said[1].startswith("ippo: error: resume=true but no checkpoint") and "policy.safetensors" in said[1]
    assert (run / "metrics.jsonl").read_text() == before  # nothing was touched


def test_checkpoint_of_the_previous_version_resumes_with_a_warning(runs, tiny_model_dir, tmp_path, capsys):
    """No manifest (written before ippo checked them): loaded unverified with a warning, still bit-identical."""
    run = _damaged_copy(runs, tmp_path, "missing manifest", checkpoints=("iter_000001", "iter_000002"))
    for c in ("iter_000001", "iter_000002"):
        state_file = run / "checkpoints" / c / "state.json"
        state = json.loads(state_file.read_text())
        del state["checkpoint_format"]
        state_file.write_text(json.dumps(state))
    cfg = load_config(None, fast_overrides(tiny_model_dir, run) + COMMON + ["iterations=3", "resume=true"])
    assert train(cfg)["iterations_done"] == 3
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ippo:")]
    assert len(said) == 1 and "iter_000002" in said[0] and "unverified" in said[0]
    a, b = _final(runs / "ref"), _final(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
