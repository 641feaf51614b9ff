"""What ``ippo demo`` measured: per-run analysis, aggregates over seeds, tables, plots and the report.

Every number comes with its noise. A run's test accuracy has the binomial standard error of the test
set; a method's mean over seeds has the standard error of that mean; two methods are compared by the
per-seed *paired* difference (same prompts, same sampling seeds), whose standard error is what a claim
"A beats B" has to clear. ``findings`` words the result from those numbers, whichever way it goes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from ippo.demo.methods import CATEGORIES, method
from ippo.demo.stats import (
    binomial_se,
    finite,
    mean_se,
    paired_difference,
    roc_auc,
    steps_to_reach,
    t_critical_95,
)
from ippo.demo.task import add_sampled_acc, clean_reward, episode_category

CAT_COLORS = {"faithful_correct": "tab:green", "unfaithful_correct": "tab:orange", "wrong": "tab:gray"}
ACC_COLUMNS = ["method", "final acc", "Δ vs start", "Δ vs PPO (paired)", "best acc", "curve mean acc",
               "Δ curve vs PPO (paired)", "it. to 90% of PPO's gain", "it. to PPO's final",
               "s to 90% of PPO's gain", "s to PPO's final"]
BEHAVIOUR_COLUMNS = ["method", "unfaithful-correct", "unfaithful share of correct", "train reward (first → last 3)",
                     "mean kept", "s / iter", "early stop"]
TABLE_COLUMNS = ACC_COLUMNS


# ---------------------------------------------------------------------------------------------
# one run


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def analyse_run(run_dir: Path, train_gold: list[str], noise: float, seed: int) -> dict:
    """Per-run numbers from the logs: eval curve, per-iteration metrics, per-episode categories/flips."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [add_sampled_acc(e, noise) for e in read_jsonl(run_dir / "eval.jsonl")]
    episodes = []
    for r in read_jsonl(run_dir / "influence.jsonl"):
        gold = train_gold[r["prompt_id"]]
        clean = clean_reward(r["response"], gold)
        episodes.append({"seed": seed, "iteration": r["iteration"], "score": r["score"], "kept": r["kept"],
                         "adv_sum": r.get("adv_sum"), "category": episode_category(r["response"], gold),
                         "flipped": noise > 0 and abs(r["reward"] - clean) > 0.5,
                         "unearned": r["reward"] > 0.5 and clean < 0.5})  # rewarded, yet wrong by the true checker
    return {"seed": seed, "metrics": metrics, "evals": evals, "episodes": episodes}


def accuracy_curve(a: dict, baseline: dict, key: str = "test_acc") -> list[tuple[int, float]]:
    """(iterations done, value) from the start model (0) to the last evaluation."""
    return [(0, baseline[key])] + [(e["iteration"] + 1, e[key]) for e in a["evals"] if key in e]


def seconds_curve(a: dict, baseline: dict, key: str = "test_acc") -> list[tuple[float, float]]:
    """(cumulative training seconds, value) at each evaluation: the same curve against wall time (rollout,
    scoring and update of every iteration so far; evaluation excluded)."""
    cum, t = {}, 0.0
    for r in a["metrics"]:
        t = r.get("time_cumulative", t + r.get("time_iteration", 0.0))
        cum[r["iteration"] + 1] = t
    return [(cum.get(x, 0.0), v) for x, v in accuracy_curve(a, baseline, key) if x == 0 or x in cum]


