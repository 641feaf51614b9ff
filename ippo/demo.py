"""``ippo demo``: PPO vs I-PPO on the bundled arithmetic task, measured, in minutes on a CPU.

What it does (``ippo demo --help`` for the options):

1. writes the task's splits as JSONL under ``OUT/data``: train prompts, validation = gold solutions
   (always faithful: the I-PPO validation gradient), test problems;
2. evaluates the bundled tiny model once (iteration 0, greedy, the same for every run);
3. trains PPO and I-PPO (``influence.timing`` before_update, in_update or both) from that model, on the
   same prompts and seeds, in this process; each run writes the usual ``metrics.jsonl``, ``eval.jsonl``
   (with the faithfulness rates of the greedy test answers, through ``eval.response_metrics``) and
   ``influence.jsonl`` under ``OUT/<method>/seed<k>``;
4. re-checks every logged training episode with ``ippo.tasks.faithfulness`` (faithful-correct,
   unfaithful-correct, wrong) and, with ``--reward-noise p``, finds the episodes whose reward was flipped;
5. writes ``OUT/report.md``, PNG plots and ``OUT/summary.json``, and prints the comparison table.

Why: the paper claims I-PPO beats PPO, filters unfaithful chains of thought ("right answer, flawed
logic") and stops by itself; here every reasoning step is checkable, so those claims become numbers.
The report states them whichever way they come out.

Settings live in ``configs/demo.yaml`` (a training config plus a ``demo:`` section); ``key=value``
arguments override either part (``ppo.lr=3e-4``, ``demo.test_problems=300``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TINY_ARITH = ("ippo/assets/tiny_arith", "builtin:tiny-arith")  # model.path values meaning the bundled model
NOISE_ENV = "IPPO_DEMO_REWARD_NOISE"  # fraction p of episodes whose reward is flipped
SALT_ENV = "IPPO_DEMO_NOISE_SALT"  # which episodes: a hash of (salt, gold, response) below p
TIMINGS = ("before_update", "in_update", "both")
# The demo's own settings (configs/demo.yaml is a plain training config; a `demo:` section there or
# demo.KEY=VALUE arguments override these).
DEMO_DEFAULTS: dict[str, Any] = {"train_problems": 2000, "val_problems": 200, "test_problems": 150,
                                 "data_seed": 0, "seeds": [0], "timing": "before_update", "reward_noise": 0.0}
# method key -> (label, influence overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ppo": ("PPO", {"enabled": False}),
    "ippo": ("I-PPO", {"enabled": True, "timing": "before_update"}),
    "ippo_in_update": ("I-PPO in_update", {"enabled": True, "timing": "in_update"}),
}
CATEGORIES = ("faithful_correct", "unfaithful_correct", "wrong")
COLORS = {"ppo": "tab:blue", "ippo": "tab:red", "ippo_in_update": "tab:green"}
CAT_COLORS = {"faithful_correct": "tab:green", "unfaithful_correct": "tab:orange", "wrong": "tab:gray"}


# ---------------------------------------------------------------------------------------------
# reward (with recorded noise), test-set faithfulness metrics, ROC AUC


def _gold_value(gold: Any) -> Fraction | None:
    from ippo.tasks.faithfulness import parse_number

    if isinstance(gold, (int, Fraction)):
        return Fraction(gold)
    return parse_number(str(gold))


def clean_reward(response: str, gold: Any) -> float:
    """The task's reward: 1.0 iff the ``#### answer`` equals the gold answer."""
    from ippo.tasks import arithmetic

    value = _gold_value(gold)
    if value is None:
        return 0.0
    return arithmetic.reward(response, value)  # Fraction gold works like an int here


