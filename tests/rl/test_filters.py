"""Control filters (ippo/rl/filters.py): the zero-variance (DAPO) filter and the random filter matched to an
I-PPO run, alone and inside the trainer (same kept counts and weights as I-PPO, same seed discipline)."""

from __future__ import annotations

import json

import pytest
import torch

from ippo.rl import filters as controls
from ippo.rl.config import ConfigError
from ippo.rl.loop import train


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------ units


def test_zero_variance_drops_uniform_groups():
    rewards = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1.0])  # groups of 3: varies = [F, T, T, F]
    keep = controls.zero_variance(rewards, 3)
    assert keep.tolist() == [False] * 3 + [True] * 6 + [False] * 3
    assert controls.zero_variance(torch.tensor([0.0, 0.0, 0.0, 0.0]), 2).sum() == 0
    with pytest.raises(ValueError, match="samples_per_prompt=3"):
        controls.zero_variance(torch.zeros(4), 3)
    with pytest.raises(ValueError, match=">= 2"):
        controls.zero_variance(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        controls.zero_variance(torch.zeros(2, 2), 2)


def test_random_matched_keeps_the_count_informative_first():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        E = int(torch.randint(4, 40, (1,), generator=g))
        informative = torch.rand(E, generator=g) < 0.5
        k = int(torch.randint(0, E + 1, (1,), generator=g))
        w_in = torch.rand(k, generator=g).tolist()
        keep, w = controls.random_matched(k, informative, w_in, seed=trial, iteration=3)
        assert int(keep.sum()) == k
        n_inf = int(informative.sum())
        assert int((keep & informative).sum()) == min(k, n_inf)  # informative episodes first
        assert sorted(w[keep].tolist()) == pytest.approx(sorted(w_in))  # the matched weights, reassigned
        assert (w[~keep] == 0).all()
        keep1, w1 = controls.random_matched(k, informative, None, seed=trial, iteration=3)
        assert torch.equal(keep1, keep) and (w1[keep1] == 1).all()  # uniform weights, same draw


def test_random_matched_is_seeded_by_seed_and_iteration():
    informative = torch.ones(64, dtype=torch.bool)
    a = controls.random_matched(20, informative, None, seed=0, iteration=5)[0]
    assert torch.equal(a, controls.random_matched(20, informative, None, seed=0, iteration=5)[0])
    assert not torch.equal(a, controls.random_matched(20, informative, None, seed=0, iteration=6)[0])
    assert not torch.equal(a, controls.random_matched(20, informative, None, seed=1, iteration=5)[0])
    # uniform over episodes: every episode is kept about 20/64 of the time over many iterations
    freq = torch.stack([controls.random_matched(20, informative, None, 0, it)[0] for it in range(400)]).float().mean(0)
    assert (freq - 20 / 64).abs().max() < 0.09


def test_random_matched_errors():
    inf = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        controls.random_matched(5, inf, None, 0, 0)
    with pytest.raises(ValueError, match="2 weights for 3"):
        controls.random_matched(3, inf, [1.0, 1.0], 0, 0)
    with pytest.raises(ValueError, match="bool"):
        controls.random_matched(1, torch.ones(4), None, 0, 0)


def test_load_matched_schedule(tmp_path):
    recs = [{"iteration": 0, "episode": e, "kept": e % 2 == 0, "weight": 2.0 * (e % 2 == 0)} for e in range(4)]
    recs += [{"iteration": 1, "episode": e, "kept": e == 3, "weight": 0.5 if e == 3 else 0.0} for e in range(4)]
    (tmp_path / "influence.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = controls.load_matched_schedule(tmp_path)
    assert s.kept == {0: 2, 1: 1} and s.weights == {0: [2.0, 2.0], 1: [0.5]} and s.episodes == {0: 4, 1: 4}
    with pytest.raises(FileNotFoundError, match="control.match_run"):
        controls.load_matched_schedule(tmp_path / "nope")
    (tmp_path / "influence.jsonl").write_text('{"iteration": 0}\n')
    with pytest.raises(ValueError, match="line 1"):
        controls.load_matched_schedule(tmp_path)


def test_control_config_validation(make_cfg):
    with pytest.raises(ConfigError, match="influence.enabled=false"):
        make_cfg("control.filter=zero_variance")  # influence is on by default
    with pytest.raises(ConfigError, match="control.match_run"):
        make_cfg("influence.enabled=false", "control.filter=random")
    with pytest.raises(ConfigError, match="control.filter"):
        make_cfg("influence.enabled=false", "control.filter=bogus")
    with pytest.raises(ConfigError, match="control.weights"):
        make_cfg("influence.enabled=false", "control.filter=random", "control.match_run=x", "control.weights=no")


# ------------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def ippo_run(tiny_model_dir, tmp_path_factory):
    """A 3-iteration I-PPO run with GRPO advantages (some groups have zero reward variance)."""
    from ippo.rl.config import load_config

    from .conftest import fast_overrides

    run = tmp_path_factory.mktemp("ctl") / "ippo"
    cfg = load_config(None, fast_overrides(tiny_model_dir, run) + ["iterations=3", "ppo.advantage=grpo",
                                                                  "influence.on_empty=skip"])
    n = torch.get_num_threads()
    train(cfg)
    torch.set_num_threads(n)
    return run


def test_random_control_matches_ippo_kept_counts_and_weights(make_cfg, ippo_run, tmp_path):
    run = tmp_path / "random"
    cfg = make_cfg("iterations=3", "ppo.advantage=grpo", "influence.enabled=false", "control.filter=random",
                   f"control.match_run={ippo_run}", "influence.on_empty=skip", run_dir=run)
    train(cfg)
    ip, rc = _jsonl(ippo_run / "influence.jsonl"), _jsonl(run / "influence.jsonl")
    assert len(rc) == len(ip) == 3 * 16
    for it in range(3):
        a = [r for r in ip if r["iteration"] == it]
        b = [r for r in rc if r["iteration"] == it]
        assert sum(r["kept"] for r in a) == sum(r["kept"] for r in b)  # same kept count, per iteration
        assert sorted(r["weight"] for r in a if r["kept"]) == pytest.approx(
            sorted(r["weight"] for r in b if r["kept"]))  # the same weights, in random order
        assert all(r["weight"] == 0 for r in b if not r["kept"])
        n_inf = sum(abs(r["adv_sum"]) > 0 for r in b)
        assert sum(r["kept"] and abs(r["adv_sum"]) > 0 for r in b) == min(n_inf, sum(r["kept"] for r in b))
    # same seed discipline: the first iteration's rollout (before any update) is I-PPO's, episode for episode
    assert [r["response"] for r in rc if r["iteration"] == 0] == [r["response"] for r in ip if r["iteration"] == 0]
    m = _jsonl(run / "metrics.jsonl")
    assert [r["kept"] for r in m] == [r["kept"] for r in _jsonl(ippo_run / "metrics.jsonl")]
    # a second run of the control draws the same episodes
    run2 = tmp_path / "random2"
    train(make_cfg("iterations=3", "ppo.advantage=grpo", "influence.enabled=false", "control.filter=random",
                   f"control.match_run={ippo_run}", "influence.on_empty=skip", run_dir=run2))
    assert [r["kept"] for r in _jsonl(run2 / "influence.jsonl")] == [r["kept"] for r in rc]


def test_random_control_stops_where_the_matched_run_ends(make_cfg, ippo_run, tmp_path):
    run = tmp_path / "longer"
    out = train(make_cfg("iterations=5", "ppo.advantage=grpo", "influence.enabled=false", "control.filter=random",
                         f"control.match_run={ippo_run}", run_dir=run))
    assert out["iterations_done"] == 4 and "has no iteration 3" in out["stopped"]


def test_random_control_rejects_a_different_rollout(make_cfg, ippo_run, tmp_path):
    with pytest.raises(ConfigError, match="same rollout settings"):
        train(make_cfg("ppo.advantage=grpo", "influence.enabled=false", "control.filter=random",
                       f"control.match_run={ippo_run}", "rollout.samples_per_prompt=3", run_dir=tmp_path / "r"))


def test_zero_variance_control_in_the_trainer(make_cfg, tmp_path):
    run = tmp_path / "zv"
    train(make_cfg("iterations=3", "ppo.advantage=grpo", "influence.enabled=false", "control.filter=zero_variance",
                   "influence.on_empty=skip", run_dir=run))
    recs = _jsonl(run / "influence.jsonl")
    for it in range(3):
        rs = [r for r in recs if r["iteration"] == it]
        for g in range(4):
            group = [r for r in rs if r["episode"] // 4 == g]
            varies = len({r["reward"] for r in group}) > 1
            assert all(r["kept"] == varies and r["weight"] == float(varies) for r in group)
    m = _jsonl(run / "metrics.jsonl")
    assert [r["kept"] for r in m] == [sum(r["kept"] for r in recs if r["iteration"] == it) for it in range(3)]


@pytest.mark.parametrize("control", ["zero_variance", "random"])
def test_every_kept_episode_trains_against_its_real_old_logprobs(make_cfg, tmp_path, monkeypatch, control):
    """A control that drops episodes, with mini-batches smaller than the batch: the update's first mini-batch is
    drawn from the *kept* episodes, so the old log-probs it provides are theirs; every other kept episode's were
    forwarded before the update. (Before the fix the skip set was drawn from all episodes: some kept episodes
    trained against old log-probs of 0.)"""
    from ippo.rl import update

    seen = []
    real = update.ppo_policy_loss

    def spy(logp, old_logp, adv, ppo, is_weight=None):
        seen.append((logp.detach().clone(), old_logp.clone()))
        return real(logp, old_logp, adv, ppo, is_weight)

    monkeypatch.setattr(update, "ppo_policy_loss", spy)
    ippo_run = tmp_path / "ippo"
    train(make_cfg("ppo.mini_batch_size=4", "ppo.micro_batch_size=4", "ppo.epochs=1", run_dir=ippo_run))
    seen.clear()
    extra = ["control.filter=zero_variance"] if control == "zero_variance" else [
        "control.filter=random", f"control.match_run={ippo_run}"]
    train(make_cfg("influence.enabled=false", "ppo.mini_batch_size=4", "ppo.micro_batch_size=4", "ppo.epochs=1",
                   *extra, run_dir=tmp_path / control))
    assert len(seen) > 1
    logp0, old0 = seen[0]  # the first mini-batch runs at theta_old: its own forward gave its old log-probs
    torch.testing.assert_close(old0, logp0 * (old0 != 0), rtol=0, atol=0)
    for _, old in seen:  # every response has tokens, so a row of zeros is an old log-prob never filled
        assert bool((old != 0).any(1).all()), "a kept episode trained with old log-probs of 0"
