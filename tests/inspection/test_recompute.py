"""Offline attribution: episodes rebuilt from the influence log and scored again at theta_old give the logged
scores (before_update; in_update where the score was taken at theta_old), and their per-token contributions
sum to the score."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ippo.cli import main
from ippo.errors import ConfigError
from ippo.inspection import RTOL, inspect_run
from ippo.rl.loop import train

from .conftest import KEEP


def log_rows(run) -> dict[tuple[int, int], dict]:
    rows = [json.loads(x) for x in (run / "influence.jsonl").read_text().splitlines()]
    return {(r["iteration"], r["episode"]): r for r in rows}


def check_sums(res, rows) -> None:
    """Every rebuilt episode: prompt + token contributions = its recomputed score (the rest, 0)."""
    for it, rec in res.recomputed.items():
        assert rec.problem is None and rec.episodes
        for e, a in rec.episodes.items():
            n = len(rows[(it, e)]["response_tokens"])
            assert len(a.tokens) == n
            total = a.prompt + math.fsum(a.tokens)
            assert total == pytest.approx(a.score, rel=1e-5, abs=1e-9)
            assert abs(a.rest) <= 1e-9  # the last position and padding predict no response token


def test_before_update_recomputed_scores_equal_the_logged_ones(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(*KEEP, "ppo.advantage=grpo", "ppo.kl_coef=0.01", "influence.episode_loss=policy", run_dir=run))
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_000002", "iter_000003"]
    rows = log_rows(run)
    row = rows[(1, 0)]  # what the log holds to rebuild an episode
    assert row["scored_after_steps"] == 0 and row["seq_norm"] == 16.0
    assert row["token_norm"] == float(sum(len(rows[(1, e)]["response_tokens"]) for e in range(16)))
    assert isinstance(row["advantage"], float)  # grpo: one number per episode (GAE logs a list)
    res = inspect_run(run, [0, 2], tmp_path / "page.html", top=4, sample=3)
    assert res.theta_old == [0, 2]  # iteration 1's checkpoint was pruned (keep_last=1); 2 kept by keep_every=2
    for it in (0, 2):
        rec = res.recomputed[it]
        assert len(rec.compared) == len(rec.episodes) >= 8 and rec.all_match
        for e, a in rec.episodes.items():
            assert a.score == pytest.approx(rows[(it, e)]["score"], rel=RTOL)
    check_sums(res, rows)
    page = (tmp_path / "page.html").read_text()
    assert "equal the logged ones" in page and "do NOT" not in page


@pytest.mark.parametrize("mini_batch", [16, 8])
def test_in_update_scores_at_theta_old_are_compared_and_equal(make_cfg, tmp_path, mini_batch):
    """One mini-batch over the whole batch: every score was taken at theta_old. Two mini-batches: the second
    was scored after the first optimizer step, so only the first is compared (and the page says so)."""
    run = tmp_path / "run"
    train(make_cfg(*KEEP, "influence.timing=in_update", "ppo.advantage=gae", f"ppo.mini_batch_size={mini_batch}",
                   "ppo.micro_batch_size=4", run_dir=run))
    rows = log_rows(run)
    assert isinstance(rows[(2, 0)]["advantage"], list)  # GAE: per-token advantages
    steps = {r["scored_after_steps"] for r in rows.values()}
    assert steps == ({0} if mini_batch == 16 else {0, 1})
    assert all(r["seq_norm"] == mini_batch for r in rows.values())
    res = inspect_run(run, [2], tmp_path / "page.html", top=8, sample=0)
    rec = res.recomputed[2]
    assert rec.all_match and rec.compared
    for e, a in rec.episodes.items():
        assert a.compared == (rows[(2, e)]["scored_after_steps"] == 0)
        if a.compared:
            assert a.score == pytest.approx(rows[(2, e)]["score"], rel=RTOL)
    assert (len(rec.compared) == len(rec.episodes)) == (mini_batch == 16)
    check_sums(res, rows)
    page = (tmp_path / "page.html").read_text()
    assert ("scored inside the update after an optimizer step" in page) == (mini_batch == 8)


def test_per_token_contributions_leave_the_scores_unchanged(make_cfg, tmp_path):
    """score_episodes(per_token=...) returns the same scores bit for bit, and each row of contributions sums
    to its episode's score."""
    from ippo.influence import InfluenceEngine
    from ippo.inspection.recompute import advantages, rebuild_episodes
    from ippo.inspection.runlog import read_log, run_config
    from ippo.rl.components import load_models, load_task_data
    from ippo.rl.data import iteration_val_indices
    from ippo.rl.scoring import InfluenceScorer

    run = tmp_path / "run"
    train(make_cfg("iterations=1", run_dir=run))
    cfg, rows = run_config(run), read_log(run)[0]
    data = load_task_data(cfg)
    policy = load_models(cfg, data.model_path, torch.device("cpu"))[0]
    scorer = InfluenceScorer(InfluenceEngine(policy, seed=cfg.seed), cfg)
    target = scorer.validation_target(policy, data.tok, data.fmt, data.val,
                                      iteration_val_indices(len(data.val), cfg.influence.n_val, cfg.seed, 0),
                                      torch.device("cpu"))
    ep, adv = rebuild_episodes(rows, data), advantages(rows, torch.device("cpu"))
    kw = {"token_norm": rows[0]["token_norm"], "seq_norm": rows[0]["seq_norm"]}
    plain = scorer.score_episodes(policy, ep, adv, torch.zeros_like(adv), None, target, data.pad,
                                  torch.device("cpu"), **kw)
    per_token: list = []
    with_tokens = scorer.score_episodes(policy, ep, adv, torch.zeros_like(adv), None, target, data.pad,
                                        torch.device("cpu"), per_token=per_token, **kw)
    assert torch.equal(plain, with_tokens)
    assert plain.tolist() == [r["score"] for r in rows]  # the trainer's own scores, bit for bit
    for idx, _, contributions in per_token:
        torch.testing.assert_close(contributions.sum(1), plain[idx], rtol=1e-5, atol=1e-9)


