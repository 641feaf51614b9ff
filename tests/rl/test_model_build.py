"""builtin:tiny-llama is built into the run dir atomically; a half-built one is rebuilt (issue 15, item 2)."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ippo.rl import models
from ippo.rl.config import ModelConfig, load_config
from ippo.rl.loop import train
from ippo.rl.models import BUILD_MANIFEST, build_problem, resolve_path

from .conftest import fast_overrides

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(path="builtin:tiny-llama")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A complete build, and its files in the order the builder writes them (model, then tokenizer)."""
    d = Path(resolve_path(TINY, tmp_path_factory.mktemp("ref")))
    first = ["config.json", "generation_config.json", "model.safetensors"]
    files = [d / n for n in first] + sorted(p for p in d.iterdir() if p.name not in (*first, BUILD_MANIFEST))
    assert all(f.is_file() for f in files) and len(files) >= 5
    return d, files


def _digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.name != BUILD_MANIFEST}


def _write_until(d: Path, files: list[Path], k: int, cut: str) -> None:
    """What a build killed while writing file k leaves: files before k whole, file k cut short, none after."""
    d.mkdir(parents=True)
    for f in files[:k]:
        shutil.copyfile(f, d / f.name)
    data = files[k].read_bytes()
    (d / files[k].name).write_bytes(b"" if cut == "empty" else data[:len(data) // 2])


def _assert_complete(run: Path, reference_dir: Path) -> None:
    d = run / "tiny-llama"
    assert build_problem(d) is None
    assert _digests(d) == _digests(reference_dir)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tiny-llama")]  # no temp folder left


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_a_build_killed_at_any_file_is_detected_and_rebuilt(reference, tmp_path, cut):
    """The non-atomic build (before this fix, or any damage) killed at each of its files: resolve_path used to
    hand that folder on whenever config.json existed, so every resume failed to load it."""
    ref_dir, files = reference
    for k in range(len(files)):
        run = tmp_path / f"{cut}{k}"
        _write_until(run / "tiny-llama", files, k, cut)
        assert build_problem(run / "tiny-llama") is not None
        assert resolve_path(TINY, run) == str(run / "tiny-llama")
        _assert_complete(run, ref_dir)
    damaged = tmp_path / f"{cut}0" / "tiny-llama" / "model.safetensors"  # a built folder damaged later
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    assert "model.safetensors does not match" in build_problem(damaged.parent)
    resolve_path(TINY, damaged.parent.parent)
    _assert_complete(damaged.parent.parent, ref_dir)


def test_a_failure_at_any_file_of_the_atomic_build_leaves_no_model_dir(reference, tmp_path, monkeypatch):
    """A build that dies at file k (here: raises after writing half of it) never shows a half-built
    tiny-llama/; a kill (no clean-up) leaves only a temporary folder, which the next build removes."""
    ref_dir, files = reference

    class Died(Exception):
        pass

    for k in range(len(files)):
        def dying_build(d, k=k):
            shutil.rmtree(d)
            _write_until(Path(d), files, k, "half")
            raise Died

        run = tmp_path / f"fail{k}"
        monkeypatch.setattr(models, "build_tiny_llama", dying_build)
        with pytest.raises(Died):
            resolve_path(TINY, run)
        assert not (run / "tiny-llama").exists()
        _write_until(run / f".tiny-llama.tmp-dead{k}", files, k, "half")  # what a SIGKILL would have left
        (run / ".tiny-llama.old-1").mkdir()  # and one killed while swapping out a broken folder
        monkeypatch.undo()
        resolve_path(TINY, run)
        _assert_complete(run, ref_dir)
    # a complete folder is used as it is, not rebuilt
    monkeypatch.setattr(models, "build_tiny_llama", lambda d: pytest.fail("rebuilt a complete model dir"))
    resolve_path(TINY, tmp_path / "fail0")


def test_sigkill_while_building_then_the_run_resumes(reference, tiny_model_dir, tmp_path):
    """A real SIGKILL as config.json appears (the issue's case: every later resume=true then failed to parse
    it): the run dir has no tiny-llama/, and `resume=true` builds it and trains."""
    ref_dir, _ = reference
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        from pathlib import Path
        import ippo.rl.models as m
        real = m.build_tiny_llama
        def killed_build(d):
            def watch():  # SIGKILL this process the moment the builder creates its first file
                while not list(Path(d).iterdir()):
                    time.sleep(0.0002)
                os.kill(os.getpid(), signal.SIGKILL)
            threading.Thread(target=watch, daemon=True).start()
            real(d)
            time.sleep(60)
        m.build_tiny_llama = killed_build
        m.resolve_path(m.ModelConfig(path="builtin:tiny-llama"), {str(run)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (run / "tiny-llama").exists() and list(run.glob(".tiny-llama.tmp-*"))
    overrides = [o for o in fast_overrides(tiny_model_dir, run) if not o.startswith("model.path=")]
    cfg = load_config(None, [*overrides, "model.path=builtin:tiny-llama", "iterations=1", "resume=true"])
    assert train(cfg)["iterations_done"] == 1
    _assert_complete(run, ref_dir)