def is_flipped(response: str, gold: Any, p: float, salt: str) -> bool:
    """Deterministic pseudo-random choice of a fraction ``p`` of (response, gold) pairs."""
    if p <= 0:
        return False
    h = hashlib.sha256(f"{salt}\x00{gold}\x00{response}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64 < p


def reward(response: str, gold: Any) -> float:
    """``reward.fn`` of the demo: the clean reward, flipped (1 - r) for the episodes ``is_flipped`` picks
    with p = $IPPO_DEMO_REWARD_NOISE (default 0) and salt $IPPO_DEMO_NOISE_SALT. Note the trainer also
    scores its test evaluation (``greedy_acc``) with this function; the demo reports the clean
    ``test_acc`` of ``faithfulness_metrics`` instead."""
    r = clean_reward(response, gold)
    p = float(os.environ.get(NOISE_ENV) or 0.0)
    if p > 0 and is_flipped(response, gold, p, os.environ.get(SALT_ENV, "")):
        r = 1.0 - r
    return r


def faithfulness_metrics(responses: list[str], rows: list) -> dict[str, float]:
    """``eval.response_metrics`` hook: clean accuracy and faithfulness rates of the greedy answers.

    ``rows`` are ``ippo.data.Example``s (``.gold``: the final answer). Works for GSM8K runs too.
    """
    from ippo.tasks.faithfulness import check

    n = len(responses)
    if n == 0:
        return {}
    reps = [check(r, row.gold) for r, row in zip(responses, rows)]
    correct = sum(bool(r.correct) for r in reps)
    unfaithful_correct = sum(r.unfaithful_correct for r in reps)
    return {
        "test_acc": correct / n,
        "faithful_rate": sum(r.faithful for r in reps) / n,
        "faithful_correct_rate": (correct - unfaithful_correct) / n,
        "unfaithful_correct_rate": unfaithful_correct / n,
        "unfaithful_share_of_correct": unfaithful_correct / correct if correct else 0.0,
    }


def episode_category(response: str, gold: Any) -> str:
    """faithful_correct | unfaithful_correct | wrong (by the clean answer, whatever the logged reward)."""
    from ippo.tasks.faithfulness import check

    rep = check(response, str(gold))
    if not rep.correct:
        return "wrong"
    return "faithful_correct" if rep.faithful else "unfaithful_correct"


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U / (n+ n-)).

    NaN when either class is empty. Rank-based, no sklearn: average ranks over tied scores.
    """
    pairs = sorted(zip(scores, labels), key=lambda x: x[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # 1-based average rank of the tie group
        rank_sum += avg_rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ---------------------------------------------------------------------------------------------
# settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ippo demo",
        description="PPO vs I-PPO on the bundled arithmetic task and tiny model (CPU, no downloads): "
                    "accuracy, unfaithful-correct rate, kept fraction, time, score histograms -> OUT/report.md.")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml (dotted keys, "
                   "e.g. ppo.lr=3e-4 demo.test_problems=300)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (several: mean ± spread)")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations per run")
    p.add_argument("--reward-noise", type=float, default=None, metavar="P",
                   help="flip the reward of a fraction P of episodes (recorded); the report gives the ROC AUC "
                        "of the influence score at separating them")
    p.add_argument("--timing", choices=TIMINGS, default=None,
                   help="I-PPO scoring: before the update (the paper), inside the update's backward, or both")
    p.add_argument("--out", default="runs/demo", help="output directory (a previous demo output there is replaced)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config (default: configs/demo.yaml)")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """(demo settings, training-config dict) from the YAML file, key=value overrides and the flags."""
    from ippo.config import ConfigError, _merge, parse_overrides

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"demo config not found: {path} (run from a checkout that has configs/demo.yaml, "
                          "or pass --config)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = _merge(data, parse_overrides(args.overrides))
    demo = dict(DEMO_DEFAULTS)
    extra = data.pop("demo", None) or {}
    unknown = sorted(set(extra) - set(DEMO_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown demo key(s): {', '.join('demo.' + k for k in unknown)}")
    demo.update(extra)
    if args.seeds is not None:
        demo["seeds"] = args.seeds
    if args.timing is not None:
        demo["timing"] = args.timing
    if args.reward_noise is not None:
        demo["reward_noise"] = args.reward_noise
    if args.iterations is not None:
        data["iterations"] = args.iterations
    if isinstance(demo["seeds"], int):
        demo["seeds"] = [demo["seeds"]]
    if not demo["seeds"] or len(set(demo["seeds"])) != len(demo["seeds"]):
        raise ConfigError(f"demo.seeds={demo['seeds']}: give one or more distinct seeds")
    if demo["timing"] not in TIMINGS:
        raise ConfigError(f"demo.timing={demo['timing']!r}: expected one of {' | '.join(TIMINGS)}")
    if not 0 <= float(demo["reward_noise"]) < 1:
        raise ConfigError(f"--reward-noise={demo['reward_noise']}: must be in [0, 1)")
    for k in ("train_problems", "val_problems", "test_problems"):
        if int(demo[k]) <= 0:
            raise ConfigError(f"demo.{k}={demo[k]}: must be > 0")
    if data.get("model", {}).get("path", TINY_ARITH[0]) in TINY_ARITH:
        from ippo.tasks import TINY_MODEL_DIR

        data.setdefault("model", {})["path"] = str(TINY_MODEL_DIR)
    return demo, data


def methods_for(timing: str) -> list[str]:
    return {"before_update": ["ppo", "ippo"], "in_update": ["ppo", "ippo_in_update"],
            "both": ["ppo", "ippo", "ippo_in_update"]}[timing]


def write_splits(out: Path, demo: dict) -> dict[str, Path]:
    """Train prompts, validation gold solutions, test problems as question/answer JSONL."""
    from ippo.tasks import arithmetic

    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, key in (("train", "train_problems"), ("validation", "val_problems"), ("test", "test_problems")):
        paths[split] = d / f"{split}.jsonl"
        with paths[split].open("w", encoding="utf-8") as f:
            for prob in arithmetic.generate(split, int(demo[key]), int(demo["data_seed"])):
                f.write(json.dumps({"question": prob.question, "answer": prob.solution}) + "\n")
    return paths


def run_config(base: dict, paths: dict[str, Path], run_dir: Path, seed: int, method: str):
    """The TrainConfig of one run, also saved as ``run_dir.yaml`` (``ippo train`` reproduces the run)."""
    from ippo.config import _merge, load_config

    data = _merge(base, {"run_dir": str(run_dir), "seed": seed, "influence": METHODS[method][1],
                         "data": {"train_path": str(paths["train"]), "val_path": str(paths["validation"]),
                                  "test_path": str(paths["test"])}})
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


@contextmanager
def reward_noise(p: float, salt: str):
    old = {k: os.environ.get(k) for k in (NOISE_ENV, SALT_ENV)}
    os.environ[NOISE_ENV], os.environ[SALT_ENV] = repr(float(p)), salt
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# running


def _quiet_transformers() -> None:
    with contextlib.suppress(Exception):  # cosmetics only
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def baseline_eval(cfg) -> dict[str, float]:
    """The starting policy on the test split (greedy; identical for every method and seed)."""
    import torch

    from ippo.data import PromptFormatter, load_jsonl
    from ippo.evaluate import evaluate
    from ippo.models import load_policy, load_tokenizer, resolve_path
    from ippo.rewards import make_reward_fn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = resolve_path(cfg.model, cfg.run_dir)
    tok = load_tokenizer(cfg.model, path)
    fmt = PromptFormatter(tok, cfg.data.prompt_template, cfg.data.chat_template)
    rows = load_jsonl(cfg.data.test_path, cfg.data.strip_calculator, cfg.data.max_test_rows)
    policy = load_policy(cfg.model, path, torch.device("cpu"))
    return evaluate(policy, tok, fmt, rows, cfg.eval, cfg.reward.fn, make_reward_fn(cfg.reward.fn), cfg.seed, 0)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def add_sampled_acc(ev: dict, noise: float) -> dict:
    """``sampled_acc``: eval's ``mean_acc`` (k samples per test problem at eval.temperature), which the trainer
    scores with the (possibly noisy) training reward. Flips are a hash independent of correctness, so
    E[measured] = p + acc (1 - 2p): invert that to report the clean rate."""
    ev["sampled_acc"] = (ev["mean_acc"] - noise) / (1 - 2 * noise) if noise > 0 else ev["mean_acc"]
    return ev


def analyse_run(run_dir: Path, train_gold: list[str], noise: float, salt: str) -> dict:
    """Per-run numbers from the logs: eval curve, per-iteration metrics, per-episode categories/flips."""
    metrics = _jsonl(run_dir / "metrics.jsonl")
    evals = [add_sampled_acc(e, noise) for e in _jsonl(run_dir / "eval.jsonl")]
    episodes = []
    for r in _jsonl(run_dir / "influence.jsonl"):
        gold = train_gold[r["prompt_id"]]
        clean = clean_reward(r["response"], gold)
        episodes.append({"run": run_dir.name, "iteration": r["iteration"], "score": r["score"], "kept": r["kept"],
                         "category": episode_category(r["response"], gold),
                         "flipped": noise > 0 and abs(r["reward"] - clean) > 0.5})
    return {"metrics": metrics, "evals": evals, "episodes": episodes}


def run_summary(a: dict, baseline: dict, iterations: int) -> dict:
    """Scalars of one run (what the comparison table shows)."""
    evals = a["evals"]
    last = evals[-1] if evals else baseline
    m = a["metrics"]
    stop_rec = next((r for r in m if r.get("stop_reason") and r.get("empty_action") == "stop"), None)
    stop = stop_rec["iteration"] + 1 if stop_rec else None
    eps = a["episodes"]
    out = {
        "final_acc": last["test_acc"], "best_acc": max([e["test_acc"] for e in evals] + [baseline["test_acc"]]),
        "final_sampled_acc": last["sampled_acc"],
        "final_unfaithful_correct": last["unfaithful_correct_rate"],
        "final_unfaithful_share": last["unfaithful_share_of_correct"],
        "final_faithful_correct": last["faithful_correct_rate"],
        "mean_kept_frac": statistics.fmean(r["kept_frac"] for r in m) if m else float("nan"),
        "sec_per_iter": statistics.fmean(r["time_iteration"] for r in m) if m else float("nan"),
        "iterations_done": len(m), "early_stop": stop, "iterations": iterations,
        "stop_max_score": stop_rec.get("score_max") if stop_rec else None,
        "mean_train_reward": statistics.fmean(r["reward"] for r in m) if m else float("nan"),
    }
    # Episodes with score exactly 0 carry no learning signal (zero advantage: e.g. every sample of the prompt
    # got the same reward under GRPO) and are always dropped; the per-category rates leave them out.
    all_scored = [e for e in eps if e["score"] is not None]
    scored = [e for e in all_scored if e["score"] != 0]
    out["n_zero_score"] = len(all_scored) - len(scored)
    if scored:
        out["kept_by_category"] = {c: _rate([e["kept"] for e in scored if e["category"] == c]) for c in CATEGORIES}
        out["n_by_category"] = {c: sum(e["category"] == c for e in scored) for c in CATEGORIES}
        flips = [e for e in scored if e["flipped"]]
        if flips:
            out["noise_auc"] = roc_auc([e["score"] for e in scored], [not e["flipped"] for e in scored])
            out["kept_flipped"] = _rate([e["kept"] for e in flips])
            out["kept_clean"] = _rate([e["kept"] for e in scored if not e["flipped"]])
            out["n_flipped"] = len(flips)
    out["n_episodes"] = len(eps)
    out["n_flipped_all"] = sum(e["flipped"] for e in eps)
    return out


def _rate(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------
# aggregation, table, plots, report


def _finite(xs: list[float | None]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def mean_spread(xs: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none)."""
    v = _finite(xs)
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def fmt_ms(xs: list[float | None], pct: bool = False, digits: int = 1) -> str:
    m, s = mean_spread(xs)
    if not math.isfinite(m):
        return "n/a"
    k = 100.0 if pct else 1.0
    body = f"{m * k:.{digits}f}"
    if len(_finite(xs)) > 1:
        body += f" ± {s * k:.{digits}f}"
    return body + ("%" if pct else "")


