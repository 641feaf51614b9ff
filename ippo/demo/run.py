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
   comparison table: every accuracy with its standard error, differences paired over seeds;
6. writes ``OUT/inspect.html`` (``ippo inspect``) for the first seed's first I-PPO run: its last iteration's
   top proponents and opponents with every token coloured by its influence (that run keeps the checkpoint that
   was the iteration's theta_old), then deletes every run's checkpoints.

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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ippo.demo import report as demo_report
from ippo.demo.methods import SWEEP_SEP, influence_method, method, methods_for, sft_coef_of
from ippo.demo.task import NOISE_ENV, SALT_ENV, add_sampled_acc

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
TINY_ARITH = ("ippo/assets/tiny_arith", "builtin:tiny-arith")  # model.path values meaning the bundled model
TIMINGS = ("before_update", "in_update", "both")
# The demo's own settings (configs/demo.yaml is a plain training config; a `demo:` section there or
# demo.KEY=VALUE arguments override these).
DEMO_DEFAULTS: dict[str, Any] = {"train_problems": 4000, "val_problems": 200, "test_problems": 500,
                                 "dev_problems": 500, "data_seed": 0, "seeds": [0, 1], "timing": "in_update",
                                 "reward_noise": 0.0, "controls": True, "ablations": False, "jobs": 0,
                                 "sft_coef": 3.0, "sft_sweep": [],  # sft_coef: chosen on the dev split (docs/demo/sft_sweep)
                                 "gold_comparison": False, "hackable_reward": False, "val_shift": ""}
VAL_SHIFTS = ("", "two_step")  # gold solutions from another slice of the task than the training prompts


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
    p.add_argument("--sft-sweep", type=float, nargs="+", default=None, metavar="LAMBDA",
                   help="choose the gold-data control's λ: PPO + λ x SFT for each λ (and PPO), evaluated on a "
                        "held-out dev split (not the test split); the report names the best λ")
    p.add_argument("--gold-comparison", action="store_true",
                   help="PPO, PPO + SFT, I-PPO and I-PPO + SFT only: where does selection beat training on the gold "
                        "data? (with --reward-noise, --hackable-reward, demo.val_problems=8, --val-shift)")
    p.add_argument("--hackable-reward", action="store_true",
                   help="train on a reward with a known exploit (credit for the gold number anywhere in the "
                        "response); accuracy is still measured by the true checker")
    p.add_argument("--val-shift", choices=VAL_SHIFTS[1:], default=None,
                   help="gold validation solutions from another slice than the training prompts: two_step = only "
                        "2-step problems (training prompts have 2-4 steps)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo's output in --out")
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
                      ("jobs", args.jobs), ("sft_sweep", args.sft_sweep), ("val_shift", args.val_shift)):
        if flag is not None:
            demo[key] = flag
    if args.no_controls:
        demo["controls"] = False
    if args.ablations:
        demo["ablations"] = True
    if args.gold_comparison:
        demo["gold_comparison"] = True
    if args.hackable_reward:
        demo["hackable_reward"] = True
    if args.iterations is not None:
        data["iterations"] = args.iterations
    check_demo_settings(demo)
    if demo["hackable_reward"]:
        data.setdefault("reward", {})["fn"] = "ippo.demo.task:hackable_reward"
    if data.get("model", {}).get("path", TINY_ARITH[0]) in TINY_ARITH:
        from ippo.tasks import TINY_MODEL_DIR

        data.setdefault("model", {})["path"] = str(TINY_MODEL_DIR)
    return demo, data


def _int(demo: dict, key: str, minimum: int) -> int:
    from ippo.rl.config import ConfigError

    v = demo[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"demo.{key}={v!r}: expected an integer >= {minimum}")
    return v


