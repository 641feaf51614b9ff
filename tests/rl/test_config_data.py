"""Config loading and overrides; bad configs and bad data rows fail clearly, before any compute."""

import json
import time

import pytest

from ippo import cli
from ippo.rl.config import ConfigError, load_config, parse_overrides
from ippo.rl.data import DataError, iteration_prompts, iteration_val_indices, load_jsonl
from ippo.rl.loop import train

from .conftest import DATA

BASE = ["model.path=/nonexistent/model", f"data.train_path={DATA / 'arith_train.jsonl'}", "data.val_holdout=4"]


def test_yaml_and_dotted_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 3\nppo:\n  lr: 2.0e-6\ninfluence:\n  mode: sketch\n")
    cfg = load_config(y, BASE + ["influence.mode=target", "ppo.epochs=3", "rollout.top_p=0.5", "resume=true"])
    assert cfg.seed == 3 and cfg.ppo.lr == 2e-6  # from YAML
    assert cfg.influence.mode == "target" and cfg.ppo.epochs == 3 and cfg.rollout.top_p == 0.5 and cfg.resume
    assert cfg.ppo.value_lr is None
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_repo_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no configs"
    for f in files:
        load_config(f)


@pytest.mark.parametrize("override,match", [
    ("influence.mod=exact", "unknown config key.*influence.mod"),
    ("influence.mode=fast", "influence.mode='fast'"),
    ("influence.target_basis=svd", "influence.target_basis='svd'"),
    ("data.streaming=maybe", "expected true/false"),
    ("ppo.epochs=0", "ppo.epochs=0"),
    ("ppo.epochs=1.5", "ppo.epochs: expected an integer"),
    ("rollout.temperature=0", "temperature"),
    ("influence.filter=bottom_fraction", None),  # valid
    ("influence.on_empty=ignore", "on_empty"),
    ("ppo.loss_agg=sum", "loss_agg"),
    ("log.wandb=maybe", "expected true/false"),
    ("data.prompt_template=hello", "must contain"),
    ("nonsense", "not key=value"),
])
def test_bad_configs(override, match):
    if match is None:
        load_config(None, BASE + [override])
        return
    with pytest.raises(ConfigError, match=match):
        load_config(None, BASE + [override])


def test_influence_needs_validation_data():
    with pytest.raises(ConfigError, match="val_path or data.val_holdout"):
        load_config(None, ["model.path=x", f"data.train_path={DATA / 'arith_train.jsonl'}"])
    load_config(None, ["model.path=x", f"data.train_path={DATA / 'arith_train.jsonl'}", "influence.enabled=false"])


def test_bad_data_rows_are_listed_with_line_numbers(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q1", "answer": "#### 1"}\nnot json\n[1,2]\n{"question": "q"}\n'
                 '{"question": "", "answer": "a"}\n')
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert "4 bad row(s)" in msg
    assert ":2: not valid JSON" in msg and ":3: expected a JSON object" in msg
    assert ":4: missing or empty string field(s): answer" in msg and ":5:" in msg
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_bad_data_fails_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1, "answer": "2"}\n')
    cfg = load_config(None, [f"model.path={tmp_path / 'no_model_here'}", f"data.train_path={bad}",
                             "influence.enabled=false", f"run_dir={tmp_path / 'run'}"])
    t0 = time.time()
    with pytest.raises(DataError, match="question"):
        train(cfg)  # the data error, not a missing-model error: data is checked first
    assert time.time() - t0 < 5


