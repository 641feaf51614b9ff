"""Where would ``influence.stop_kept_frac`` / ``stop_patience`` stop a long run, and what would it cost?

    ippo demo --seeds 0 1 2 --iterations 40 --no-controls --timing in_update eval.every=4 --out runs/long40
    python scripts/early_stop_analysis.py runs/long40 --out docs/demo/early_stop

The rule is a pure function of the logged kept fractions (the stop only ends a run early; everything before it is
the same run, which tests/rl/test_early_stop.py checks), so every (f, k) is evaluated on the same runs: where it
stops each seed, the I-PPO test accuracy at the last evaluation at or before the stop, PPO's best accuracy within
the same number of iterations, I-PPO's best over the whole run, and the share of the run's training seconds it
saves. Writes summary.json and a plot of the kept fractions (threshold and stops marked) and accuracies.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FRACTIONS = (0.3, 0.4, 0.5, 0.6)
PATIENCES = (2, 3, 5)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def stop_iteration(kept: list[float], f: float, k: int) -> int | None:
    """The 0-based iteration whose kept fraction completes k in a row below f (it still trains), or None."""
    streak = 0
    for it, frac in enumerate(kept):
        streak = streak + 1 if frac < f else 0
        if streak >= k:
            return it
    return None


def acc_at(evals: list[dict], done: int) -> float:
    """Test accuracy of the last evaluation after at most ``done`` iterations."""
    prior = [e["test_acc"] for e in evals if e["iteration"] + 1 <= done]
    return prior[-1] if prior else float("nan")


def analyse(root: Path, method: str) -> dict:
    seeds = sorted(int(p.name[4:]) for p in (root / method).glob("seed*") if p.is_dir())
    runs = {}
    for s in seeds:
        m, e = _jsonl(root / method / f"seed{s}" / "metrics.jsonl"), _jsonl(root / method / f"seed{s}" / "eval.jsonl")
        p_e = _jsonl(root / "ppo" / f"seed{s}" / "eval.jsonl")
        runs[s] = {"kept": [r["kept_frac"] for r in m], "seconds": [r["time_cumulative"] for r in m], "evals": e,
                   "ppo_evals": p_e}
    rules = []
    for f in FRACTIONS:
        for k in PATIENCES:
            per_seed = []
            for s, r in runs.items():
                n = len(r["kept"])
                stop = stop_iteration(r["kept"], f, k)
                done = n if stop is None else stop + 1
                per_seed.append({
                    "seed": s, "stop_iteration": stop, "iterations_run": done,
                    "acc_at_stop": acc_at(r["evals"], done), "ippo_best": max(e["test_acc"] for e in r["evals"]),
                    "ippo_final": r["evals"][-1]["test_acc"],
                    "ppo_best_within": max((e["test_acc"] for e in r["ppo_evals"] if e["iteration"] + 1 <= done),
                                           default=float("nan")),
                    "ppo_final": r["ppo_evals"][-1]["test_acc"],
                    "seconds_saved_frac": 1 - r["seconds"][done - 1] / r["seconds"][-1]})
            rules.append({"stop_kept_frac": f, "stop_patience": k, "seeds": per_seed,
                          "stopped": sum(p["stop_iteration"] is not None for p in per_seed),
                          "mean_iterations_run": statistics.fmean(p["iterations_run"] for p in per_seed),
                          "mean_acc_at_stop": statistics.fmean(p["acc_at_stop"] for p in per_seed),
                          "mean_ippo_best": statistics.fmean(p["ippo_best"] for p in per_seed),
                          "mean_ippo_final": statistics.fmean(p["ippo_final"] for p in per_seed),
                          "mean_ppo_best_within": statistics.fmean(p["ppo_best_within"] for p in per_seed),
                          "mean_seconds_saved": statistics.fmean(p["seconds_saved_frac"] for p in per_seed)})
    return {"method": method, "seeds": seeds, "kept": {s: r["kept"] for s, r in runs.items()}, "rules": rules}


def plot(result: dict, root: Path, out: Path, rule: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for s, kept in result["kept"].items():
        line, = a1.plot(range(1, len(kept) + 1), kept, lw=1, label=f"seed {s}")
        stop = next(p["stop_iteration"] for p in rule["seeds"] if p["seed"] == s)
        if stop is not None:
            a1.axvline(stop + 1, color=line.get_color(), ls=":", lw=1)
        ev = _jsonl(root / result["method"] / f"seed{s}" / "eval.jsonl")
        a2.plot([e["iteration"] + 1 for e in ev], [100 * e["test_acc"] for e in ev], color=line.get_color(),
                marker="o", ms=3, label=f"I-PPO seed {s}")
        pe = _jsonl(root / "ppo" / f"seed{s}" / "eval.jsonl")
        a2.plot([e["iteration"] + 1 for e in pe], [100 * e["test_acc"] for e in pe], color=line.get_color(),
                ls="--", lw=0.8, label=f"PPO seed {s}")
        if stop is not None:
            a2.axvline(stop + 1, color=line.get_color(), ls=":", lw=1)
    a1.axhline(rule["stop_kept_frac"], color="k", lw=0.8)
    a1.set(title=f"I-PPO kept fraction; dotted: stop at f={rule['stop_kept_frac']}, k={rule['stop_patience']}",
           xlabel="iteration", ylabel="kept fraction")
    a2.set(title="test accuracy (greedy); dotted: the stop", xlabel="iterations done", ylabel="%")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "early_stop.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--method", default="ippo_in_update")
    p.add_argument("--out", type=Path, default=Path("docs/demo/early_stop"))
    p.add_argument("--choose", nargs=2, type=float, metavar=("F", "K"), default=None,
                   help="the rule to plot (default: the one that saves most, stopping every seed within 0.5 pt of the final)")
    a = p.parse_args(argv)
    result = analyse(a.root, a.method)
    # Judged against running on to the end (the final evaluation), not against the best evaluation: the maximum of
    # ten noisy evaluations is biased upwards, and what a stop costs is what the rest of the run would have added.
    ok = [r for r in result["rules"]
          if r["mean_acc_at_stop"] >= r["mean_ippo_final"] - 0.005 and r["stopped"] == len(r["seeds"])]
    if a.choose:
        rule = next(r for r in result["rules"] if (r["stop_kept_frac"], r["stop_patience"]) == tuple(a.choose))
    else:
        rule = max(ok, key=lambda r: r["mean_seconds_saved"]) if ok else result["rules"][0]
    result["chosen"] = {"stop_kept_frac": rule["stop_kept_frac"], "stop_patience": rule["stop_patience"],
                        "why": "saves the most training time among the rules that stop every seed with an accuracy at the "
                               "stop within 0.5 points of I-PPO's final accuracy after the whole run (means over seeds)"}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(result, indent=1))
    plot(result, a.root, a.out, rule)
    print(f"{'f':>4} {'k':>2} stopped  its  acc@stop  ippo final  ippo best  ppo best within  saved")
    for r in result["rules"]:
        print(f"{r['stop_kept_frac']:>4} {r['stop_patience']:>2} {r['stopped']}/{len(r['seeds'])}  "
              f"{r['mean_iterations_run']:>5.1f}  {100 * r['mean_acc_at_stop']:>7.1f}  {100 * r['mean_ippo_final']:>9.1f}  {100 * r['mean_ippo_best']:>8.1f}"
              f"  {100 * r['mean_ppo_best_within']:>14.1f}  {100 * r['mean_seconds_saved']:>4.0f}%")
    print(f"chosen: f={rule['stop_kept_frac']}, k={rule['stop_patience']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