TABLE_COLUMNS = ["method", "final acc", "best acc", "sampled acc", "unfaithful-correct", "unfaithful share of correct",
                 "mean kept", "s / iter", "early stop"]


def comparison_rows(summaries: dict[str, list[dict]], baseline: dict) -> list[list[str]]:
    rows = [["start (tiny model)", f"{100 * baseline['test_acc']:.1f}%", "", f"{100 * baseline['sampled_acc']:.1f}%",
             f"{100 * baseline['unfaithful_correct_rate']:.1f}%",
             f"{100 * baseline['unfaithful_share_of_correct']:.1f}%", "", "", ""]]
    for method, runs in summaries.items():
        stops = [r["early_stop"] for r in runs]
        n_stop = sum(s is not None for s in stops)
        stop_txt = "none" if not n_stop else (
            f"it {', '.join(str(s) for s in stops if s is not None)}" + (f" ({n_stop}/{len(runs)} seeds)"
                                                                         if len(runs) > 1 else ""))
        kept = [r["mean_kept_frac"] for r in runs]
        rows.append([
            METHODS[method][0],
            fmt_ms([r["final_acc"] for r in runs], pct=True),
            fmt_ms([r["best_acc"] for r in runs], pct=True),
            fmt_ms([r["final_sampled_acc"] for r in runs], pct=True),
            fmt_ms([r["final_unfaithful_correct"] for r in runs], pct=True),
            fmt_ms([r["final_unfaithful_share"] for r in runs], pct=True),
            "1.00 (all)" if method == "ppo" else fmt_ms(kept, digits=2),
            fmt_ms([r["sec_per_iter"] for r in runs]),
            stop_txt,
        ])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _curve(evals: list[dict], baseline: dict, key: str, xs: list[int]) -> list[float]:
    """The eval metric at each x (iterations done); a run that stopped early keeps its final value."""
    pts = [(0, baseline[key])] + [(e["iteration"] + 1, e[key]) for e in evals]
    out = []
    for x in xs:
        prior = [v for i, v in pts if i <= x]
        out.append(prior[-1])
    return out


