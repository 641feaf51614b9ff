"""Bad input ends in one line, ``ippo: error: ...`` with exit code 2, never a traceback (issue 22, items 6, 8, 9):
driven through ``ippo.cli.main`` as a user runs the command."""

from __future__ import annotations

import errno
import importlib
import json

import pytest
import torch

from ippo import cli
from ippo.rl.checkpoint import files

from .checkpoint.common import save
from .conftest import DATA, fast_overrides


@pytest.fixture
def ippo(capsys):
    """``ippo ARGS...`` -> (exit code, stdout, stderr); a traceback fails the test."""
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and "Traceback" not in out
        return rc, out, err
    return run


@pytest.fixture
def empty_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("{}\n")
    return f


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- 8. one line each


def _zero_row_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    return path


NOT_UTF8 = b'{"question": "caf\xe9", "answer": "#### 1"}\n'
CASES = {  # name: (setup(tmp_path) -> extra overrides, what stderr's one line names)
    "non-UTF-8 JSONL": (lambda t: [f"data.train_path={_write(t / 'bad.jsonl', NOT_UTF8)}"],
                        "bad.jsonl:1: not UTF-8 text"),
    "zero-row parquet": (lambda t: [f"data.train_path={_zero_row_parquet(t / 'zero.parquet')}"],
                         "zero.parquet (data.train_path) has no rows"),
    "missing model.path": (lambda t: ["model.path=/nonexistent/model"], "model.path '/nonexistent/model' does not"),
    "empty model.path": (lambda t: ["model.path="], "model.path is required"),
    "model.path a file": (lambda t: [f"model.path={_write(t / 'f', b'x')}"], "cannot load the tokenizer"),
    "model.path an empty dir": (lambda t: [f"model.path={t}"], "model.path {t}: cannot load"),
    "missing gguf file": (lambda t: ["model.gguf_file=nope.gguf"], "nope.gguf"),
    "reward.fn=nope": (lambda t: ["reward.fn=nope"], "unknown reward.fn 'nope'"),
    "reward.fn module": (lambda t: ["reward.fn=no_such_module:f"], "reward.fn=no_such_module:f: cannot import"),
    "eval.response_metrics": (lambda t: ["eval.response_metrics=no_such_module:f"],
                              "eval.response_metrics=no_such_module:f: cannot import"),
    "control.match_run": (lambda t: ["influence.enabled=false", "control.filter=random", f"control.match_run={t}/x"],
                          "control.match_run"),
    "threads=-2": (lambda t: ["threads=-2"], "threads=-2: must be >= 0"),
    "rollout.temperature=.nan": (lambda t: ["rollout.temperature=.nan"], "rollout.temperature=nan: must be a finite"),
    "run_dir a file": (lambda t: [f"run_dir={_write(t / 'afile', b'x')}"], "afile cannot be used"),
    "run_dir under a file": (lambda t: [f"run_dir={_write(t / 'afile', b'x')}/run"], "afile/run cannot be used"),
    "device=cuda without a GPU": (lambda t: ["device=cuda"], "device=cuda but torch sees no CUDA GPU"),
    "bad override YAML": (lambda t: ["ppo.lr=[1"], "override 'ppo.lr=[1': not valid YAML at line 1"),
    "override without =": (lambda t: ["ppo.lr"], "override 'ppo.lr' is not key=value"),
    "unknown key": (lambda t: ["ppo.lrr=1"], "unknown config key(s): ppo.lrr (did you mean ppo.lr?)"),
    "unknown section key": (lambda t: ["rollout.temprature=1"], "(did you mean rollout.temperature?)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(ippo, empty_config, tiny_model_dir, tmp_path, case):
    if case == "device=cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    setup, names = CASES[case]
    extra = setup(tmp_path)
    rc, _, err = ippo("train", empty_config, *fast_overrides(tiny_model_dir, tmp_path / "run"), *extra)
    lines = [x for x in err.splitlines() if x.startswith("ippo: error:")]
    assert rc == 2 and len(lines) == 1, err
    assert names.replace("{t}", str(tmp_path)) in err[err.index("ippo: error:"):], err  # (bad rows: one a line)


@pytest.mark.parametrize("text,names", [
    (b"a: [1\n", "not valid YAML at line 2, column 1"),
    (b"model:\n\tpath: x\n", "not valid YAML at line 2, column 1: found character '\\t'"),
    (b"model: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    (b"seed: 1  # caf\xe9\n", "not UTF-8 text"),
    (b"- a\n- b\n", "top level must be a mapping"),
])
def test_bad_yaml_files_are_one_line(ippo, tmp_path, text, names):
    f = _write(tmp_path / "bad.yaml", text)
    rc, _, err = ippo("train", f)
    assert rc == 2 and err.startswith(f"ippo: error: {f}") and names in err and err.count("\n") == 1, err


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EROFS, "Read-only file system")])
def test_a_full_or_read_only_disk_during_a_checkpoint_is_one_line(ippo, empty_config, tiny_model_dir, tmp_path,
                                                                  monkeypatch, error):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(files, "save_file", fail)
    run = tmp_path / "run"
    rc, _, err = ippo("train", empty_config, *fast_overrides(tiny_model_dir, run), "iterations=1")
    assert rc == 2 and err.strip().splitlines()[-1].startswith("ippo: error: cannot write checkpoint iter_000001")
    assert error.strerror in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == []  # the half-written .tmp dir is gone