def test_unknown_reward_fails_before_model(tmp_path):
    cfg = load_config(None, [f"model.path={tmp_path / 'none'}", f"data.train_path={DATA / 'arith_train.jsonl'}",
                             "influence.enabled=false", "reward.fn=pkg_that_does_not_exist:f",
                             f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="cannot import reward module"):
        train(cfg)


def test_prompt_too_long_is_reported(make_cfg):
    cfg = make_cfg("data.max_prompt_tokens=5")
    with pytest.raises(DataError, match="exceed data.max_prompt_tokens=5"):
        train(cfg)


def test_cli_reports_config_errors(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  path: x\n  colour: red\n")
    assert cli.main(["train", str(y)]) == 2
    assert "unknown config key(s): model.colour" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(["--help"]) == 0


def test_data_orders_are_seeded_functions_of_iteration():
    a = iteration_prompts(10, 4, seed=1, iteration=2)
    assert a == iteration_prompts(10, 4, seed=1, iteration=2)
    assert a != iteration_prompts(10, 4, seed=2, iteration=2)
    # an epoch (10 rows) covers every row exactly once
    first = [i for it in range(5) for i in iteration_prompts(10, 2, seed=0, iteration=it)]
    assert sorted(first) == list(range(10))
    v = iteration_val_indices(20, 5, seed=0, iteration=0)
    assert len(set(v)) == 5 and v != iteration_val_indices(20, 5, seed=0, iteration=1)


def test_gold_and_calculator_stripping():
    rows = load_jsonl(DATA / "arith_train.jsonl")
    r = rows[0]
    assert "<<" not in r.solution and r.gold == json.loads((DATA / "arith_train.jsonl").read_text().split("\n")[0])[
        "answer"].split("#### ")[1]


def test_cli_demo_dispatch_is_lazy(capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("ippo.demo") is None:
        assert cli.main(["demo"]) == 2
        assert "not available" in capsys.readouterr().err
    else:
        import ippo.demo

        called = []
        monkeypatch.setattr(ippo.demo, "main", lambda argv: called.append(argv) or 0)
        assert cli.main(["demo", "--x"]) == 0 and called == [["--x"]]


def test_config_input_paths_resolve_next_to_the_config(tmp_path, monkeypatch):
    """Issue 12.6: `ippo train /path/to/configs/smoke_cpu.yaml` works from any folder."""
    from pathlib import Path

    repo_configs = Path(__file__).resolve().parents[2] / "configs"
    monkeypatch.chdir(tmp_path)  # anywhere but the repository root
    cfg = load_config(repo_configs / "smoke_cpu.yaml")
    assert Path(cfg.data.train_path).is_file() and Path(cfg.data.train_path).is_absolute()
    assert Path(cfg.data.test_path).is_file()
    assert cfg.model.path == "builtin:tiny-llama"  # not a path: untouched
    assert cfg.run_dir == "runs/smoke"  # an output: relative to the working directory

    sub = tmp_path / "cfgs"
    sub.mkdir()
    (sub / "rows.jsonl").write_text((DATA / "arith_train.jsonl").read_text())
    (tmp_path / "here.jsonl").write_text("")
    y = sub / "c.yaml"
    y.write_text("model:\n  path: Qwen/Qwen2.5-0.5B\ndata:\n  train_path: rows.jsonl\n  test_path: here.jsonl\n"
                 "  val_holdout: 4\n")
    cfg = load_config(y)
    assert cfg.data.train_path == str((sub / "rows.jsonl").resolve())  # found next to the config
    assert cfg.data.test_path == "here.jsonl"  # not next to it: as given (working directory)
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B"  # a hub id stays a hub id
    # command-line overrides stay relative to the working directory
    assert load_config(y, ["data.train_path=here.jsonl"]).data.train_path == "here.jsonl"


# ---------------------------------------------------------------------------- data sources through `datasets`
ROWS = [json.loads(line) for line in (DATA / "arith_train.jsonl").read_text().splitlines()[:12]]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' Arrow cache in a temporary folder (read at call time, so patching the config suffices)."""
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _triples(rows):
    return [(r.question, r.solution, r.gold) for r in rows]


def _arrow_files(folder):
    return sorted(folder.rglob("*.arrow")) if folder.exists() else []


def test_every_source_gives_the_jsonl_rows(tmp_path, hf_cache):
    """JSONL, parquet, a save_to_disk Dataset and DatasetDict, and a script-free repo folder
    (data/<split>-*.parquet, read by datasets.load_dataset offline) give the same examples."""
    from datasets import Dataset, DatasetDict

    from ippo.rl.data import load_examples

    want = _triples(load_jsonl(DATA / "arith_train.jsonl", max_rows=12))
    ds = Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "one"))
    other = Dataset.from_list(ROWS[:3])
    DatasetDict({"train": ds, "validation": other}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    other.to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))

    assert _triples(load_examples(DATA / "arith_train.jsonl", max_rows=12)) == want
    assert _triples(load_examples(tmp_path / "train.parquet")) == want
    assert _triples(load_examples(tmp_path / "one")) == want
    assert _triples(load_examples(tmp_path / "dict")) == want  # default split: train
    assert _triples(load_examples(tmp_path / "dict", default_split="validation")) == want[:3]
    assert _triples(load_examples(tmp_path / "dict", split="validation")) == want[:3]
    assert _triples(load_examples(tmp_path / "repo")) == want
    assert _triples(load_examples(tmp_path / "repo", default_split="test")) == want[:3]
    assert _triples(load_examples(tmp_path / "repo", streaming=True, max_rows=4)) == want[:4]
    rows = load_examples(tmp_path / "train.parquet", max_rows=5)
    assert [r.idx for r in rows] == list(range(5))