def _rate(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_summary(a: dict, baseline: dict, iterations: int, n_test: int) -> dict:
    """Scalars of one run (what the comparison table aggregates)."""
    evals, m, eps = a["evals"], a["metrics"], a["episodes"]
    last = evals[-1] if evals else baseline
    stop_rec = next((r for r in m if r.get("stop_reason") and (r.get("empty_action") == "stop" or r.get("early_stop"))),
                    None)
    curve = accuracy_curve(a, baseline)
    best_it, best = max(curve, key=lambda p: (p[1], -p[0]))
    after_start = [v for x, v in curve if x > 0]
    rewards = [r["reward"] for r in m]
    seconds = seconds_curve(a, baseline)
    out = {
        "final_acc": last["test_acc"], "final_acc_se": binomial_se(last["test_acc"], n_test),
        "seconds_curve": seconds, "train_seconds": seconds[-1][0] if seconds else float("nan"),
        "best_acc": best, "best_iteration": best_it, "curve": curve,
        # the learning curve's mean over the evaluations after the start: how fast, not just how far
        "curve_mean_acc": statistics.fmean(after_start) if after_start else float("nan"),
        "final_unfaithful_correct": last["unfaithful_correct_rate"],
        "final_unfaithful_share": last["unfaithful_share_of_correct"],
        "final_faithful_correct": last["faithful_correct_rate"],
        "final_sampled_acc": last.get("sampled_acc"),
        "mean_kept_frac": statistics.fmean(r["kept_frac"] for r in m) if m else float("nan"),
        "sec_per_iter": statistics.fmean(r["time_iteration"] for r in m) if m else float("nan"),
        "iterations_done": len(m), "iterations": iterations,
        "early_stop": stop_rec["iteration"] + 1 if stop_rec else None,
        "stop_reason": stop_rec.get("stop_reason") if stop_rec else None,
        "stop_max_score": stop_rec.get("score_max") if stop_rec else None,
        "train_reward_first": statistics.fmean(rewards[:3]) if rewards else float("nan"),
        "train_reward_last": statistics.fmean(rewards[-3:]) if rewards else float("nan"),
    }
    # Per category: which training episodes the filter kept. Episodes without learning signal (zero
    # advantage: e.g. every sample of the prompt got the same reward under GRPO) are left out; the
    # influence filter always drops them (score exactly 0).
    signal = [e for e in eps if e["adv_sum"] is None or abs(e["adv_sum"]) > 0]
    out["n_zero_advantage"] = len(eps) - len(signal)
    if signal and any(not e["kept"] for e in signal):
        out["kept_by_category"] = {c: _rate([e["kept"] for e in signal if e["category"] == c]) for c in CATEGORIES}
        out["n_by_category"] = {c: sum(e["category"] == c for e in signal) for c in CATEGORIES}
    scored = [e for e in signal if e["score"] is not None]
    flips = [e for e in scored if e["flipped"]]
    if flips and len(flips) < len(scored):
        out["noise_auc"] = roc_auc([e["score"] for e in scored], [not e["flipped"] for e in scored])
        out["kept_flipped"] = _rate([e["kept"] for e in flips])
        out["kept_clean"] = _rate([e["kept"] for e in scored if not e["flipped"]])
        out["n_flipped"] = len(flips)
    out["n_episodes"] = len(eps)
    out["n_flipped_all"] = sum(e["flipped"] for e in eps)
    # a hackable (or noisy) reward: the share of training episodes rewarded although wrong, first and last 3 its.
    its = sorted({e["iteration"] for e in eps})
    for name, part in (("first", its[:3]), ("last", its[-3:])):
        sel = [e for e in eps if e["iteration"] in part]
        out[f"unearned_reward_{name}"] = _rate([e["unearned"] for e in sel])
    out["kept_unearned"] = _rate([e["kept"] for e in eps if e["unearned"] and e["score"] is not None])
    out["kept_earned"] = _rate([e["kept"] for e in eps if not e["unearned"] and e["score"] is not None])
    return out


def add_paired_metrics(summaries: dict[str, list[dict]], analyses: dict[str, list[dict]], baseline: dict) -> None:
    """Per seed, against PPO's run of the same seed: ``iterations_to_ppo_final`` (the first evaluation at
    which a method reaches PPO's final accuracy) and ``iterations_to_90pct_gain`` (... reaches the start
    accuracy plus 90% of PPO's gain; robust when PPO ends at the task's ceiling, where its final accuracy is
    a maximum over test-set noise). None when never reached or PPO gained nothing."""
    ppo = {s["seed"]: s for s in summaries.get("ppo", [])}
    for runs in summaries.values():
        for s in runs:
            p = ppo.get(s["seed"])
            s["iterations_to_ppo_final"] = steps_to_reach(s["curve"], p["final_acc"]) if p else None
            s["seconds_to_ppo_final"] = steps_to_reach(s["seconds_curve"], p["final_acc"]) if p else None
            gain = p["final_acc"] - baseline["test_acc"] if p else 0.0
            target = baseline["test_acc"] + 0.9 * gain
            s["iterations_to_90pct_gain"] = steps_to_reach(s["curve"], target) if gain > 0 else None
            s["seconds_to_90pct_gain"] = steps_to_reach(s["seconds_curve"], target) if gain > 0 else None


# ---------------------------------------------------------------------------------------------
# over seeds


def aggregate(summaries: dict[str, list[dict]], baseline: dict, n_test: int) -> dict[str, dict]:
    """Per method: means with standard errors over seeds, and paired differences to PPO and the controls."""
    by_seed = {m: {s["seed"]: s for s in runs} for m, runs in summaries.items()}
    out: dict[str, dict] = {}
    for m, runs in summaries.items():
        seeds = [s["seed"] for s in runs]

        def ms(key: str, rs=runs) -> list:
            return list(mean_se([r.get(key) for r in rs]))

        agg = {
            "seeds": seeds, "final_acc": ms("final_acc"), "best_acc": ms("best_acc"),
            "curve_mean_acc": ms("curve_mean_acc"),
            "test_se": statistics.fmean(r["final_acc_se"] for r in runs),
            "delta_start": list(mean_se([r["final_acc"] - baseline["test_acc"] for r in runs])),
            "final_unfaithful_correct": ms("final_unfaithful_correct"),
            "final_unfaithful_share": ms("final_unfaithful_share"),
            "mean_kept_frac": ms("mean_kept_frac"), "sec_per_iter": ms("sec_per_iter"),
            "train_reward_first": ms("train_reward_first"), "train_reward_last": ms("train_reward_last"),
            "early_stops": [r["early_stop"] for r in runs],
            "iterations_to_ppo_final": [r.get("iterations_to_ppo_final") for r in runs],
            "iterations_to_90pct_gain": [r.get("iterations_to_90pct_gain") for r in runs],
            "seconds_to_ppo_final": [r.get("seconds_to_ppo_final") for r in runs],
            "seconds_to_90pct_gain": [r.get("seconds_to_90pct_gain") for r in runs],
            "train_seconds": ms("train_seconds"),
            "unearned_reward_first": ms("unearned_reward_first"), "unearned_reward_last": ms("unearned_reward_last"),
            "vs": {}, "vs_curve": {},
        }
        others = ["ppo", "random", "zero_variance", "max_variance", "ppo_sft"]
        others += [method(m).matches] if method(m).matches else []
        if m == "ippo_unweighted":
            others.append("random_unweighted")
        for other in dict.fromkeys(others):
            if other == m or other not in by_seed:
                continue
            common = [s for s in seeds if s in by_seed[other]]
            for key, vs in (("final_acc", "vs"), ("curve_mean_acc", "vs_curve")):
                agg[vs][other] = list(paired_difference([by_seed[m][s][key] for s in common],
                                                        [by_seed[other][s][key] for s in common]))
        for key in ("noise_auc", "kept_flipped", "kept_clean"):
            if any(key in r for r in runs):
                agg[key] = ms(key)
        kept = [r["kept_by_category"] for r in runs if r.get("kept_by_category")]
        if kept:
            agg["kept_by_category"] = {c: list(mean_se([k[c] for k in kept])) for c in CATEGORIES}
            agg["n_by_category"] = {c: sum(r.get("n_by_category", {}).get(c, 0) for r in runs) for c in CATEGORIES}
        out[m] = agg
    return out


# ---------------------------------------------------------------------------------------------
# formatting


def pct(x: float | None, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%" if x is not None and math.isfinite(x) else "n/a"


def pct_se(mean: float, se: float, digits: int = 1, signed: bool = False) -> str:
    """'72.4 ± 1.3%' (the ± part only when the s.e. is known)."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    body = f"{100 * mean:+.{digits}f}" if signed else f"{100 * mean:.{digits}f}"
    if se is not None and math.isfinite(se):
        body += f" ± {100 * se:.{digits}f}"
    return body + (" pp" if signed else "%")


def _stops_text(stops: list[int | None]) -> str:
    hit = [s for s in stops if s is not None]
    if not hit:
        return "none"
    return f"it {', '.join(map(str, hit))}" + (f" ({len(hit)}/{len(stops)} seeds)" if len(stops) > 1 else "")


def _reach_text(values: list[float | None], fmt: str = "{:.1f}") -> str:
    hit = [v for v in values if v is not None]
    if not values:
        return ""
    body = fmt.format(statistics.fmean(hit)) if hit else "never"
    return body + (f" ({len(hit)}/{len(values)} seeds)" if hit and len(hit) < len(values) else "")


def comparison_rows(aggregates: dict[str, dict], baseline: dict) -> list[list[str]]:
    """The accuracy table (ACC_COLUMNS)."""
    rows = [["start (tiny model)", pct(baseline["test_acc"])] + [""] * (len(ACC_COLUMNS) - 2)]
    for m, a in aggregates.items():
        vs, vs_c = a["vs"].get("ppo"), a["vs_curve"].get("ppo")
        rows.append([
            method(m).label, pct_se(*a["final_acc"][:2]), pct_se(*a["delta_start"][:2], signed=True),
            pct_se(*vs[:2], signed=True) if vs else "", pct_se(*a["best_acc"][:2]),
            pct_se(*a["curve_mean_acc"][:2]), pct_se(*vs_c[:2], signed=True) if vs_c else "",
            _reach_text(a["iterations_to_90pct_gain"]), _reach_text(a["iterations_to_ppo_final"]),
            _reach_text(a["seconds_to_90pct_gain"], "{:.0f}"), _reach_text(a["seconds_to_ppo_final"], "{:.0f}"),
        ])
    return rows


def behaviour_rows(aggregates: dict[str, dict], baseline: dict) -> list[list[str]]:
    """The behaviour table (BEHAVIOUR_COLUMNS): faithfulness, kept fraction, cost, early stopping."""
    rows = [["start (tiny model)", pct(baseline["unfaithful_correct_rate"]),
             pct(baseline["unfaithful_share_of_correct"]), "", "", "", ""]]
    for m, a in aggregates.items():
        rows.append([
            method(m).label, pct_se(*a["final_unfaithful_correct"][:2]), pct_se(*a["final_unfaithful_share"][:2]),
            f"{a['train_reward_first'][0]:.2f} → {a['train_reward_last'][0]:.2f}",
            "1.00 (all)" if m == "ppo" else f"{a['mean_kept_frac'][0]:.2f}",
            f"{a['sec_per_iter'][0]:.1f}", _stops_text(a["early_stops"]),
        ])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(r: list[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------------------------------------
# plots


def _band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and mean ± s.e. over runs at each x (s.e. 0 for one run)."""
    mean, lo, hi = [], [], []
    for vals in zip(*curves):
        m, se, _ = mean_se(list(vals))
        se = se if math.isfinite(se) else 0.0
        mean.append(m)
        lo.append(m - se)
        hi.append(m + se)
    return mean, lo, hi


def _at(curve: list[tuple[int, float]], xs: list[int]) -> list[float]:
    """The curve's value at each x (a run that stopped early keeps its last value)."""
    out = []
    for x in xs:
        prior = [v for i, v in curve if i <= x]
        out.append(prior[-1] if prior else float("nan"))
    return out


def make_plots(out: Path, analyses: dict[str, list[dict]], baseline: dict) -> dict[str, str]:
    """PNG files (matplotlib Agg); returns {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}

    def finish(fig, ax, title: str, xlabel: str, ylabel: str, fname: str, key: str) -> None:
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files[key] = fname

    def label(m: str, runs: list) -> str:
        return method(m).label + (f" (mean ± s.e., {len(runs)} seeds)" if len(runs) > 1 else "")

    def eval_plot(key: str, title: str, fname: str) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = sorted({x for runs in analyses.values() for a in runs for x, _ in accuracy_curve(a, baseline, key)})
        for m, runs in analyses.items():
            mean, lo, hi = _band([_at(accuracy_curve(a, baseline, key), xs) for a in runs])
            ax.plot(xs, [100 * v for v in mean], marker="o", ms=3, color=method(m).color, ls=method(m).linestyle,
                    label=label(m, runs))
            ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=method(m).color, alpha=0.15)
        finish(fig, ax, title, "iterations done", "% of test problems (greedy)", fname, key)

    eval_plot("test_acc", "Test accuracy (greedy)", "accuracy.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))  # the same curves against training wall time
    for m, runs in analyses.items():
        curves = [seconds_curve(a, baseline) for a in runs]
        grid = sorted({t for c in curves for t, _ in c})
        mean, lo, hi = _band([_at(c, grid) for c in curves])
        ax.plot(grid, [100 * v for v in mean], drawstyle="steps-post", marker="o", ms=3, color=method(m).color,
                ls=method(m).linestyle, label=label(m, runs))
        ax.fill_between(grid, [100 * v for v in lo], [100 * v for v in hi], step="post", color=method(m).color,
                        alpha=0.15)
    finish(fig, ax, "Test accuracy against training seconds (evaluation excluded)",
           "training seconds (cumulative)", "% of test problems (greedy)", "accuracy_vs_seconds.png",
           "test_acc_seconds")
    eval_plot("unfaithful_correct_rate", "Unfaithful-correct rate of greedy test answers", "unfaithful_correct.png")

    def iter_plot(key: str, title: str, ylabel: str, fname: str, skip_ppo: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m, runs in analyses.items():
            if skip_ppo and m == "ppo":
                continue
            # a random control keeps its I-PPO run's counts by design: its kept-fraction line lies on I-PPO's
            copy = key == "kept_frac" and method(m).matches is not None
            n_it = max((len(a["metrics"]) for a in runs), default=0)
            xs = list(range(1, n_it + 1))
            curves = [[r.get(key, float("nan")) for r in a["metrics"]] for a in runs]
            curves = [c + [c[-1]] * (n_it - len(c)) for c in curves if c]  # a stopped run keeps its last value
            if not curves:
                continue
            mean, lo, hi = _band(curves)
            ax.plot(xs, mean, color=method(m).color, ls=":" if copy else method(m).linestyle, lw=2.0 if copy else 1.2,
                    marker="x" if copy else None, label=label(m, runs) + (" = I-PPO's counts by design" if copy else ""))
            ax.fill_between(xs, lo, hi, color=method(m).color, alpha=0.15)
        finish(fig, ax, title, "iteration", ylabel, fname, key)

    iter_plot("reward", "Training reward (sampled episodes)", "mean reward", "train_reward.png")
    iter_plot("kept_frac", "Fraction of episodes kept (PPO keeps all)", "kept fraction", "kept_fraction.png",
              skip_ppo=True)
    iter_plot("time_iteration", "Wall time per iteration", "seconds", "time_per_iteration.png")

    scored = {m: [e for a in runs for e in a["episodes"] if e["score"] is not None and e["score"] != 0]
              for m, runs in analyses.items()}
    scored = {m: eps for m, eps in scored.items() if eps}
    if scored:
        fig, axes = plt.subplots(1, len(scored), figsize=(6 * len(scored), 4), squeeze=False)
        for ax, (m, eps) in zip(axes[0], scored.items()):
            norm = _normalised_scores(eps)
            for cat in CATEGORIES:
                v = [s for s, e in zip(norm, eps) if e["category"] == cat]
                if v:
                    ax.hist(v, bins=40, range=(-5, 5), alpha=0.55, density=True, color=CAT_COLORS[cat],
                            label=f"{cat.replace('_', '-')} (n={len(v)})")
            flips = [s for s, e in zip(norm, eps) if e["flipped"]]
            if flips:
                ax.hist(flips, bins=40, range=(-5, 5), histtype="step", density=True, color="k", lw=1.5,
                        label=f"reward flipped (n={len(flips)})")
            ax.axvline(0, color="k", lw=0.8)
            ax.set_xlabel("influence score / mean |score| of its iteration (clipped to ±5)")
            ax.set_ylabel("density")
            ax.set_title(f"{method(m).label}: scores of training episodes (zero-advantage ones not shown)",
                         fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "score_histograms.png", dpi=110)
        plt.close(fig)
        files["scores"] = "score_histograms.png"
    return files


def _normalised_scores(eps: list[dict]) -> list[float]:
    """Scores divided by the mean |score| of their (seed, iteration): comparable across iterations."""
    scale: dict[tuple, list[float]] = {}
    for e in eps:
        scale.setdefault((e["seed"], e["iteration"]), []).append(abs(e["score"]))
    means = {k: (statistics.fmean(v) or 1.0) for k, v in scale.items()}
    return [max(-5.0, min(5.0, e["score"] / means[(e["seed"], e["iteration"])])) for e in eps]


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads":
            torch.get_num_threads(), "python": platform.python_version(), "load_avg": load}


# ---------------------------------------------------------------------------------------------
# words


MIN_SEEDS = 3  # before any difference is called real


def verdict(d: list) -> str:
    """'higher' | 'lower' | 'not distinguishable' for a paired (mean, s.e., n): a two-sided 95% t-test on the
    per-seed differences (n - 1 degrees of freedom); 'one seed' when there is no s.e. and 'too few seeds' below
    ``MIN_SEEDS``: with two seeds the s.e. rests on one degree of freedom, so two differences that happen to
    agree give an s.e. near 0 and a huge t (a "−2.3 ± 0.0 pp, t = −58" on two seeds says nothing)."""
    mean, se, n = d
    if n < 2 or not (math.isfinite(mean) and math.isfinite(se)):
        return "one seed"
    if n < MIN_SEEDS:
        return "too few seeds"
    if se == 0:
        return "higher" if mean > 0 else "lower" if mean < 0 else "not distinguishable"
    t = mean / se
    crit = t_critical_95(n - 1)
    return "higher" if t > crit else "lower" if t < -crit else "not distinguishable"


def _diff_text(d: list, what: str) -> str:
    """'+3.1 ± 1.2 pp over 3 seeds (t = 2.6; 95% needs 4.30): not distinguishable from X'."""
    mean, se, n = d
    if n == 0 or not math.isfinite(mean):
        return f"no paired seeds with {what}"
    if n < 2 or not math.isfinite(se):
        return f"{pct_se(mean, None, signed=True)} on one seed (run --seeds 0 1 2 ... for a standard error)"
    v = verdict(d)
    t = f"t = {mean / se:.1f}" if se > 0 else "identical on every seed" if mean == 0 else "the same sign on every seed"
    words = {"higher": f"higher than {what}", "lower": f"lower than {what}",
             "not distinguishable": f"not distinguishable from {what}",
             "too few seeds": f"not tested: {MIN_SEEDS} seeds or more are needed before a difference is called "
                              "real (two seeds leave the s.e. one degree of freedom)"}[v]
    return f"{pct_se(mean, se, signed=True)} over {n} seeds ({t}; 95% needs {t_critical_95(n - 1):.2f}): {words}"


def findings(summaries: dict[str, list[dict]], aggregates: dict[str, dict], baseline: dict, n_test: int,
             demo: dict) -> list[str]:
    """An honest reading of the numbers: each difference next to its standard error."""
    out = []
    base_se = binomial_se(baseline["test_acc"], n_test)
    ppo = aggregates.get("ppo")
    if ppo:
        d = ppo["delta_start"]
        learns = d[0] > 2 * max(base_se, d[1] if math.isfinite(d[1]) else 0.0)
        out.append(
            f"- **Does PPO learn?** {'Yes' if learns else 'Not measurably'}: greedy test accuracy "
            f"{pct(baseline['test_acc'])} (start; test-set s.e. {100 * base_se:.1f} pp at n={n_test}) -> "
            f"{pct_se(*ppo['final_acc'][:2])} after {summaries['ppo'][0]['iterations']} iterations "
            f"({pct_se(*d[:2], signed=True)}); training reward {ppo['train_reward_first'][0]:.2f} (first 3 "
            f"iterations) -> {ppo['train_reward_last'][0]:.2f} (last 3).")
    for m, a in aggregates.items():
        if m == "ppo":
            continue
        label = method(m).label
        parts = [f"final accuracy {pct_se(*a['final_acc'][:2])}"]
        # an influence method against PPO and the controls that isolate its influence; a control against PPO
        others = (("ppo", "ppo_sft", "random", "max_variance", "zero_variance",
                   "random_unweighted" if m == "ippo_unweighted" else None)
                  if method(m).kind == "influence" else ("ppo",))
        for other in others:
            if other and other in a["vs"]:
                parts.append(f"vs {method(other).label}: {_diff_text(a['vs'][other], method(other).label)}")
        out.append(f"- **{label}:** " + "; ".join(dict.fromkeys(parts)) + ".")
        curve_vs = [f"vs {method(o).label}: {_diff_text(a['vs_curve'][o], method(o).label)}"
                    for o in others if o and o in a["vs_curve"]]
        if curve_vs:
            out.append(f"  - learning curve (mean accuracy over the evaluations) {pct_se(*a['curve_mean_acc'][:2])}; "
                       + "; ".join(curve_vs) + ".")
        if "ppo" in aggregates:
            p = aggregates["ppo"]
            out.append(f"  - iterations to reach 90% of PPO's gain: {_reach_text(a['iterations_to_90pct_gain'])} "
                       f"(PPO: {_reach_text(p['iterations_to_90pct_gain'])}); to reach PPO's final "
                       f"accuracy: {_reach_text(a['iterations_to_ppo_final'])} (PPO: "
                       f"{summaries['ppo'][0]['iterations']}).")
            out.append(f"  - training seconds to reach 90% of PPO's gain: "
                       f"{_reach_text(a['seconds_to_90pct_gain'], '{:.0f}')} (PPO: "
                       f"{_reach_text(p['seconds_to_90pct_gain'], '{:.0f}')}); to reach PPO's final accuracy: "
                       f"{_reach_text(a['seconds_to_ppo_final'], '{:.0f}')} (PPO: "
                       f"{_reach_text(p['seconds_to_ppo_final'], '{:.0f}')}).")
        kept = a.get("kept_by_category")
        if kept:
            n = a["n_by_category"]
            out.append(f"  - kept {pct(kept['faithful_correct'][0], 0)} of faithful-correct (n={n['faithful_correct']}), "
                       f"{pct(kept['unfaithful_correct'][0], 0)} of unfaithful-correct (n={n['unfaithful_correct']}) and "
                       f"{pct(kept['wrong'][0], 0)} of wrong (n={n['wrong']}) training episodes with a learning "
                       "signal (non-zero advantage).")
        if method(m).kind == "influence":
            stops = [s for s in a["early_stops"] if s is not None]
            if stops:
                why = "; ".join(r["stop_reason"] or "" for r in summaries[m] if r["early_stop"] is not None)
                out.append(f"  - stopped by itself at iteration(s) {', '.join(map(str, stops))} of "
                           f"{summaries[m][0]['iterations']}: {why}.")
            else:
                out.append(f"  - did not stop by itself within {summaries[m][0]['iterations']} iterations "
                           f"(mean kept fraction {a['mean_kept_frac'][0]:.2f}).")
            if "noise_auc" in a:
                out.append(f"  - reward noise ({100 * float(demo['reward_noise']):.0f}% flipped): ROC AUC of the "
                           f"score at ranking clean above flipped episodes {a['noise_auc'][0]:.3f} (0.5 = chance); "
                           f"kept {pct(a['kept_flipped'][0], 0)} of flipped vs {pct(a['kept_clean'][0], 0)} of clean.")
        if demo.get("hackable_reward"):
            out.append(f"  - training episodes rewarded although wrong by the true checker (the exploit): "
                       f"{pct(a['unearned_reward_first'][0])} in the first 3 iterations -> "
                       f"{pct(a['unearned_reward_last'][0])} in the last 3.")
        if "ppo" in aggregates:
            t, pt = a["sec_per_iter"][0], aggregates["ppo"]["sec_per_iter"][0]
            out.append(f"  - {t:.1f} s per iteration vs PPO {pt:.1f} s ({t / pt:.2f}x; wall time, processes sharing "
                       "the CPU).")
    return out


def write_report(out: Path, demo: dict, cfg: dict, summaries: dict[str, list[dict]], aggregates: dict[str, dict],
                 baseline: dict, plots: dict, machine: dict, wall: dict[str, float], total_wall: float, n_test: int,
                 notes: list[str], spec: dict, parallel: int, split: str = "test") -> str:
    r, p, i = cfg["rollout"], cfg["ppo"], cfg.get("influence", {})
    seeds = demo["seeds"]
    settings = [
        (f"- task: bundled arithmetic word problems (values <= {spec['max_value']}, +/- operands <= "
         f"{spec['max_operand']}); {demo['train_problems']} train prompts, {demo['val_problems']} gold validation "
         f"solutions (always faithful), {n_test} {split} problems (data seed {demo['data_seed']})"
         + ("; **evaluated on the held-out dev split, not the test split** (choosing the gold-data control's λ)"
            if split == "dev" else "")),
        f"- model: the bundled tiny Llama (`{Path(cfg['model']['path']).name}`; `build_info.json` says how it was made)",
        (f"- seeds: {', '.join(map(str, seeds))}; iterations: {cfg['iterations']}; reward noise: {demo['reward_noise']}"
         + ("; **hackable reward** (credit for the gold number anywhere in the response; accuracy by the true "
            "checker)" if demo.get("hackable_reward") else "")
         + (f"; **gold data shifted**: validation solutions from {demo['val_shift']} problems only"
            if demo.get("val_shift") else "")
         + f"; gold validation pool: {demo['val_problems']} solutions"),
        (f"- rollout: {r['prompts_per_iter']} prompts x {r['samples_per_prompt']} samples, temperature "
         f"{r['temperature']}, max {r['max_new_tokens']} new tokens"),
        (f"- PPO: advantage {p.get('advantage')}, lr {p.get('lr')}, {p.get('epochs')} epoch(s), mini-batch "
         f"{p.get('mini_batch_size')}, KL {p.get('kl_coef')}"),
        (f"- I-PPO: mode {i.get('mode', 'exact')}, {i.get('n_val')} validation solutions per iteration, keep "
         f"score > 0, weights score / mean(kept score)"),
        ("- controls (plain PPO, same prompts and seeds): *random filter* keeps in each iteration as many "
         "episodes as I-PPO kept in that iteration, drawn at random among the episodes with a non-zero "
         "advantage, with I-PPO's weights in random order; *zero-variance filter* drops every prompt whose "
         "samples all got the same reward (DAPO's filter, without re-sampling); *PPO + SFT on the gold data* "
         f"adds λ = {demo.get('sft_coef')} x the SFT loss on exactly the gold validation solutions I-PPO's target "
         "uses in that iteration to every mini-batch (the control for I-PPO's access to gold data). *unweighted*: "
         "I-PPO with weight 1 for kept episodes, and its random match with weight 1"),
        (f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {parallel} training process(es) at a time "
         f"(1 torch thread each), torch {machine['torch']}, Python {machine['python']}; load average at start "
         f"{machine.get('load_start')}, at end {machine.get('load_end')}"),
        f"- wall time: {total_wall / 60:.1f} min in all",
        *([("- why I-PPO kept or dropped each episode, token by token: [inspect.html](inspect.html) (`ippo "
            "inspect` of the first seed's I-PPO run, last iteration)")] if (out / "inspect.html").is_file() else []),
    ]
    text = ["# ippo demo: PPO vs I-PPO vs controls", "",
            ("Generated by `ippo demo`. Every run starts from the same tiny model and sees the same prompts and "
             "sampling seeds; the methods differ only in which episodes the update keeps. *Unfaithful-correct* = "
             "the final answer is right but some `<<expr=value>>` step does not compute or the answer does not "
             "follow from the last step."), "",
            "## Settings", "", *settings, "",
            "## Results", "", markdown_table(ACC_COLUMNS, comparison_rows(aggregates, baseline)), "",
            markdown_table(BEHAVIOUR_COLUMNS, behaviour_rows(aggregates, baseline)), "",
            (f"Accuracies are greedy answers to the {n_test} test problems after the last iteration (final) or at "
             "the best evaluation (best). "
             + ("Values are mean ± standard error over seeds; *Δ vs PPO* is the mean of the per-seed differences "
                "(same seeds) ± its standard error, and a difference is called real below only when it passes a "
                "two-sided 95% t-test on those per-seed differences (with k seeds, |mean| > t(k-1) s.e.). "
                if len(seeds) > 1 else
                "One seed: no standard error over seeds (`--seeds 0 1 2`). ")
             + f"One accuracy on {n_test} problems has a test-set standard error of about "
               f"{100 * binomial_se(baseline['test_acc'], n_test):.1f} pp. *Curve mean acc*: the mean of a run's "
               "evaluations after the start (how fast it learns, not only where it ends). *It. to 90% of PPO's "
               "gain* / *to PPO's final*: iterations until a run's evaluation first reaches the start accuracy "
               "plus 90% of PPO's gain / PPO's final accuracy, on the same seed (mean over the seeds that reach "
               "it); *s to ...*: the same in cumulative training seconds (rollout, scoring, update; evaluation "
               "excluded; processes sharing the CPU, so compare within one report). *Mean kept*: fraction of "
               "training episodes kept. *Unfaithful-correct*: share of greedy test "
               "answers that are right with a flawed chain."), ""]
    per_seed = [[method(m).label] + [f"{pct(s['final_acc'])} ± {100 * s['final_acc_se']:.1f}" for s in runs]
                for m, runs in summaries.items()]
    text += ["### Per seed (final greedy accuracy ± test-set s.e.)", "",
             markdown_table(["method"] + [f"seed {s}" for s in seeds], per_seed), ""]
    ep_rows = []
    for m, a in aggregates.items():
        if a.get("kept_by_category"):
            k, n = a["kept_by_category"], a["n_by_category"]
            ep_rows.append([method(m).label] + [f"{pct(k[c][0], 0)} of {n[c]}" for c in CATEGORIES])
    if ep_rows:
        text += ["### Which training episodes were kept", "",
                 markdown_table(["method", "faithful-correct", "unfaithful-correct", "wrong"], ep_rows), "",
                 ("Each logged training episode with a learning signal (non-zero advantage) re-checked step by "
                  "step (correctness by the clean answer, whatever reward it was given)."), ""]
    text += ["## What the numbers show", "", *notes, ""]
    text += ["## Plots", ""]
    captions = {"test_acc": "Test accuracy (greedy)", "test_acc_seconds": "Test accuracy against training seconds",
                "unfaithful_correct_rate": "Unfaithful-correct rate",
                "reward": "Training reward", "kept_frac": "Kept fraction", "time_iteration": "Wall time per iteration",
                "scores": "Score histograms (faithful vs unfaithful vs wrong)"}
    for key, fname in plots.items():
        text += [f"### {captions.get(key, key)}", "", f"![{captions.get(key, key)}]({fname})", ""]
    text += ["## Files", "",
             ("- `data/`: the splits; `<method>/seed<k>.yaml`: each run's config (`ippo train` on it reproduces "
              "the run; with reward noise also set `IPPO_DEMO_REWARD_NOISE` and `IPPO_DEMO_NOISE_SALT=seed<k>`)"),
             ("- `<method>/seed<k>/metrics.jsonl`, `eval.jsonl`, `influence.jsonl`: the run logs; "
              "`<method>/seed<k>.log`: its output"),
             "- `summary.json`: every number above", ""]
    report = "\n".join(text)
    (out / "report.md").write_text(report)
    return report


__all__ = [
    "ACC_COLUMNS",
    "BEHAVIOUR_COLUMNS",
    "TABLE_COLUMNS",
    "add_paired_metrics",
    "aggregate",
    "analyse_run",
    "behaviour_rows",
    "comparison_rows",
    "findings",
    "finite",
    "make_plots",
    "markdown_table",
    "read_jsonl",
    "run_summary",
    "text_table",
    "write_report",
]