def _number(demo: dict, key: str, low: float, high: float) -> float:
    from ippo.rl.config import ConfigError

    v = demo[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < high:
        raise ConfigError(f"demo.{key}={v!r}: expected a number in [{low}, {high})")
    return float(v)


def check_demo_settings(demo: dict) -> None:
    """Every demo setting, checked before anything is written (one line per problem, naming the key)."""
    from ippo.rl.config import ConfigError

    if isinstance(demo["seeds"], int) and not isinstance(demo["seeds"], bool):
        demo["seeds"] = [demo["seeds"]]
    seeds = demo["seeds"]
    if (not isinstance(seeds, list) or not seeds or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"demo.seeds={seeds!r}: give one or more distinct integer seeds")
    if demo["timing"] not in TIMINGS:
        raise ConfigError(f"demo.timing={demo['timing']!r}: expected one of {' | '.join(TIMINGS)}")
    _number(demo, "reward_noise", 0.0, 0.5)
    for k in ("train_problems", "val_problems", "test_problems", "dev_problems"):
        _int(demo, k, 1)
    _int(demo, "data_seed", 0)
    _int(demo, "jobs", 0)
    _number(demo, "sft_coef", 0.0, float("inf"))
    sweep = demo["sft_sweep"]
    if not isinstance(sweep, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0
                                          for x in sweep) or len(set(sweep)) != len(sweep):
        raise ConfigError(f"demo.sft_sweep={sweep!r}: expected distinct numbers > 0 (the λ values to compare)")
    for k in ("controls", "ablations", "gold_comparison", "hackable_reward"):
        if not isinstance(demo[k], bool):
            raise ConfigError(f"demo.{k}={demo[k]!r}: expected true/false")
    if demo["val_shift"] not in VAL_SHIFTS:
        raise ConfigError(f"demo.val_shift={demo['val_shift']!r}: expected one of {' | '.join(VAL_SHIFTS[1:])} (or '')")


def write_splits(out: Path, demo: dict, spec=None) -> dict[str, Path]:
    """Train prompts, validation gold solutions, test problems as question/answer JSONL."""
    from ippo.tasks import arithmetic

    spec = spec or arithmetic.DEFAULT_SPEC
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    problems = {split: arithmetic.generate(split, int(demo[key]), int(demo["data_seed"]), spec)
                for split, key in (("train", "train_problems"), ("validation", "val_problems"),
                                   ("test", "test_problems"))}
    if demo.get("val_shift") == "two_step":  # the gold data from another slice: 2-step problems only
        pool = arithmetic.generate("validation", 20 * int(demo["val_problems"]), int(demo["data_seed"]), spec)
        problems["validation"] = [p for p in pool if len(p.steps) == 2][: int(demo["val_problems"])]
    # dev: held out from both the test problems (it chooses settings, e.g. the gold-data control's λ) and the
    # gold validation solutions -- the validation bucket, another stream, the gold problems removed
    gold = {p.question for p in problems["validation"]}
    more = arithmetic.generate("validation", int(demo["dev_problems"]) + len(gold), int(demo["data_seed"]) + 1, spec)
    problems["dev"] = [p for p in more if p.question not in gold][: int(demo["dev_problems"])]
    for split, probs in problems.items():
        paths[split] = (d / f"{split}.jsonl").resolve()
        with paths[split].open("w", encoding="utf-8") as f:
            for prob in probs:
                f.write(json.dumps({"question": prob.question, "answer": prob.solution}) + "\n")
    return paths


def matched_method(name: str, demo: dict) -> str | None:
    """The run a random control copies its kept counts from (same seed)."""
    m = method(name).matches
    return influence_method(demo["timing"]) if m == "ippo" else m


def write_run_config(base: dict, paths: dict[str, Path], run_dir: Path, seed: int, name: str, out: Path,
                     demo: dict, eval_split: str = "test") -> Path:
    """The config of one run as ``run_dir.yaml`` (``ippo train`` on it reproduces the run); absolute paths."""
    from ippo.rl.config import load_config, merge

    overrides = json.loads(json.dumps(method(name).overrides))  # a copy
    if matched_method(name, demo):
        overrides["control"]["match_run"] = str((out / matched_method(name, demo) / f"seed{seed}").resolve())
    lam = sft_coef_of(name, demo["sft_coef"])
    if lam is not None:
        overrides["control"]["sft_coef"] = lam
    data = merge(base, {"run_dir": str(run_dir.resolve()), "seed": seed,
                         "data": {"train_path": str(paths["train"]), "val_path": str(paths["validation"]),
                                  "test_path": str(paths[eval_split])}})
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


def run_jobs(jobs: list[Job], parallel: int, on_done=None, on_tick=None) -> None:
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
            if on_tick is not None:
                on_tick()
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


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to touch anything but an empty folder or, with ``--overwrite``, a previous demo's output."""
    from ippo.rl.config import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        previous = (out / "data" / "train.jsonl").is_file() or (out / "summary.json").is_file()
        if not previous:
            raise ConfigError(f"--out {out} exists and is not a previous demo output: refusing to replace it")
        if not overwrite:
            raise ConfigError(f"--out {out} holds a previous demo's results: pass --overwrite to replace them, or "
                              "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def plan_runs(demo: dict, base: dict, paths: dict[str, Path], out: Path) -> tuple[list[str], str, list[Job], dict]:
    """(methods, evaluation split, jobs, the baseline run's config): every run config written and validated."""
    sweep = [f"ppo_sft{SWEEP_SEP}{lam:g}" for lam in demo["sft_sweep"]]
    methods = ["ppo", *sweep] if sweep else methods_for(demo["timing"], demo["controls"], demo["ablations"])
    if demo["gold_comparison"] and not sweep:
        methods = ["ppo", "ppo_sft", influence_method(demo["timing"]), "ippo_sft"]
    split = "dev" if sweep else "test"  # the λ sweep chooses on held-out problems, never on the test set
    seeds = demo["seeds"]

    def noise_env(seed: int) -> dict[str, str]:
        return {NOISE_ENV: repr(float(demo["reward_noise"])), SALT_ENV: f"seed{seed}"}

    base_cfg = write_run_config(base, paths, out / "baseline" / "run", seeds[0], "ppo", out, demo, split)
    inspected = inspected_method(methods)
    jobs = [Job("baseline", ["eval", str(base_cfg), "--base"], out / "baseline" / "eval.log", noise_env(seeds[0]))]
    for seed in seeds:  # seed-major: a partial run still pairs every method on the first seeds
        for name in methods:
            run_dir = out / name / f"seed{seed}"
            run_base = keep_theta_old(base) if (seed, name) == (seeds[0], inspected) else base
            cfg_path = write_run_config(run_base, paths, run_dir, seed, name, out, demo, split)
            matched = matched_method(name, demo)
            after = [f"{matched}/seed{seed}"] if matched else []
            jobs.append(Job(f"{name}/seed{seed}", ["train", str(cfg_path)], run_dir.parent / f"seed{seed}.log",
                            noise_env(seed), after))
    return methods, split, jobs, yaml.safe_load(base_cfg.read_text())


def inspected_method(methods: list[str]) -> str | None:
    """The I-PPO arm whose first seed ``OUT/inspect.html`` explains: the first the demo runs (None: none runs)."""
    return next((m for m in methods if method(m).kind == "influence"), None)


def keep_theta_old(base: dict) -> dict:
    """The inspected run's config: it also writes, and keeps, the checkpoint after ``iterations - 1``
    iterations, theta_old of its last iteration (checkpoints change no result)."""
    from ippo.rl.config import merge

    k = int(base.get("iterations") or 0) - 1
    return merge(base, {"checkpoint": {"every": k, "keep_every": k}}) if k >= 1 else base


def write_inspect_page(out: Path, name: str | None, seed: int) -> Path | None:
    """``ippo inspect`` of run ``name``/seed``seed``: ``OUT/inspect.html`` (None when no I-PPO arm ran, or it failed:
    the comparison stands without it)."""
    if name is None:
        return None
    from ippo.errors import ConfigError
    from ippo.inspection import inspect_run
    from ippo.rl.checkpoint import CheckpointError

    try:
        res = inspect_run(out / name / f"seed{seed}", out=out / "inspect.html", category="ippo.demo:episode_category")
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"ippo demo: no inspect.html ({e})", flush=True)
        return None
    checks = [f"iteration {it}: " + (rec.problem or "no score taken at theta_old to compare" if not rec.compared else
                                     f"{'scores match' if rec.all_match else 'SCORES DIFFER'} ({len(rec.compared)} "
                                     "compared)") for it, rec in res.recomputed.items()]
    print(f"ippo inspect of {name}/seed{seed}: {out / 'inspect.html'} ({'; '.join(checks)})", flush=True)
    return res.out


class Progress:
    """One line every ``every`` seconds while runs train: iterations done over all runs, and an ETA."""

    def __init__(self, out: Path, jobs: list[Job], iterations: int, every: float = 20.0) -> None:
        self.out, self.runs, self.iterations, self.every = out, [j.name for j in jobs[1:]], iterations, every
        self.t0, self.last, self.shown = time.perf_counter(), time.perf_counter(), -1

    def done_iterations(self) -> int:
        n = 0
        for name in self.runs:
            f = self.out / name / "metrics.jsonl"
            if f.is_file():
                n += sum(1 for line in f.read_text().splitlines() if line.strip())
        return n

    def tick(self) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        done, total = self.done_iterations(), len(self.runs) * self.iterations
        if done == self.shown or done == 0:
            return
        self.shown = done
        rate = done / (now - self.t0)
        eta = (total - done) / rate if rate > 0 else float("nan")
        print(f"  ... {done}/{total} iterations of {len(self.runs)} runs done, {(now - self.t0) / 60:.1f} min so far,"
              f" about {eta / 60:.1f} min to go (runs that stop early finish sooner)", flush=True)


def _run(args: argparse.Namespace) -> int:
    from ippo.rl.data import load_jsonl

    t_start = time.perf_counter()
    demo, base = load_settings(args)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:  # every run's config is valid before the output folder is touched
        from ippo.tasks import model_task_spec

        spec = model_task_spec(base["model"]["path"])
        plan_runs(demo, base, {k: Path(tmp) / f"{k}.jsonl" for k in ("train", "validation", "test", "dev")},
                  Path(tmp))
    prepare_out(out, args.overwrite)
    _quiet_transformers()
    machine = demo_report.machine_info()
    machine["load_start"] = machine.pop("load_avg")
    paths = write_splits(out, demo, spec)
    methods, split, jobs, cfg0 = plan_runs(demo, base, paths, out)
    seeds, noise = demo["seeds"], float(demo["reward_noise"])
    parallel = int(demo["jobs"]) or max(1, min(os.cpu_count() or 1, 8))
    train_gold = [ex.gold for ex in load_jsonl(paths["train"], strip_calculator=False)]
    n_test = len(load_jsonl(paths[split], strip_calculator=False))
    print(f"ippo demo: {', '.join(method(m).label for m in methods)} x seed(s) {seeds}, {cfg0['iterations']} "
          f"iterations each ({cfg0['rollout']['prompts_per_iter']} prompts x {cfg0['rollout']['samples_per_prompt']} "
          f"samples), {n_test} {split} problems, reward noise {noise}, {parallel} process(es) at a time; "
          f"output in {out}/", flush=True)
    n_done = [0]

    def report_progress(job: Job) -> None:
        n_done[0] += 1
        msg = f"[{n_done[0]}/{len(jobs)}] {job.name} done in {job.wall:.0f} s"
        if job.name == "baseline":
            ev = _last_json(job.log)
            msg += f": start model {split} accuracy {100 * ev.get('test_acc', ev['greedy_acc']):.1f}%"
        else:
            evals = demo_report.read_jsonl(out / job.name / "eval.jsonl")
            if evals and "test_acc" in evals[-1]:
                msg += f": final {split} accuracy {100 * evals[-1]['test_acc']:.1f}%"
        print(msg, flush=True)

    run_jobs(jobs, parallel, report_progress, Progress(out, jobs, int(cfg0["iterations"])).tick)
    baseline = add_sampled_acc(_last_json(jobs[0].log), noise)
    if "test_acc" not in baseline:
        raise JobFailed(f"the start model's evaluation ({jobs[0].log}) has no test_acc: is "
                        "eval.response_metrics=ippo.demo:faithfulness_metrics set?")
    shutil.rmtree(out / "baseline" / "run", ignore_errors=True)
    wall = {j.name: j.wall for j in jobs}
    write_inspect_page(out, inspected_method(methods), seeds[0])  # before the checkpoints go

    analyses: dict[str, list[dict]] = {m: [] for m in methods}
    summaries: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for name in methods:
            run_dir = out / name / f"seed{seed}"
            a = demo_report.analyse_run(run_dir, train_gold, noise, seed)
            s = demo_report.run_summary(a, baseline, int(cfg0["iterations"]), n_test)
            s["seed"], s["wall_s"] = seed, wall[f"{name}/seed{seed}"]
            analyses[name].append(a)
            summaries[name].append(s)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the demo never resumes
    demo_report.add_paired_metrics(summaries, analyses, baseline)

    machine["load_end"] = demo_report.machine_info()["load_avg"]
    plots = demo_report.make_plots(out, analyses, baseline)
    total = time.perf_counter() - t_start
    aggregates = demo_report.aggregate(summaries, baseline, n_test)
    notes = demo_report.findings(summaries, aggregates, baseline, n_test, demo)
    demo_report.write_report(out, demo, cfg0, summaries, aggregates, baseline, plots, machine, wall, total, n_test,
                             notes, spec.to_dict(), parallel, split)
    (out / "summary.json").write_text(json.dumps(
        {"demo": demo, "task_spec": spec.to_dict(), "eval_split": split, "baseline": baseline, "n_test": n_test,
         "runs": summaries, "aggregates": aggregates, "machine": machine, "wall_s": wall, "parallel_jobs": parallel,
         "total_wall_s": total}, indent=1, default=str))
    print()
    print(demo_report.text_table(demo_report.ACC_COLUMNS, demo_report.comparison_rows(aggregates, baseline)))
    print()
    print(demo_report.text_table(demo_report.BEHAVIOUR_COLUMNS, demo_report.behaviour_rows(aggregates, baseline)))
    print(f"\n{n_test} {split} problems, seeds {seeds}, {cfg0['iterations']} iterations; {total / 60:.1f} min.\n")
    for line in notes:
        print(line.replace("**", ""))
    print(f"\nReport and plots: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