def test_field_mapping_and_config_keys(tmp_path, hf_cache):
    from datasets import Dataset

    from ippo.rl.data import load_examples, load_split

    mapped = [{"problem": r["question"], "solution": r["answer"], "extra": 1} for r in ROWS]
    Dataset.from_list(mapped).to_parquet(str(tmp_path / "m.parquet"))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mapped))
    want = _triples(load_jsonl(DATA / "arith_train.jsonl", max_rows=12))
    for f in ("m.parquet", "m.jsonl"):
        assert _triples(load_examples(tmp_path / f, question_field="problem", answer_field="solution")) == want
    with pytest.raises(DataError, match=r"no column\(s\) 'question', 'answer' .*set data.question_field, "
                                        r"data.answer_field"):
        load_examples(tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m.jsonl:1: missing or empty string field\(s\): question, answer"):
        load_examples(tmp_path / "m.jsonl")
    cfg = load_config(None, ["model.path=x", f"data.train_path={tmp_path / 'm.parquet'}", "data.val_holdout=2",
                             "data.question_field=problem", "data.answer_field=solution", "data.streaming=true"])
    assert _triples(load_split(cfg.data, "train", 3)) == want[:3]
    with pytest.raises(ConfigError, match="data.answer_field must name a column"):
        load_config(None, BASE + ["data.answer_field= "])


def test_streaming_reads_lazily_without_an_arrow_copy(tmp_path, hf_cache):
    """streaming=true: max_rows rows are read and no Arrow cache is written; without it datasets
    converts the file into its cache first. A bad row beyond max_rows is never reached either way,
    and reading every row reports it by its index."""
    from datasets import Dataset

    from ippo.rl.data import load_examples

    rows = [dict(r) for r in ROWS * 4]
    rows[30]["question"] = ""
    Dataset.from_list(rows).to_parquet(str(tmp_path / "big.parquet"), batch_size=8)  # several row groups
    assert len(load_examples(tmp_path / "big.parquet", streaming=True, max_rows=5)) == 5
    assert _arrow_files(hf_cache) == []
    assert len(load_examples(tmp_path / "big.parquet", max_rows=5)) == 5
    assert _arrow_files(hf_cache) != []
    for streaming in (True, False):
        with pytest.raises(DataError, match=r"1 bad row\(s\) in .*big.parquet \[train\]:\n.* row 30: missing or "
                                            r"empty string field\(s\): question"):
            load_examples(tmp_path / "big.parquet", streaming=streaming)


def test_datasets_sources_fail_clearly(tmp_path, hf_cache):
    from datasets import Dataset, DatasetDict

    from ippo.rl.data import load_examples, load_split

    with pytest.raises(DataError, match=r"data file not found: .*nope.parquet \(data.val_path\)"):
        load_split(load_config(None, BASE + [f"data.val_path={tmp_path / 'nope.parquet'}"]).data, "val")
    Dataset.from_list([{"question": "q", "answer": "a"}]).select([]).to_parquet(str(tmp_path / "e.parquet"))
    for streaming in (True, False):
        with pytest.raises(DataError, match="e.parquet.* has no rows"):
            load_examples(tmp_path / "e.parquet", streaming=streaming)
    bad = [dict(r) for r in ROWS[:4]]
    bad[1]["answer"], bad[3]["question"] = None, "  "
    Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError) as e:
        load_examples(tmp_path / "bad.parquet")
    assert "2 bad row(s)" in str(e.value) and "row 1: missing or empty string field(s): answer" in str(e.value)
    assert "row 3: missing or empty string field(s): question" in str(e.value)
    DatasetDict({"train": Dataset.from_list(ROWS), "validation": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dict"))
    cfg = load_config(None, BASE + [f"data.test_path={tmp_path / 'dict'}"])
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: train, validation\): set data.test_split"):
        load_split(cfg.data, "test")
    (tmp_path / "corrupt.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"cannot read .*corrupt.parquet"):
        load_examples(tmp_path / "corrupt.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"cannot read .*empty_dir"):
        load_examples(tmp_path / "empty_dir")


def test_bad_parquet_fails_before_any_model_is_loaded(tmp_path, hf_cache):
    from datasets import Dataset

    Dataset.from_list([{"question": "q", "answer": 3}]).to_parquet(str(tmp_path / "bad.parquet"))
    cfg = load_config(None, [f"model.path={tmp_path / 'no_model_here'}", f"data.train_path={tmp_path / 'bad.parquet'}",
                             "influence.enabled=false", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="row 0: missing or empty string field"):
        train(cfg)


def test_jsonl_fast_path_does_not_import_datasets(tmp_path, monkeypatch):
    """JSONL never imports datasets (seconds of start-up): with the import made to fail, JSONL still
    loads, and a parquet file says what to install."""
    import sys

    from ippo.rl.data import load_examples

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert len(load_examples(DATA / "arith_train.jsonl")) == 48
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="needs `pip install datasets`"):
        load_examples(tmp_path / "x.parquet")