def make_plots(out: Path, analyses: dict[str, list[dict]], baseline: dict, iterations: int) -> dict[str, str]:
    """PNG files (matplotlib Agg); returns {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    xs = sorted({0} | {e["iteration"] + 1 for runs in analyses.values() for a in runs for e in a["evals"]})

    def stops(method: str) -> list[int]:
        return [r["iteration"] + 1 for a in analyses[method] for r in a["metrics"]
                if r.get("stop_reason") and r.get("empty_action") == "stop"]

    def mark_stops(ax, method: str) -> None:
        for s in stops(method):
            ax.axvline(s, color=COLORS[method], ls="--", lw=1)
            ax.annotate(f"{METHODS[method][0]} stops", (s, ax.get_ylim()[1]), rotation=90, va="top", ha="right",
                        fontsize=7, color=COLORS[method])

    def eval_plot(key: str, title: str, fname: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, runs in analyses.items():
            curves = [_curve(a["evals"], baseline, key, xs) for a in runs]
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(xs))]
            ax.plot(xs, [100 * v for v in mean], marker="o", color=COLORS[method],
                    label=METHODS[method][0] + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""))
            if len(runs) > 1:
                lo = [100 * min(c[i] for c in curves) for i in range(len(xs))]
                hi = [100 * max(c[i] for c in curves) for i in range(len(xs))]
                ax.fill_between(xs, lo, hi, color=COLORS[method], alpha=0.15)
        for method in analyses:
            mark_stops(ax, method)
        ax.set_xlabel("iterations done")
        ax.set_ylabel("% of test problems (greedy)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files[key] = fname

    eval_plot("test_acc", "Test accuracy (greedy)", "accuracy.png")
    eval_plot("sampled_acc", "Test accuracy of sampled answers (eval.temperature, k per problem)",
              "sampled_accuracy.png")
    eval_plot("unfaithful_correct_rate", "Unfaithful-correct rate (right answer, flawed steps)",
              "unfaithful_correct.png")

    def iter_plot(key: str, title: str, ylabel: str, fname: str, scale: float = 1.0) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, runs in analyses.items():
            for k, a in enumerate(runs):
                its = [r["iteration"] + 1 for r in a["metrics"]]
                ax.plot(its, [scale * r.get(key, float("nan")) for r in a["metrics"]], color=COLORS[method],
                        alpha=0.9 if len(runs) == 1 else 0.5, marker=".",
                        label=METHODS[method][0] if k == 0 else None)
        for method in analyses:
            mark_stops(ax, method)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files[key] = fname

    iter_plot("kept_frac", "Fraction of episodes kept (PPO keeps all)", "kept fraction", "kept_fraction.png")
    iter_plot("time_iteration", "Wall time per iteration", "seconds", "time_per_iteration.png")
    iter_plot("reward", "Training reward (sampled episodes)", "mean reward", "train_reward.png")

    scored = {m: [e for a in runs for e in a["episodes"] if e["score"] is not None and e["score"] != 0]
              for m, runs in analyses.items()}
    n_zero = {m: sum(e["score"] == 0 for a in runs for e in a["episodes"]) for m, runs in analyses.items()}
    scored = {m: eps for m, eps in scored.items() if eps}
    if scored:
        fig, axes = plt.subplots(1, len(scored), figsize=(6 * len(scored), 4), squeeze=False)
        for ax, (method, eps) in zip(axes[0], scored.items()):
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
            ax.set_title(f"{METHODS[method][0]}: scores of training episodes\n"
                         f"({n_zero[method]} zero-advantage episodes with score 0 not shown)", fontsize=10)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "score_histograms.png", dpi=110)
        plt.close(fig)
        files["scores"] = "score_histograms.png"
    return files


def _normalised_scores(eps: list[dict]) -> list[float]:
    """Scores divided by the mean |score| of their (run, iteration): comparable across iterations."""
    scale: dict[tuple, list[float]] = {}
    for e in eps:
        scale.setdefault((id(eps), e.get("run"), e["iteration"]), []).append(abs(e["score"]))
    means = {k: (statistics.fmean(v) or 1.0) for k, v in scale.items()}
    return [max(-5.0, min(5.0, e["score"] / means[(id(eps), e.get("run"), e["iteration"])])) for e in eps]


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


def _pp(x: float) -> str:
    return f"{100 * x:.1f} pp" if math.isfinite(x) else "n/a"


def findings(summaries: dict[str, list[dict]], baseline: dict, n_test: int, demo: dict) -> list[str]:
    """An honest reading of the numbers: differences next to their noise level."""
    out = []
    ppo = summaries.get("ppo", [])

    def se(p: float) -> float:  # binomial standard error of one test-set rate
        return math.sqrt(max(p * (1 - p), 1e-9) / max(n_test, 1))

    base = baseline["test_acc"]
    p_acc = mean_spread([r["final_acc"] for r in ppo])[0]
    base_s = baseline["sampled_acc"]
    p_s = mean_spread([r["final_sampled_acc"] for r in ppo])[0]
    moved = p_acc - base
    verdict0 = ("Yes" if moved > 2 * se(base) else "No, it gets worse" if moved < -2 * se(base)
                else "Not measurably")
    out.append(f"- **Does PPO learn?** {verdict0} at this budget: greedy test accuracy goes from {100 * base:.1f}% (the tiny model) to "
               f"{100 * p_acc:.1f}% after {ppo[0]['iterations']} iterations ({_pp(p_acc - base)}; one greedy "
               f"test-set rate has a standard error of about {_pp(se(base))} at n={n_test}); sampled accuracy "
               f"(what PPO optimises: answers drawn at temperature) from {100 * base_s:.1f}% to {100 * p_s:.1f}% "
               f"({_pp(p_s - base_s)}).")
    for method in [m for m in summaries if m != "ppo"]:
        runs = summaries[method]
        label = METHODS[method][0]
        acc = [r["final_acc"] for r in runs]
        d_acc = mean_spread(acc)[0] - p_acc
        noise = 2 * math.sqrt(2) * se(p_acc) / math.sqrt(len(runs))
        verdict = ("higher than" if d_acc > noise else "lower than" if d_acc < -noise
                   else "not distinguishable from")
        sacc = [r["final_sampled_acc"] for r in runs]
        out.append(f"- **Does {label} beat PPO?** Final greedy test accuracy {fmt_ms(acc, pct=True)} vs "
                   f"{fmt_ms([r['final_acc'] for r in ppo], pct=True)}: {_pp(d_acc)}, {verdict} PPO at this "
                   f"budget (difference vs ~2 standard errors = {_pp(noise)}, {len(runs)} seed(s)). Sampled "
                   f"accuracy {fmt_ms(sacc, pct=True)} vs {fmt_ms([r['final_sampled_acc'] for r in ppo], pct=True)} "
                   f"({_pp(mean_spread(sacc)[0] - p_s)}).")
        uc = mean_spread([r["final_unfaithful_correct"] for r in runs])[0]
        puc = mean_spread([r["final_unfaithful_correct"] for r in ppo])[0]
        share = mean_spread([r["final_unfaithful_share"] for r in runs])[0]
        pshare = mean_spread([r["final_unfaithful_share"] for r in ppo])[0]
        out.append(f"- **Fewer unfaithful chains on the test set?** {label}: {100 * uc:.1f}% of answers are "
                   f"unfaithful-correct ({100 * share:.1f}% of its correct answers) vs PPO {100 * puc:.1f}% "
                   f"({100 * pshare:.1f}%); start {100 * baseline['unfaithful_correct_rate']:.1f}%. "
                   + ("A difference this small is within test-set noise." if abs(uc - puc) < 2 * se(max(uc, puc))
                      else "The difference exceeds ~2 standard errors."))
        kept = [r.get("kept_by_category") for r in runs if r.get("kept_by_category")]
        if kept:
            k = {c: mean_spread([x[c] for x in kept])[0] for c in CATEGORIES}
            n = {c: sum(r.get("n_by_category", {}).get(c, 0) for r in runs) for c in CATEGORIES}
            fc, uc_k = k["faithful_correct"], k["unfaithful_correct"]
            if not (math.isfinite(fc) and math.isfinite(uc_k)):
                filt = "cannot be compared: no training episode was " + (
                    "unfaithful-correct" if not math.isfinite(uc_k) else "faithful-correct")
            else:
                filt = ("it filters unfaithful-correct episodes more often than faithful-correct ones"
                        if uc_k < fc - 0.05 else
                        "it keeps unfaithful-correct episodes about as often as faithful-correct ones (within 5 pp)"
                        if abs(uc_k - fc) <= 0.05 else
                        "it keeps unfaithful-correct episodes MORE often than faithful-correct ones")
            if min(n["faithful_correct"], n["unfaithful_correct"]) < 30:
                filt += " (few episodes: a rough estimate)"
            pct = lambda x: f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"
            out.append(f"- **Does the influence filter drop unfaithful episodes?** {label} kept "
                       f"{pct(fc)} of faithful-correct (n={n['faithful_correct']}), "
                       f"{pct(uc_k)} of unfaithful-correct (n={n['unfaithful_correct']}) and "
                       f"{pct(k['wrong'])} of wrong (n={n['wrong']}) training episodes: {filt}.")
        stopped = [r for r in runs if r["early_stop"] is not None]
        if stopped:
            why = []
            for r in stopped:
                ms = r.get("stop_max_score")
                why.append(f"iteration {r['early_stop']} (" + (
                    "every score exactly 0: all episodes had zero advantage, i.e. every prompt's samples got "
                    "the same reward -- no learning signal left" if ms == 0 else
                    f"max score {ms:.2e}: the filter judged every episode harmful or useless") + ")")
            out.append(f"- **Early stop:** {label} stopped by itself (no episode with a positive score) at "
                       f"{'; '.join(why)}, out of {runs[0]['iterations']} iterations"
                       + (f" ({len(stopped)}/{len(runs)} seeds)." if len(runs) > 1 else "."))
        else:
            out.append(f"- **Early stop:** {label} did not stop by itself within {runs[0]['iterations']} "
                       f"iterations (every iteration kept at least one episode; mean kept fraction "
                       f"{fmt_ms([r['mean_kept_frac'] for r in runs], digits=2)}).")
        aucs = [r["noise_auc"] for r in runs if "noise_auc" in r]
        if aucs:
            kf = mean_spread([r["kept_flipped"] for r in runs if "kept_flipped" in r])[0]
            kc = mean_spread([r["kept_clean"] for r in runs if "kept_clean" in r])[0]
            out.append(f"- **Reward noise ({100 * float(demo['reward_noise']):.0f}% flipped):** ROC AUC of the "
                       f"{label} score at ranking clean above flipped episodes = {fmt_ms(aucs, digits=3)} "
                       f"(0.5 = chance); kept {100 * kf:.0f}% of flipped vs {100 * kc:.0f}% of clean episodes.")
        p_t = mean_spread([r["sec_per_iter"] for r in ppo])[0]
        t = mean_spread([r["sec_per_iter"] for r in runs])[0]
        out.append(f"- **Cost:** {label} takes {t:.1f} s per iteration vs {p_t:.1f} s for PPO "
                   f"({t / p_t:.2f}x; wall time on a shared machine, so noisy).")
    if "ippo" in summaries and "ippo_in_update" in summaries:
        a, b = summaries["ippo"], summaries["ippo_in_update"]
        out.append(f"- **Timing (issue 7):** before_update vs in_update: final accuracy "
                   f"{fmt_ms([r['final_acc'] for r in a], pct=True)} vs {fmt_ms([r['final_acc'] for r in b], pct=True)}, "
                   f"unfaithful-correct {fmt_ms([r['final_unfaithful_correct'] for r in a], pct=True)} vs "
                   f"{fmt_ms([r['final_unfaithful_correct'] for r in b], pct=True)}, s/iter "
                   f"{fmt_ms([r['sec_per_iter'] for r in a])} vs {fmt_ms([r['sec_per_iter'] for r in b])}.")
    return out


def write_report(out: Path, demo: dict, cfg, summaries: dict[str, list[dict]], baseline: dict, plots: dict,
                 machine: dict, wall: dict[str, float], total_wall: float, n_test: int) -> str:
    rows = comparison_rows(summaries, baseline)
    table = markdown_table(TABLE_COLUMNS, rows)
    r, p, i, e = cfg.rollout, cfg.ppo, cfg.influence, cfg.eval
    settings = [
        (f"- task: bundled arithmetic word problems; {demo['train_problems']} train prompts, "
        f"{demo['val_problems']} gold validation solutions (always faithful), {demo['test_problems']} test problems "
        f"(data seed {demo['data_seed']})"),
        f"- model: bundled tiny Llama (`{Path(cfg.model.path).name}`, ~1.06M parameters, character tokenizer)",
        (f"- seeds: {', '.join(map(str, demo['seeds']))}; iterations: {cfg.iterations}; "
        f"I-PPO timing: {demo['timing']}; reward noise: {demo['reward_noise']}"),
        (f"- rollout: {r.prompts_per_iter} prompts x {r.samples_per_prompt} samples, temperature {r.temperature}, "
        f"max {r.max_new_tokens} new tokens"),
        (f"- PPO: advantage {p.advantage}, lr {p.lr:g}, {p.epochs} epoch(s), mini-batch {p.mini_batch_size}, "
        f"clip {p.clip}, KL {p.kl_coef:g} ({'reward penalty' if p.kl_in_reward else 'loss'})"),
        (f"- I-PPO: mode {i.mode}, {i.n_val} validation solutions per iteration, filter {i.filter} "
        f"(keep score > {i.threshold:g}), reweight {i.reweight}, on empty: {i.on_empty}"),
        (f"- evaluation: every {e.every} iterations and at the end, greedy answers to the test problems (every "
         f"calculator step re-checked by `ippo.tasks.faithfulness`) and {e.k} sampled answers per problem at "
         f"temperature {e.temperature} (sampled accuracy)"),
        (f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']} with "
        f"{cfg.threads or machine['torch_threads']} thread(s), Python {machine['python']}; load average at start "
        f"{machine.get('load_start')}, at end {machine.get('load_end')} (a shared machine: timings are noisy)"),
        f"- wall time: {total_wall / 60:.1f} min in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()) + ")",
    ]
    text = ["# ippo demo: PPO vs I-PPO", "",
            ("Generated by `ippo demo`. Each run starts from the same tiny model and sees the same prompts and "
            "sampling seeds; the only difference is the influence filter. *Unfaithful-correct* = the final "
            "answer is right but some `<<expr=value>>` step does not compute or the answer does not follow "
            "from the last step."), "",
            "## Settings", "", *settings, "",
            "## Results", "", table, "",
            "Rates are greedy answers on the test problems after the last iteration (final) or at the best "
            "evaluation (best). *Mean kept*: fraction of training episodes the influence filter kept. "
            + ("Values are mean ± standard deviation over seeds." if len(demo["seeds"]) > 1 else
               "One seed: run `ippo demo --seeds 0 1 2` for mean ± spread."), ""]
    ep_rows = []
    for method, runs in summaries.items():
        kept = [x["kept_by_category"] for x in runs if x.get("kept_by_category")]
        if not kept:
            continue
        n = {c: sum(x.get("n_by_category", {}).get(c, 0) for x in runs) for c in CATEGORIES}
        ep_rows.append([METHODS[method][0]] + [f"{fmt_ms([k[c] for k in kept], pct=True, digits=0)} of {n[c]}"
                                               for c in CATEGORIES])
    if ep_rows:
        text += ["### Which training episodes the filter kept", "",
                 markdown_table(["method", "faithful-correct", "unfaithful-correct", "wrong"], ep_rows), "",
                 ("Each episode logged in `influence.jsonl` re-checked step by step (correctness by the clean "
                  "answer, whatever reward it was given). Only episodes with a learning signal count: "
                  f"{sum(x.get('n_zero_score', 0) for runs in summaries.values() for x in runs)} episodes with "
                  "zero advantage (score exactly 0, e.g. all samples of a prompt rewarded alike) are always "
                  "dropped and left out here."), ""]
    aucs = {m: [x["noise_auc"] for x in runs if "noise_auc" in x] for m, runs in summaries.items()}
    aucs = {m: v for m, v in aucs.items() if v}
    if float(demo["reward_noise"]) > 0:
        text += ["### Reward noise", ""]
        if aucs:
            text += [markdown_table(["method", "ROC AUC (clean > flipped)", "kept flipped", "kept clean",
                                     "flipped episodes"],
                                    [[METHODS[m][0], fmt_ms(v, digits=3),
                                      fmt_ms([x.get("kept_flipped") for x in summaries[m]], pct=True, digits=0),
                                      fmt_ms([x.get("kept_clean") for x in summaries[m]], pct=True, digits=0),
                                      str(sum(x.get("n_flipped", 0) for x in summaries[m]))]
                                     for m, v in aucs.items()]), "",
                     (f"{100 * float(demo['reward_noise']):.0f}% of episodes had their reward flipped (chosen by a "
                     "hash of the response, the gold answer and the seed, the same for every method); they are "
                     "found afterwards by comparing the logged reward with the clean reward. AUC 0.5 = the score "
                     "does not separate them; 1.0 = every clean episode scores above every flipped one. Note: "
                     "`greedy_acc` and `mean_acc` in `eval.jsonl` use the noisy reward too; the tables use the "
                     "clean `test_acc` (greedy) and the de-noised `sampled_acc` = (mean_acc - p) / (1 - 2p)."), ""]
        else:
            text += ["No flipped episode was scored (too few episodes for this noise level).", ""]
    text += ["## What the numbers show", "", *findings(summaries, baseline, n_test, demo), ""]
    text += ["## Plots", ""]
    captions = {"test_acc": "Test accuracy (greedy)", "sampled_acc": "Test accuracy (sampled)", "unfaithful_correct_rate": "Unfaithful-correct rate",
                "kept_frac": "Kept fraction", "time_iteration": "Wall time per iteration",
                "reward": "Training reward", "scores": "Score histograms (faithful vs unfaithful vs wrong)"}
    for key, fname in plots.items():
        text += [f"### {captions.get(key, key)}", "", f"![{captions.get(key, key)}]({fname})", ""]
    text += [("Dashed vertical lines mark an early stop (training ended by itself because the filter kept no "
             "episode); none is drawn when no run stopped within the budget."), "",
             "## Files", "",
             "- `data/`: the splits; `<method>/seed<k>.yaml`: each run's config (`ippo train` on it reproduces "
             "the run; with reward noise also set " + f"`{NOISE_ENV}` and `{SALT_ENV}=seed<k>`)",
             "- `<method>/seed<k>/metrics.jsonl`, `eval.jsonl`, `influence.jsonl`: the run logs",
             "- `summary.json`: every number above", ""]
    report = "\n".join(text)
    (out / "report.md").write_text(report)
    return report


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    from ippo.config import ConfigError
    from ippo.data import DataError

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    except (ConfigError, DataError) as e:
        print(f"ippo demo: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ippo.config import ConfigError

    t_start = time.perf_counter()
    demo, base = load_settings(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not ((out / "data" / "train.jsonl").is_file() or (out / "summary.json").is_file()):
            raise ConfigError(f"--out {out} exists and is not a previous demo output: refusing to replace it")
        shutil.rmtree(out)  # a previous demo run
    out.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    machine = machine_info()
    machine["load_start"] = machine.pop("load_avg")
    paths = write_splits(out, demo)
    methods = methods_for(demo["timing"])
    seeds = [int(s) for s in demo["seeds"]]
    noise = float(demo["reward_noise"])
    cfg0 = run_config(base, paths, out / "baseline" / "run", seeds[0], "ppo")
    from ippo.data import load_jsonl

    train_gold = [ex.gold for ex in load_jsonl(paths["train"], strip_calculator=False)]
    n_test = len(load_jsonl(paths["test"], strip_calculator=False))
    n_runs = len(methods) * len(seeds)
    print(f"ippo demo: {', '.join(METHODS[m][0] for m in methods)} x seed(s) {seeds}, {cfg0.iterations} "
          f"iterations each ({cfg0.rollout.prompts_per_iter} prompts x {cfg0.rollout.samples_per_prompt} samples), "
          f"reward noise {noise}; output in {out}/", flush=True)
    wall: dict[str, float] = {}
    t = time.perf_counter()
    with reward_noise(noise, f"seed{seeds[0]}"):  # scored like the runs' evaluations (see add_sampled_acc)
        baseline = add_sampled_acc(baseline_eval(cfg0), noise)
    shutil.rmtree(out / "baseline", ignore_errors=True)
    wall["start eval"] = time.perf_counter() - t
    print(f"start: test accuracy {100 * baseline['test_acc']:.1f}%, unfaithful-correct "
          f"{100 * baseline['unfaithful_correct_rate']:.1f}% ({n_test} test problems, greedy)", flush=True)

    from ippo.trainer import train

    analyses: dict[str, list[dict]] = {m: [] for m in methods}
    summaries: dict[str, list[dict]] = {m: [] for m in methods}
    k = 0
    for seed in seeds:
        for method in methods:
            k += 1
            run_dir = out / method / f"seed{seed}"
            cfg = run_config(base, paths, run_dir, seed, method)
            print(f"[{k}/{n_runs}] {METHODS[method][0]}, seed {seed}", flush=True)
            t = time.perf_counter()
            with reward_noise(noise, f"seed{seed}"):
                res = train(cfg)
            wall[f"{method}/seed{seed}"] = time.perf_counter() - t
            a = analyse_run(run_dir, train_gold, noise, f"seed{seed}")
            s = run_summary(a, baseline, cfg.iterations)
            s["wall_s"] = wall[f"{method}/seed{seed}"]
            s["stopped"] = res.get("stopped")
            analyses[method].append(a)
            summaries[method].append(s)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the demo never resumes
            print(f"    test accuracy {100 * s['final_acc']:.1f}%, unfaithful-correct "
                  f"{100 * s['final_unfaithful_correct']:.1f}%, kept {s['mean_kept_frac']:.2f}, "
                  f"{s['sec_per_iter']:.1f} s/iteration", flush=True)

    plots = make_plots(out, analyses, baseline, cfg0.iterations)
    machine["load_end"] = machine_info()["load_avg"]
    total = time.perf_counter() - t_start
    write_report(out, demo, cfg0, summaries, baseline, plots, machine, wall, total, n_test)
    notes = findings(summaries, baseline, n_test, demo)
    (out / "summary.json").write_text(json.dumps(
        {"demo": demo, "baseline": baseline, "runs": summaries, "machine": machine, "wall_s": wall,
         "total_wall_s": total}, indent=1, default=str))
    header = TABLE_COLUMNS
    print()
    print(text_table(header, comparison_rows(summaries, baseline)))
    print(f"\n{n_test} test problems, seeds {seeds}, {cfg0.iterations} iterations; {total / 60:.1f} min.\n")
    for line in notes:
        print(line.replace("**", ""))
    print(f"\nReport and plots: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
