"""When does I-PPO help? One table over the regimes of ``ippo demo --gold-comparison`` (issue 25).

    ippo demo --gold-comparison --seeds 0 1 2 --out runs/regimes/clean
    ippo demo --gold-comparison --seeds 0 1 2 --reward-noise 0.2 --out runs/regimes/noise0.2
    ...                                                     (every regime's command: REGIMES below, README)
    python scripts/regimes_table.py runs/regimes --out docs/regimes

Reads each regime's ``summary.json`` (the demo report's per-seed results), and writes:
  OUT/summary.json   per regime and method: learning-curve mean, final accuracy, seconds per iteration, seconds to
                     PPO's final accuracy, and the paired differences (over seeds) against PPO + SFT and PPO with
                     their t statistics and the two-sided 95% verdict;
  OUT/table.md       the README's table;
  OUT/regimes.png    curve mean and final accuracy per regime and method (mean ± s.e. over seeds);
  OUT/<regime>/      the regime's report.md and accuracy plot, as the demo wrote them.
A regime whose folder is missing is left out (and named on stdout), never filled in.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

from ippo.demo.stats import mean_se, paired_difference, t_critical_95

# (folder, label, the ippo demo flags that make it): the order of the README's table
REGIMES = [
    ("clean", "clean (200 gold solutions)", ""),
    ("noise0.1", "reward noise 0.1", "--reward-noise 0.1"),
    ("noise0.2", "reward noise 0.2", "--reward-noise 0.2"),
    ("noise0.3", "reward noise 0.3", "--reward-noise 0.3"),
    ("hackable", "hackable reward", "--hackable-reward"),
    ("scarce32", "scarce gold data: 32", "demo.val_problems=32"),
    ("scarce8", "scarce gold data: 8", "demo.val_problems=8"),
    ("shift_two_step", "shifted gold data: 2-step only", "--val-shift two_step"),
]
KEPT_PLOTS = ("accuracy.png", "accuracy_vs_seconds.png", "train_reward.png", "kept_fraction.png")
METHODS = [("ppo", "PPO"), ("ppo_sft", "PPO + SFT"), ("ippo_in_update", "I-PPO"), ("ippo_sft", "I-PPO + SFT")]


def _test(diff: tuple[float, float, int]) -> dict:
    mean, se, n = diff
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    crit = t_critical_95(n - 1) if n >= 2 else float("inf")
    return {"mean": mean, "se": se, "n": n, "t": t, "t_crit": crit, "real": n >= 3 and abs(t) > crit}


def regime_rows(summary: dict) -> dict:
    runs = summary["runs"]
    out = {}
    for m, _ in METHODS:
        if m not in runs:
            continue
        by_seed = {r["seed"]: r for r in runs[m]}
        reached = [r["seconds_to_ppo_final"] for r in runs[m] if r.get("seconds_to_ppo_final") is not None]
        row = {
            "seeds": sorted(by_seed),
            "curve_mean_acc": list(mean_se([r["curve_mean_acc"] for r in runs[m]])),
            "final_acc": list(mean_se([r["final_acc"] for r in runs[m]])),
            "sec_per_iter": list(mean_se([r["sec_per_iter"] for r in runs[m]])),
            "seconds_to_ppo_final": list(mean_se(reached)) if reached else None,
            "reached_ppo_final": f"{len(reached)}/{len(runs[m])}",
            "mean_kept_frac": list(mean_se([r["mean_kept_frac"] for r in runs[m]])),
            "vs": {},
        }
        for r_key in ("unearned_reward_last", "kept_flipped", "kept_clean", "final_unfaithful_correct"):
            vals = [r.get(r_key) for r in runs[m] if r.get(r_key) is not None]
            if vals:
                row[r_key] = list(mean_se(vals))
        for other in ("ppo_sft", "ppo"):
            if other == m or other not in runs:
                continue
            other_by_seed = {r["seed"]: r for r in runs[other]}
            common = [s for s in sorted(by_seed) if s in other_by_seed]
            row["vs"][other] = {
                key: _test(paired_difference([by_seed[s][key] for s in common], [other_by_seed[s][key] for s in common]))
                for key in ("curve_mean_acc", "final_acc")
            }
        out[m] = row
    return out


def _pm(ms: list | None, scale: float = 100.0, digits: int = 1) -> str:
    if not ms:
        return "–"
    return f"{scale * ms[0]:.{digits}f} ± {scale * ms[1]:.{digits}f}"


def _diff(test: dict | None) -> str:
    if not test:
        return ""
    text = f"{100 * test['mean']:+.1f} ± {100 * test['se']:.1f} (t = {test['t']:.1f})"
    return f"**{text}**" if test["real"] else text


def table(result: dict) -> str:
    head = ("| regime | method | curve mean % | final % | s / iter | s to PPO's final (reached) | "
            "Δ curve vs PPO | Δ curve vs PPO + SFT | Δ final vs PPO + SFT |")
    lines = [head, "|" + "---|" * 9]
    for name, label, _ in REGIMES:
        if name not in result:
            continue
        for m, m_label in METHODS:
            row = result[name]["methods"].get(m)
            if row is None:
                continue
            reach = row["seconds_to_ppo_final"]
            reach_text = f"{reach[0]:.0f} ({row['reached_ppo_final']})" if reach else f"– ({row['reached_ppo_final']})"
            vs, vs_ppo = row["vs"].get("ppo_sft", {}), row["vs"].get("ppo", {})
            lines.append(f"| {label if m == 'ppo' else ''} | {m_label} | {_pm(row['curve_mean_acc'])} | "
                         f"{_pm(row['final_acc'])} | {row['sec_per_iter'][0]:.1f} | {reach_text} | "
                         f"{_diff(vs_ppo.get('curve_mean_acc'))} | "
                         f"{_diff(vs.get('curve_mean_acc'))} | {_diff(vs.get('final_acc'))} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [(n, lab) for n, lab, _ in REGIMES if n in result]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(METHODS)
    for ax, key, title in ((axes[0], "curve_mean_acc", "learning-curve mean (how fast)"),
                           (axes[1], "final_acc", "final test accuracy")):
        for j, (m, m_label) in enumerate(METHODS):
            xs, ys, es = [], [], []
            for i, (n, _) in enumerate(names):
                row = result[n]["methods"].get(m)
                if row:
                    xs.append(i + (j - (len(METHODS) - 1) / 2) * width)
                    ys.append(100 * row[key][0])
                    es.append(100 * row[key][1])
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=m_label)
        ax.set_xticks(range(len(names)), [lab for _, lab in names], rotation=25, ha="right", fontsize=8)
        ax.set(title=title + " (mean ± s.e. over seeds)", ylabel="% (true checker)")
        lo = min(100 * r[key][0] for n, _ in names for r in result[n]["methods"].values())
        ax.set_ylim(max(0, lo - 8), 100)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "regimes.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the folder holding one ippo demo --gold-comparison output per regime")
    p.add_argument("--out", type=Path, default=Path("docs/regimes"))
    a = p.parse_args(argv)
    result = {}
    for name, label, flags in REGIMES:
        path = a.root / name / "summary.json"
        if not path.is_file():
            print(f"  {name}: no {path}, left out")
            continue
        summary = json.loads(path.read_text())
        result[name] = {"label": label, "command": f"ippo demo --gold-comparison --seeds 0 1 2 {flags}".strip(),
                        "demo": summary["demo"], "baseline_acc": summary["baseline"]["test_acc"],
                        "n_test": summary["n_test"], "machine": summary.get("machine"),
                        "methods": regime_rows(summary)}
        dest = a.out / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in KEPT_PLOTS:
            if (a.root / name / f).is_file():
                shutil.copyfile(a.root / name / f, dest / f)
        if (a.root / name / "report.md").is_file():
            # the other plots stay in the run folder (docs/ keeps four per regime): say so instead of a broken link
            report = re.sub(r"!\[[^\]]*\]\(([\w.-]+\.png)\)",
                            lambda mt: mt.group(0) if mt.group(1) in KEPT_PLOTS
                            else f"*({mt.group(1)}: not kept in docs/, `ippo demo` writes it)*",
                            (a.root / name / "report.md").read_text())
            (dest / "report.md").write_text(report)
    if not result:
        raise SystemExit(f"regimes_table: no regime summaries under {a.root}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(result, indent=1))
    (a.out / "table.md").write_text(table(result))
    plot(result, a.out)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
