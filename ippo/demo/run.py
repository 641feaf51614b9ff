"""``ippo demo``: PPO vs I-PPO vs controls on the bundled arithmetic task, measured, in minutes on a CPU.

What it does (``ippo demo --help`` for the options):

1. writes the task's splits as JSONL under ``OUT/data`` with the task spec the bundled model was trained
   on: train prompts, validation = gold solutions (always faithful: the I-PPO validation gradient), test
   problems (500 by default: one accuracy has a standard error of at most 2.2 points);
2. evaluates the bundled tiny model once (greedy, iteration 0, the same for every run);
3. trains every method from that model on the same prompts and sampling seeds, one ``ippo train``
   process per (method, seed), ``--jobs`` at a time: PPO, I-PPO and two controls that drop episodes
   without influence -- a random filter that keeps, in each iteration, as many episodes as I-PPO did
   (with I-PPO's weights in random order), and the zero-variance (DAPO) filter. ``--ablations`` adds
   I-PPO without reweighting and its random match; ``--timing`` adds I-PPO scored inside the update;
4. re-checks every logged training episode with ``ippo.tasks.faithfulness`` (faithful-correct,
   unfaithful-correct, wrong) and, with ``--reward-noise p``, finds the episodes whose reward was flipped;
5. writes ``OUT/report.md`` (``ippo.demo.report``), PNG plots and ``OUT/summary.json``, and prints the
   comparison table: every accuracy with its standard error, differences paired over seeds.

Why: the paper claims I-PPO beats PPO, filters unfaithful chains of thought ("right answer, flawed
logic") and stops by itself; here every reasoning step is checkable, so those claims become numbers,
and the controls say how much of any difference is the influence and how much is merely dropping
episodes. The report states them whichever way they come out.

The package splits by job: ``task.py`` (the reward with recorded noise, episode categories), ``methods.py``
(the arms), this module (settings, splits, processes), ``report.py`` (analysis, tables, plots, words),
``stats.py`` (standard errors, t-test, ROC AUC); imports go one way, run -> report -> methods, task, stats.

Settings live in ``configs/demo.yaml`` (a training config plus a ``demo:`` section); ``key=value``
arguments override either part (``ppo.lr=3e-4``, ``demo.test_problems=300``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ippo.demo import report as demo_report
from ippo.demo.methods import METHODS, methods_for
from ippo.demo.task import NOISE_ENV, SALT_ENV, add_sampled_acc

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
TINY_ARITH = ("ippo/assets/tiny_arith", "builtin:tiny-arith")  # model.path values meaning the bundled model
TIMINGS = ("before_update", "in_update", "both")
# The demo's own settings (configs/demo.yaml is a plain training config; a `demo:` section there or
# demo.KEY=VALUE arguments override these).
DEMO_DEFAULTS: dict[str, Any] = {"train_problems": 4000, "val_problems": 200, "test_problems": 500,
                                 "data_seed": 0, "seeds": [0, 1], "timing": "before_update", "reward_noise": 0.0,
                                 "controls": True, "ablations": False, "jobs": 0}


# ---------------------------------------------------------------------------------------------
# settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ippo demo",
        description="PPO vs I-PPO vs control filters on the bundled arithmetic task and tiny model (CPU, no "
                    "downloads): accuracy with standard errors, unfaithful-correct rate, kept fraction, time, "
                    "score histograms -> OUT/report.md.")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml (dotted keys, "
                   "e.g. ppo.lr=3e-4 demo.test_problems=300)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (several: mean ± s.e.)")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations per run")
    p.add_argument("--reward-noise", type=float, default=None, metavar="P",
                   help="flip the reward of a fraction P of episodes (recorded); the report gives the ROC AUC "
                        "of the influence score at separating them")
    p.add_argument("--timing", choices=TIMINGS, default=None,
                   help="I-PPO scoring: before the update (the paper), inside the update's backward, or both")
    p.add_argument("--no-controls", action="store_true",
                   help="PPO and I-PPO only (no random-filter and zero-variance control runs)")
    p.add_argument("--ablations", action="store_true",
                   help="also I-PPO without reweighting and its matched random filter with weight 1")
    p.add_argument("--jobs", type=int, default=None,
                   help="training processes at a time (default: the number of CPUs, at most 8)")
    p.add_argument("--out", default="runs/demo", help="output directory (a previous demo output there is replaced)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config (default: configs/demo.yaml)")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """(demo settings, training-config dict) from the YAML file, key=value overrides and the flags."""
    from ippo.rl.config import ConfigError, merge, parse_overrides

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"demo config not found: {path} (run from a checkout that has configs/demo.yaml, "
                          "or pass --config)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = merge(data, parse_overrides(args.overrides))
    demo = dict(DEMO_DEFAULTS)
    extra = data.pop("demo", None) or {}
    unknown = sorted(set(extra) - set(DEMO_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown demo key(s): {', '.join('demo.' + k for k in unknown)}")
    demo.update(extra)
    for key, flag in (("seeds", args.seeds), ("timing", args.timing), ("reward_noise", args.reward_noise),
                      ("jobs", args.jobs)):
        if flag is not None:
            demo[key] = flag
    if args.no_controls:
        demo["controls"] = False
    if args.ablations:
        demo["ablations"] = True
    if args.iterations is not None:
        data["iterations"] = args.iterations
    if isinstance(demo["seeds"], int):
        demo["seeds"] = [demo["seeds"]]
    if not demo["seeds"] or len(set(demo["seeds"])) != len(demo["seeds"]):
        raise ConfigError(f"demo.seeds={demo['seeds']}: give one or more distinct seeds")
    if demo["timing"] not in TIMINGS:
        raise ConfigError(f"demo.timing={demo['timing']!r}: expected one of {' | '.join(TIMINGS)}")
    if not 0 <= float(demo["reward_noise"]) < 0.5:
        raise ConfigError(f"--reward-noise={demo['reward_noise']}: must be in [0, 0.5)")
    for k in ("train_problems", "val_problems", "test_problems"):
        if int(demo[k]) <= 0:
            raise ConfigError(f"demo.{k}={demo[k]}: must be > 0")
    if int(demo["jobs"]) < 0:
        raise ConfigError(f"--jobs={demo['jobs']}: must be >= 1 (0 = the number of CPUs)")
    for k in ("controls", "ablations"):
        if not isinstance(demo[k], bool):
            raise ConfigError(f"demo.{k}={demo[k]!r}: expected true/false")
    if data.get("model", {}).get("path", TINY_ARITH[0]) in TINY_ARITH:
        from ippo.tasks import TINY_MODEL_DIR

        data.setdefault("model", {})["path"] = str(TINY_MODEL_DIR)
    return demo, data


def write_splits(out: Path, demo: dict, spec=None) -> dict[str, Path]:
    """Train prompts, validation gold solutions, test problems as question/answer JSONL."""
    from ippo.tasks import arithmetic

    spec = spec or arithmetic.DEFAULT_SPEC
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, key in (("train", "train_problems"), ("validation", "val_problems"), ("test", "test_problems")):
        paths[split] = (d / f"{split}.jsonl").resolve()
        with paths[split].open("w", encoding="utf-8") as f:
            for prob in arithmetic.generate(split, int(demo[key]), int(demo["data_seed"]), spec):
                f.write(json.dumps({"question": prob.question, "answer": prob.solution}) + "\n")
    return paths


def write_run_config(base: dict, paths: dict[str, Path], run_dir: Path, seed: int, method: str,
                     out: Path) -> Path:
    """The config of one run as ``run_dir.yaml`` (``ippo train`` on it reproduces the run); absolute paths."""
    from ippo.rl.config import load_config, merge

    m = METHODS[method]
    overrides = json.loads(json.dumps(m.overrides))  # a copy
    if m.matches:
        overrides["control"]["match_run"] = str((out / m.matches / f"seed{seed}").resolve())
    data = merge(base, {"run_dir": str(run_dir.resolve()), "seed": seed,
                         "data": {"train_path": str(paths["train"]), "val_path": str(paths["validation"]),
                                  "test_path": str(paths["test"])}})
    data = merge(data, overrides)
    data.setdefault("log", {})["progress"] = False
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_config(path)  # a bad override fails here, before any process starts
    return path


# ---------------------------------------------------------------------------------------------
# running: one `ippo train` process per (method, seed), a few at a time


@dataclass
class Job:
    name: str  # "<method>/seed<k>" or "baseline"
    args: list[str]  # after `python -m ippo.cli`
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)  # jobs that must have finished first
    start: float = 0.0
    wall: float = 0.0
    proc: Any = None


class JobFailed(RuntimeError):
    pass


def run_jobs(jobs: list[Job], parallel: int, on_done=None) -> None:
    """Run the jobs, at most ``parallel`` at once, each after its ``after`` jobs; raise on a failure
    (after stopping the others) with the tail of the failed job's log."""
    pending, running, done = list(jobs), [], set()
    try:
        while pending or running:
            for job in [j for j in pending if set(j.after) <= done][: max(0, parallel - len(running))]:
                pending.remove(job)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                env = {**os.environ, **job.env, "PYTHONUNBUFFERED": "1"}
                job.start = time.perf_counter()
                with job.log.open("w") as log:
                    job.proc = subprocess.Popen([sys.executable, "-m", "ippo.cli", *job.args], stdout=log,
                                                stderr=subprocess.STDOUT, env=env)
                running.append(job)
            if pending and not running:
                raise JobFailed(f"jobs {[j.name for j in pending]} wait on jobs that never ran")
            time.sleep(0.2)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                job.wall = time.perf_counter() - job.start
                if job.proc.returncode != 0:
                    tail = "\n".join(job.log.read_text(errors="replace").splitlines()[-15:])
                    raise JobFailed(f"{job.name} failed (exit {job.proc.returncode}); log {job.log}:\n{tail}")
                done.add(job.name)
                if on_done:
                    on_done(job)
    finally:
        for job in running:
            with contextlib.suppress(ProcessLookupError):
                job.proc.kill()
                job.proc.wait()