def test_a_logged_score_that_differs_is_shown_in_red(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg("iterations=1", run_dir=run))
    log = run / "influence.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    top = max(rows, key=lambda r: r["score"])
    top["score"] *= 1.01  # not what theta_old gives
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = inspect_run(run, None, tmp_path / "page.html")
    rec = res.recomputed[0]
    assert not rec.all_match and [a.episode for a in rec.compared if not a.matches] == [top["episode"]]
    page = (tmp_path / "page.html").read_text()
    assert "do NOT equal the logged ones" in page and "class=\"bad\"" in page


def test_iterations_without_theta_old_are_named(make_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    train(make_cfg(*KEEP, run_dir=run))
    with pytest.raises(ConfigError, match=r"iteration 1 has no theta_old.*keep_every=2.*iterations that have one: "
                                          r"0, 2"):
        inspect_run(run, [1])
    assert main(["inspect", str(run), "--iteration", "7"]) == 2
    assert "--iteration 7: the run logged iterations 0..2" in capsys.readouterr().err
    out = tmp_path / "sub" / "report.html"
    assert main(["inspect", str(run), "--out", str(out), "--top", "2", "--sample", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["theta_old_iterations"] == [0, 2] and summary["inspected"]["2"]["match"] is True
    assert 'href="../run/influence.jsonl"' in out.read_text()  # the log, relative to the page


def test_runs_without_scores_are_refused(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg("iterations=1", "influence.enabled=false", run_dir=run))
    with pytest.raises(ConfigError, match="no influence score"):
        inspect_run(run)
    with pytest.raises(ConfigError, match="no config.json"):
        inspect_run(tmp_path / "nowhere")