def test_ctrl_c_is_one_line_and_exit_code_130(ippo, empty_config, tiny_model_dir, tmp_path, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr("ippo.rl.loop.train", interrupted)
    rc, _, err = ippo("train", empty_config, *fast_overrides(tiny_model_dir, tmp_path / "run"))
    assert rc == 130 and err.strip() == "ippo: interrupted; resume with resume=true"


# ---------------------------------------------------------------------------------------------- 6. eval


def test_eval_of_a_run_without_checkpoints_is_an_error_and_creates_nothing(ippo, empty_config, tmp_path):
    typo = tmp_path / "runs" / "typo"
    args = ("eval", empty_config, "model.path=builtin:tiny-llama", f"run_dir={typo}", "device=cpu",
            f"data.train_path={DATA / 'arith_train.jsonl'}", f"data.test_path={DATA / 'arith_test.jsonl'}",
            "data.val_holdout=4", "eval.k=0", "eval.num_prompts=2", "eval.max_new_tokens=2",
            'data.prompt_template="q: {question}\\na:"')
    rc, out, err = ippo(*args)
    assert rc == 2 and "has no checkpoint to evaluate" in err and "--base" in err and out == ""
    assert not typo.exists() and not (tmp_path / "runs").exists()
    rc, out, err = ippo(*args, "--base")  # the starting model, asked for
    assert rc == 0 and json.loads(out)["checkpoint"] is None and json.loads(out)["eval_prompts"] == 2
    assert not typo.exists()
    save(typo, 1)
    rc, _, err = ippo(*args, "--base", "--checkpoint", typo / "checkpoints" / "iter_000001")
    assert rc == 2 and "--base" in err


# ---------------------------------------------------------------------------------------------- 9. first run


def test_help_lists_exactly_the_commands_that_exist(ippo):
    rc, out, _ = ippo("--help")
    commands = [line.split()[0] for line in out.split("commands:")[1].strip().splitlines()[:-2] if line.strip()]
    assert rc == 0 and commands == ["train", "eval", "verify", "inspect", "demo"]
    rc, _, err = ippo("explain")
    assert rc == 2 and "unknown command 'explain'" in err


@pytest.mark.parametrize("command", ["train", "eval", "verify", "inspect"])
def test_each_command_has_its_own_help(ippo, command):
    rc, out, _ = ippo(command, "--help")
    assert rc == 0 and "usage: usage:" not in out and out.startswith(f"usage: ippo {command}")
    if command == "inspect":
        assert "--iteration" in out and "checkpoint.keep_every" in out
    elif command != "verify":
        assert "CONFIG is a YAML file" in out and "key=value" in out and "ippo/rl/settings.py" in out
        assert out.count(f"ippo {command} configs/smoke_cpu.yaml") == 2
    if command == "eval":
        assert "--base" in out


def test_the_cuda_backend_says_there_is_no_gpu(monkeypatch):
    backends = importlib.import_module("ippo.influence.backends")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backends._probe.cache_clear()
    try:
        reason = backends.backends()["cuda"].reason
    finally:
        backends._probe.cache_clear()
    assert reason.startswith("no CUDA GPU") and "driver" not in reason