def _quiet_transformers() -> None:
    with contextlib.suppress(Exception):  # cosmetics only
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _last_json(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                return obj
    raise JobFailed(f"no JSON result in {log}")


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    from ippo.rl.config import ConfigError
    from ippo.rl.data import DataError

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    except (ConfigError, DataError, JobFailed) as e:
        print(f"ippo demo: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ippo.rl.config import ConfigError
    from ippo.rl.data import load_jsonl

    t_start = time.perf_counter()
    demo, base = load_settings(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not ((out / "data" / "train.jsonl").is_file() or (out / "summary.json").is_file()):
            raise ConfigError(f"--out {out} exists and is not a previous demo output: refusing to replace it")
        shutil.rmtree(out)  # a previous demo run
    out.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    machine = demo_report.machine_info()
    machine["load_start"] = machine.pop("load_avg")
    from ippo.tasks import model_task_spec

    spec = model_task_spec(base["model"]["path"])
    paths = write_splits(out, demo, spec)
    methods = methods_for(demo["timing"], demo["controls"], demo["ablations"])
    seeds = [int(s) for s in demo["seeds"]]
    noise = float(demo["reward_noise"])
    parallel = int(demo["jobs"]) or max(1, min(os.cpu_count() or 1, 8))
    base_cfg = write_run_config(base, paths, out / "baseline" / "run", seeds[0], "ppo", out)
    train_gold = [ex.gold for ex in load_jsonl(paths["train"], strip_calculator=False)]
    n_test = len(load_jsonl(paths["test"], strip_calculator=False))
    cfg0 = yaml.safe_load(base_cfg.read_text())
    print(f"ippo demo: {', '.join(METHODS[m].label for m in methods)} x seed(s) {seeds}, {cfg0['iterations']} "
          f"iterations each ({cfg0['rollout']['prompts_per_iter']} prompts x {cfg0['rollout']['samples_per_prompt']} "
          f"samples), {n_test} test problems, reward noise {noise}, {parallel} process(es) at a time; "
          f"output in {out}/", flush=True)

    def noise_env(seed: int) -> dict[str, str]:
        return {NOISE_ENV: repr(noise), SALT_ENV: f"seed{seed}"}

    jobs = [Job("baseline", ["eval", str(base_cfg)], out / "baseline" / "eval.log", noise_env(seeds[0]))]
    for seed in seeds:  # seed-major: a partial run still pairs every method on the first seeds
        for method in methods:
            run_dir = out / method / f"seed{seed}"
            cfg_path = write_run_config(base, paths, run_dir, seed, method, out)
            after = [f"{METHODS[method].matches}/seed{seed}"] if METHODS[method].matches else []
            jobs.append(Job(f"{method}/seed{seed}", ["train", str(cfg_path)], run_dir.parent / f"seed{seed}.log",
                            noise_env(seed), after))
    n_done = [0]

    def report_progress(job: Job) -> None:
        n_done[0] += 1
        msg = f"[{n_done[0]}/{len(jobs)}] {job.name} done in {job.wall:.0f} s"
        if job.name == "baseline":
            ev = _last_json(job.log)
            msg += f": start model test accuracy {100 * ev.get('test_acc', ev['greedy_acc']):.1f}%"
        else:
            evals = demo_report.read_jsonl(out / job.name / "eval.jsonl")
            if evals and "test_acc" in evals[-1]:
                msg += f": final test accuracy {100 * evals[-1]['test_acc']:.1f}%"
        print(msg, flush=True)

    run_jobs(jobs, parallel, report_progress)
    baseline = add_sampled_acc(_last_json(jobs[0].log), noise)
    if "test_acc" not in baseline:
        raise JobFailed(f"the start model's evaluation ({jobs[0].log}) has no test_acc: is "
                        "eval.response_metrics=ippo.demo:faithfulness_metrics set?")
    shutil.rmtree(out / "baseline" / "run", ignore_errors=True)
    wall = {j.name: j.wall for j in jobs}

    analyses: dict[str, list[dict]] = {m: [] for m in methods}
    summaries: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            run_dir = out / method / f"seed{seed}"
            a = demo_report.analyse_run(run_dir, train_gold, noise, seed)
            s = demo_report.run_summary(a, baseline, int(cfg0["iterations"]), n_test)
            s["seed"], s["wall_s"] = seed, wall[f"{method}/seed{seed}"]
            analyses[method].append(a)
            summaries[method].append(s)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the demo never resumes
    demo_report.add_paired_metrics(summaries, analyses, baseline)

    machine["load_end"] = demo_report.machine_info()["load_avg"]
    plots = demo_report.make_plots(out, analyses, baseline)
    total = time.perf_counter() - t_start
    aggregates = demo_report.aggregate(summaries, baseline, n_test)
    notes = demo_report.findings(summaries, aggregates, baseline, n_test, demo)
    demo_report.write_report(out, demo, cfg0, summaries, aggregates, baseline, plots, machine, wall, total, n_test,
                             notes, spec.to_dict(), parallel)
    (out / "summary.json").write_text(json.dumps(
        {"demo": demo, "task_spec": spec.to_dict(), "baseline": baseline, "n_test": n_test, "runs": summaries,
         "aggregates": aggregates, "machine": machine, "wall_s": wall, "parallel_jobs": parallel,
         "total_wall_s": total}, indent=1, default=str))
    print()
    print(demo_report.text_table(demo_report.ACC_COLUMNS, demo_report.comparison_rows(aggregates, baseline)))
    print()
    print(demo_report.text_table(demo_report.BEHAVIOUR_COLUMNS, demo_report.behaviour_rows(aggregates, baseline)))
    print(f"\n{n_test} test problems, seeds {seeds}, {cfg0['iterations']} iterations; {total / 60:.1f} min.\n")
    for line in notes:
        print(line.replace("**", ""))
    print(f"\nReport and plots: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
