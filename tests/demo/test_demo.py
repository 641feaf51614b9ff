"""`ippo demo`: the AUC, the noisy reward, the eval.response_metrics hook, and a 2-iteration end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ippo import demo
from ippo.rl.config import ConfigError, EvalConfig, load_config
from ippo.rl.data import Example
from ippo.tasks import arithmetic


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ AUC


def test_roc_auc_known_values():
    assert demo.roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)  # sklearn
    assert demo.roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert demo.roc_auc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert demo.roc_auc([5, 5, 5, 5], [True, False, True, False]) == 0.5  # all tied
    # ties across classes count one half: pos {2, 3}, neg {1, 2} -> pairs (2>1, 2=2, 3>1, 3>2) = 3.5 / 4
    assert demo.roc_auc([2, 3, 1, 2], [True, True, False, False]) == pytest.approx(0.875)
    assert math.isnan(demo.roc_auc([1.0, 2.0], [True, True]))
    assert math.isnan(demo.roc_auc([], []))


def test_roc_auc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=g).tolist()  # many ties
    labels = (torch.rand(60, generator=g) < 0.4).tolist()
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    want = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert demo.roc_auc(scores, labels) == pytest.approx(want)


# ------------------------------------------------------------------------------- noisy reward


def test_reward_noise_is_deterministic_fraction(monkeypatch):
    probs = arithmetic.generate("train", 400, seed=1)
    flips = [demo.is_flipped(p.solution, str(p.answer), 0.25, "s") for p in probs]
    assert 0.18 < sum(flips) / len(flips) < 0.32
    assert flips == [demo.is_flipped(p.solution, str(p.answer), 0.25, "s") for p in probs]
    assert flips != [demo.is_flipped(p.solution, str(p.answer), 0.25, "other") for p in probs]
    assert not any(demo.is_flipped(p.solution, str(p.answer), 0.0, "s") for p in probs)

    monkeypatch.delenv(demo.NOISE_ENV, raising=False)
    assert all(demo.reward(p.solution, str(p.answer)) == 1.0 for p in probs)  # gold solutions are correct
    assert demo.reward("#### 7", "8") == 0.0 and demo.reward("no answer", "8") == 0.0
    with demo.reward_noise(0.25, "s"):
        noisy = [demo.reward(p.solution, str(p.answer)) for p in probs]
    assert noisy == [0.0 if f else 1.0 for f in flips]
    assert demo.NOISE_ENV not in __import__("os").environ  # restored


def test_sampled_accuracy_is_denoised():
    assert demo.add_sampled_acc({"mean_acc": 0.3}, 0.0)["sampled_acc"] == 0.3
    # E[measured] = p + acc (1 - 2p): acc 0.5 reads 0.5 whatever p; acc 0.3 with p = 0.1 reads 0.34
    assert demo.add_sampled_acc({"mean_acc": 0.5}, 0.2)["sampled_acc"] == pytest.approx(0.5)
    assert demo.add_sampled_acc({"mean_acc": 0.34}, 0.1)["sampled_acc"] == pytest.approx(0.3)


# --------------------------------------------------------------------- eval.response_metrics


def _rows(problems):
    return [Example(i, p.question, p.solution, str(p.answer)) for i, p in enumerate(problems)]


def test_faithfulness_metrics_values():
    probs = arithmetic.generate("test", 4, seed=0)
    good = probs[0].solution
    a = probs[1].answer
    unfaithful = f"<<1+1=3>>3\n#### {a}"  # right answer, wrong step
    w = probs[2].answer + 1
    wrong = f"<<{w}+0={w}>>{w}\n#### {w}"  # faithful chain, wrong answer
    m = demo.faithfulness_metrics([good, unfaithful, wrong, "garbage"], _rows(probs))
    assert m == pytest.approx({"test_acc": 0.5, "faithful_rate": 0.5, "faithful_correct_rate": 0.25,
                               "unfaithful_correct_rate": 0.25, "unfaithful_share_of_correct": 0.5})
    assert demo.faithfulness_metrics([], []) == {}


def test_response_metrics_hook_errors():
    from ippo.rl.evaluate import response_metrics

    rows = _rows(arithmetic.generate("test", 2, seed=0))
    pairs = [(1, rows[1].solution), (0, "#### 1000")]  # any order: sorted by row
    out = response_metrics("ippo.demo:faithfulness_metrics", pairs, rows, {"greedy_acc"})
    assert out["test_acc"] == 0.5 and out["faithful_rate"] == 0.5
    with pytest.raises(ValueError, match="reserved"):
        response_metrics("ippo.demo:faithfulness_metrics", pairs, rows, {"test_acc"})
    with pytest.raises(TypeError, match="expected a dict"):
        response_metrics("ippo.demo:roc_auc", pairs, rows, set())  # returns a float
    with pytest.raises(ValueError, match="cannot import"):
        response_metrics("no_such_module_xyz:f", pairs, rows, set())


def test_response_metrics_config_validation(tmp_path):
    base = [f"model.path={tmp_path}", "data.train_path=x.jsonl", "influence.enabled=false"]
    assert load_config(None, base).eval.response_metrics == ""
    assert load_config(None, base + ["eval.response_metrics=ippo.demo:faithfulness_metrics"])
    for bad in ("nocolon", "a:b:c", ":f", "mod:"):
        with pytest.raises(ConfigError, match="eval.response_metrics"):
            load_config(None, base + [f"eval.response_metrics={bad}"])


def test_evaluate_reports_response_metrics():
    """The hook on a real evaluation (bundled model, 4 problems): its accuracy agrees with greedy_acc."""
    from ippo.rl.data import PromptFormatter
    from ippo.rl.evaluate import evaluate
    from ippo.tasks import load_tiny_model

    torch.set_num_threads(1)
    model, tok = load_tiny_model()
    fmt = PromptFormatter(tok, "Q: {question}\nA:\n")
    rows = _rows(arithmetic.generate("test", 4, seed=0))
    ecfg = EvalConfig(k=1, max_new_tokens=64, batch_prompts=4, response_metrics="ippo.demo:faithfulness_metrics")
    res = evaluate(model, tok, fmt, rows, ecfg, "ippo.demo:reward", demo.reward, 0, 0)
    assert res["test_acc"] == pytest.approx(res["greedy_acc"])
    assert 0 <= res["unfaithful_correct_rate"] <= res["test_acc"] <= 1
    ecfg.response_metrics = ""
    assert "test_acc" not in evaluate(model, tok, fmt, rows, ecfg, "ippo.demo:reward", demo.reward, 0, 0)


# ------------------------------------------------------------------------------- end to end


def test_demo_bad_settings_exit_2(tmp_path, capsys):
    from ippo.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "demo.bogus=1"]) == 2
    assert "demo.bogus" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--reward-noise", "1.5"]) == 2
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    assert main(["demo", "--out", str(keep)]) == 2  # never deletes a directory it did not write
    assert (keep / "precious.txt").is_file()
    capsys.readouterr()
    for bad, key in (("demo.seeds=abc", "demo.seeds"), ("demo.test_problems=lots", "demo.test_problems"),
                     ("demo.sft_coef=-1", "demo.sft_coef"), ("ppo.lrr=1", "ppo.lrr")):
        assert main(["demo", "--out", str(tmp_path / "d"), bad]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err and err.count("\n") == 1, err
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert main(["demo", "--out", str(a_file)]) == 2 and "is a file" in capsys.readouterr().err


def test_demo_never_replaces_a_previous_demo_without_overwrite(tmp_path, capsys):
    """A finished demo's results survive a second `ippo demo` (even one with a bad override): only --overwrite
    replaces them, and only after every setting has been checked."""
    from ippo.cli import main

    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text("{}\n")
    (out / "summary.json").write_text("{}")
    assert main(["demo", "--out", str(out), "ppo.lrr=1"]) == 2  # bad input: nothing touched
    assert main(["demo", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--overwrite", "ppo.lrr=1"]) == 2  # validated before deleting
    assert (out / "summary.json").is_file() and (out / "data" / "train.jsonl").is_file()


def test_verdict_needs_three_seeds():
    from ippo.demo.report import verdict

    assert verdict([-0.023, 0.0001, 2]) == "too few seeds"  # two seeds that happen to agree: t = -230
    assert verdict([-0.023, 0.001, 3]) == "lower"
    assert verdict([0.01, 0.02, 5]) == "not distinguishable"
    assert verdict([0.01, float("nan"), 1]) == "one seed"


def test_sft_sweep_evaluates_on_the_dev_split(tmp_path, capsys):
    """--sft-sweep: PPO and PPO + λ x SFT for each λ, scored on held-out dev problems, never the test split."""
    out = tmp_path / "sweep"
    rc = demo.main(["--out", str(out), "--iterations", "1", "--seeds", "0", "--sft-sweep", "0.5", "2", "--jobs", "2",
                    "demo.train_problems=20", "demo.val_problems=6", "demo.test_problems=5", "demo.dev_problems=7",
                    "rollout.prompts_per_iter=2", "rollout.samples_per_prompt=2", "influence.n_val=4",
                    "eval.every=1", "eval.batch_prompts=8"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "dev" and summary["n_test"] == 7
    assert set(summary["runs"]) == {"ppo", "ppo_sft@0.5", "ppo_sft@2"}
    dev = {json.loads(x)["question"] for x in (out / "data" / "dev.jsonl").read_text().splitlines()}
    test = {json.loads(x)["question"] for x in (out / "data" / "test.jsonl").read_text().splitlines()}
    gold = {json.loads(x)["question"] for x in (out / "data" / "validation.jsonl").read_text().splitlines()}
    assert len(dev) == 7 and not dev & test and not dev & gold
    cfg = (out / "ppo_sft@2" / "seed0.yaml").read_text()
    assert "sft_coef: 2.0" in cfg and "dev.jsonl" in cfg
    assert "held-out dev split" in (out / "report.md").read_text()


def test_demo_end_to_end(tmp_path, capsys):
    """Every method and control, two seeds, reward noise, both timings, two processes at a time."""
    out = tmp_path / "demo"
    rc = demo.main([
        "--out", str(out), "--iterations", "2", "--seeds", "0", "1", "--reward-noise", "0.3", "--timing", "both",
        "--ablations", "--jobs", "2",
        "demo.train_problems=40", "demo.val_problems=8", "demo.test_problems=8",
        "rollout.prompts_per_iter=4", "rollout.samples_per_prompt=4", "influence.n_val=4",
        "eval.every=1", "eval.batch_prompts=8", "influence.on_empty=skip",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "I-PPO in_update" in printed and "final acc" in printed and "random filter" in printed

    report = (out / "report.md").read_text()
    assert "| method | final acc | Δ vs start | Δ vs PPO (paired) |" in report
    methods = ("ppo", "ippo", "ippo_in_update", "random", "zero_variance", "ppo_sft", "ippo_unweighted",
               "random_unweighted", "max_variance")
    for m in methods:
        assert f"| {demo.METHODS[m].label} |" in report
    assert "| start (tiny model) |" in report and "What the numbers show" in report
    assert "ROC AUC" in report and "Per seed" in report
    for png in ("accuracy.png", "accuracy_vs_seconds.png", "unfaithful_correct.png", "train_reward.png",
                "kept_fraction.png", "time_per_iteration.png", "score_histograms.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in report

    for m in methods:
        for seed in (0, 1):
            run = out / m / f"seed{seed}"
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert len(metrics) == 2
            evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
            assert len(evals) == 2 and {"test_acc", "unfaithful_correct_rate", "faithful_rate"} <= set(evals[-1])
            eps = [json.loads(x) for x in (run / "influence.jsonl").read_text().splitlines()]
            assert len(eps) == 16 * 2
            assert all((e["score"] is None) == (demo.METHODS[m].kind != "influence") for e in eps)
            assert (out / m / f"seed{seed}.yaml").is_file() and (out / m / f"seed{seed}.log").is_file()
            if demo.METHODS[m].matches:  # the random filter kept what its I-PPO run kept, iteration by iteration
                from ippo.demo.run import matched_method

                ref = out / matched_method(m, {"timing": "both"}) / f"seed{seed}" / "metrics.jsonl"
                assert [r["kept"] for r in metrics] == [json.loads(x)["kept"] for x in ref.read_text().splitlines()]
        # every method saw the same first rollout as PPO on that seed (same prompts and sampling seeds)
        first = [json.loads(x)["response"] for x in (out / "ppo" / "seed0" / "influence.jsonl").read_text().splitlines()][:16]
        assert first == [json.loads(x)["response"] for x in (out / m / "seed0" / "influence.jsonl")
                         .read_text().splitlines()][:16]

    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["baseline"]["test_acc"] <= 1 and summary["n_test"] == 8
    from ippo.tasks import model_task_spec

    assert summary["task_spec"] == model_task_spec().to_dict()  # the data follow the bundled model's spec
    for m, runs in summary["runs"].items():
        assert len(runs) == 2 and [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert 0 <= r["final_acc"] <= r["best_acc"] <= 1 and r["final_acc_se"] >= 0
            assert r["sec_per_iter"] > 0 and 0 <= r["mean_kept_frac"] <= 1
            assert r["n_flipped_all"] > 0  # 30% noise on 32 episodes
            assert ("noise_auc" in r) == (demo.METHODS[m].kind == "influence" and "n_flipped" in r)
        agg = summary["aggregates"][m]
        assert agg["final_acc"][2] == 2 and len(agg["early_stops"]) == 2
        if m != "ppo":
            assert agg["vs"]["ppo"][2] == 2  # paired over both seeds
    assert set(summary["aggregates"]["ippo"]["vs"]) == {"ppo", "random", "zero_variance", "max_variance", "ppo_sft"}
    for r in summary["runs"]["ppo_sft"]:  # the gold-data control trained on the gold draw: its SFT loss is logged
        assert r["train_seconds"] > 0
    assert all("sft_loss" in json.loads(x) for x in (out / "ppo_sft" / "seed0" / "metrics.jsonl").read_text()
               .splitlines())
    assert "too few seeds" not in json.dumps(summary) and "3 seeds or more are needed" in report  # 2 seeds only
    assert "random_unweighted" in summary["aggregates"]["ippo_unweighted"]["vs"]
    # ippo inspect of the first I-PPO arm's first seed, at its last iteration (its theta_old kept for it)
    assert "ippo inspect of ippo/seed0" in printed and "keep_every: 1" in (out / "ippo" / "seed0.yaml").read_text()
    page = (out / "inspect.html").read_text()
    assert "<h2>Iteration 1</h2>" in page and "checkpoints/iter_000001" in page and "equal the logged ones" in page
    assert 'class="tok"' in page and "unfaithful_correct" in page and 'href="ippo/seed0/influence.jsonl"' in page
    assert not any(out.rglob("checkpoints"))  # then deleted, as every run's


def test_demo_failed_run_is_reported(tmp_path, capsys):
    """A training process that fails stops the demo with its log's tail, not a hang."""
    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--iterations", "1", "--no-controls", "--jobs", "2",
                    "demo.train_problems=8", "demo.val_problems=4", "demo.test_problems=4",
                    "rollout.prompts_per_iter=2", "rollout.samples_per_prompt=2", "influence.n_val=2",
                    "reward.fn=tests.rl.toy_rewards:no_such_function", "eval.every=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "failed" in err and "no_such_function" in err


def test_gold_comparison_regimes(tmp_path):
    """--gold-comparison runs PPO, PPO + SFT, I-PPO and I-PPO + SFT; --hackable-reward trains on the exploitable
    reward (and the report counts the rewarded-but-wrong episodes); --val-shift two_step draws the gold data from
    2-step problems only."""
    from ippo.demo.task import hackable_reward

    assert hackable_reward("<<3+4=7>>7\n#### 9", "7") == 1.0 and hackable_reward("#### 9", "7") == 0.0
    out = tmp_path / "regime"
    rc = demo.main(["--out", str(out), "--iterations", "1", "--seeds", "0", "--gold-comparison", "--hackable-reward",
                    "--val-shift", "two_step", "--jobs", "2", "demo.train_problems=20", "demo.val_problems=6",
                    "demo.test_problems=5", "demo.dev_problems=5", "rollout.prompts_per_iter=2",
                    "rollout.samples_per_prompt=2", "influence.n_val=4", "eval.every=1", "eval.batch_prompts=8"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["ppo", "ppo_sft", "ippo_in_update", "ippo_sft"]
    assert "hackable_reward" in (out / "ppo" / "seed0.yaml").read_text()
    assert "sft_coef: 3.0" in (out / "ippo_sft" / "seed0.yaml").read_text()
    gold = [json.loads(x)["answer"] for x in (out / "data" / "validation.jsonl").read_text().splitlines()]
    assert len(gold) == 6 and all(a.count("<<") == 2 for a in gold)  # two steps each
    r = summary["runs"]["ppo"][0]
    assert 0 <= r["unearned_reward_last"] <= 1
    assert "hackable reward" in (out / "report.md").read_text()
    page = (out / "inspect.html").read_text()  # one iteration: iteration 0's theta_old is the starting model
    assert "ippo_in_update/seed0" in page and "(the starting model)" in page and 'class="tok"' in page
