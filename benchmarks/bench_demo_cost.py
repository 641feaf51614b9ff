"""What one iteration of the demo costs per method, phase by phase: PPO against each I-PPO setting.

Runs the real trainer (``ippo train configs/demo.yaml``) on the demo's own data and bundled model, one
method at a time (one process, alone on the machine, ``threads`` torch threads as the demo uses), for
``--iterations`` iterations without evaluation, and reads the per-phase wall times the trainer logs
(``generate``, ``ref_old_logprobs``, ``val_grad``, ``scoring``, ``update``). The first iteration is a
warm-up; phase times are medians over the rest. Every method sees the same prompts and sampling seeds.

The I-PPO settings swept (``--methods``): timing (before_update / in_update), mode (exact / target at rank
q), the validation draw ``n_val``. ``overhead`` = I-PPO's median iteration time over PPO's.

It also derives the *floor*: the work I-PPO must add to PPO at least, measured phase by phase on the same
run -- the validation target (a forward and an activation-only backward over the n_val gold solutions, the
one thing PPO never computes) plus the scores' own GEMMs, whose cost is measured directly by timing the
engine's op calls on the run's own activation shapes. See benchmarks/README.md.

    python benchmarks/bench_demo_cost.py --threads 1     # ~4 min; the demo runs 1 torch thread per process
    python benchmarks/bench_demo_cost.py --smoke         # CI: 2 iterations of 3 methods
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_demo_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

PHASES = ("generate", "ref_old_logprobs", "val_grad", "scoring", "update")
# name -> overrides of configs/demo.yaml
METHODS = {
    "ppo": ["influence.enabled=false"],
    "ippo_before_update_exact": ["influence.timing=before_update", "influence.mode=exact"],
    "ippo_in_update_exact": ["influence.timing=in_update", "influence.mode=exact"],
    "ippo_in_update_target_q16": ["influence.timing=in_update", "influence.mode=target", "influence.rank=16"],
    "ippo_in_update_exact_nval16": ["influence.timing=in_update", "influence.mode=exact", "influence.n_val=16"],
    "ippo_before_update_target_q16": ["influence.timing=before_update", "influence.mode=target",
                                      "influence.rank=16"],
}
SMOKE_METHODS = ["ppo", "ippo_before_update_exact", "ippo_in_update_exact"]


def write_demo_data(out: Path, smoke: bool) -> dict[str, Path]:
    from ippo.demo.run import DEMO_DEFAULTS, write_splits
    from ippo.tasks import TINY_MODEL_DIR, model_task_spec

    demo = dict(DEMO_DEFAULTS)
    if smoke:
        demo.update(train_problems=200, val_problems=40, test_problems=20)
    return write_splits(out, demo, model_task_spec(str(TINY_MODEL_DIR)))


def run_method(name: str, paths: dict[str, Path], work: Path, iterations: int, threads: int, smoke: bool,
               tag: str = "") -> dict:
    from ippo.tasks import TINY_MODEL_DIR

    run_dir = work / f"{name}{tag}"
    args = [sys.executable, "-m", "ippo.cli", "train", str(common.ROOT / "configs" / "demo.yaml"),
            f"run_dir={run_dir}", f"iterations={iterations}", "eval.every=0", "log.progress=false",
            "log.influence_log=false", "checkpoint.every=0", f"threads={threads}", f"model.path={TINY_MODEL_DIR}",
            f"data.train_path={paths['train']}", f"data.val_path={paths['validation']}", "data.test_path=",
            "reward.fn=ippo.demo:reward", *METHODS[name]]
    if smoke:
        args += ["rollout.prompts_per_iter=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=16",
                 "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "influence.n_val=8"]
    proc = subprocess.run(args, cwd=common.ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = recs[1:] or recs  # the first iteration warms up
    row = {"method": name, "iterations_timed": len(timed), "overrides": METHODS[name]}
    for ph in (*PHASES, "iteration"):
        row[ph] = statistics.median(r.get(f"time_{ph}", 0.0) for r in timed)
    row["kept_frac"] = statistics.fmean(r["kept_frac"] for r in timed)
    row["tokens_per_iter"] = statistics.fmean(r["response_len"] * r["episodes"] for r in timed)
    return row


def score_op_seconds(paths: dict[str, Path], episodes: float, response_len: float, repeats: int = 5) -> dict:
    """The exact scores' own work for one iteration: ``exact_token_scores`` on every hooked layer of the demo's
    model, at the iteration's token count (prompt + response tokens of every episode), on the backend the
    trainer picks. I-PPO cannot score with less than this (in target mode it can: the projected op)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from ippo.influence import InfluenceEngine, ops
    from ippo.influence.backends import resolve
    from ippo.rl.data import load_jsonl
    from ippo.rl.models import load_tokenizer
    from ippo.rl.settings import ModelConfig
    from ippo.tasks import TINY_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL_DIR))
    tok = load_tokenizer(ModelConfig(path=str(TINY_MODEL_DIR)), str(TINY_MODEL_DIR))
    rows = load_jsonl(paths["train"], strip_calculator=False)[:200]
    prompt_len = statistics.fmean(len(tok(f"Q: {r.question}\nA:\n")["input_ids"]) for r in rows)
    n = int(episodes * (prompt_len + response_len))
    engine = InfluenceEngine(model)
    named = dict(model.named_modules())
    op = ops.get(resolve("auto", "cpu"))
    g = torch.Generator().manual_seed(0)
    shapes = []
    for name in engine.module_names:
        w = named[name].weight
        shapes.append((w.shape[1], w.shape[0], named[name].bias is not None))
    tensors = [(torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g), torch.randn(d_out, d_in, generator=g),
                torch.randn(d_out, generator=g) if bias else None) for d_in, d_out, bias in shapes]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, dy, gw, gb in tensors:
            op.exact_token_scores(x, dy, gw, gb)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "tokens": n, "prompt_len": prompt_len, "layers": len(shapes),
            "backend": op.name}


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--iterations", type=int, default=None, help="iterations per method (default 6; smoke 2)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the methods round-robin this many times; each phase's time is the median over rounds "
                        "(machine drift hits every method alike)")
    args = p.parse_args(argv)
    out_dir = common.setup(args)
    iterations = args.iterations or (2 if args.smoke else 6)
    names = args.methods or (SMOKE_METHODS if args.smoke else list(METHODS))
    env = common.environment("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_demo_data(Path(tmp), args.smoke)
        per_round: dict[str, list[dict]] = {n: [] for n in names}
        for k in range(args.rounds):
            for name in names:
                per_round[name].append(run_method(name, paths, Path(tmp), iterations, args.threads, args.smoke,
                                                  f"-r{k}"))
                print(f"  round {k}: {name}: {per_round[name][-1]['iteration']:.2f} s / iteration", flush=True)
        for name in names:
            row = dict(per_round[name][0])
            for ph in (*PHASES, "iteration"):
                row[ph] = statistics.median(r[ph] for r in per_round[name])
            row["rounds"] = [r["iteration"] for r in per_round[name]]
            rows.append(row)
        ppo = next((r for r in rows if r["method"] == "ppo"), None)
        score = score_op_seconds(paths, 16 * 8 if not args.smoke else 16, ppo["tokens_per_iter"] / (16 * 8)
                                 if ppo and not args.smoke else 12.0)
    for r in rows:
        r["overhead"] = r["iteration"] / ppo["iteration"] if ppo else float("nan")
        if ppo:  # what I-PPO adds on top of PPO, by phase
            r["added"] = {ph: r[ph] - ppo[ph] for ph in PHASES}
        if ppo and r["method"] != "ppo":
            # the floor: PPO's iteration + this setting's validation target + the scores' own op time (exact)
            r["floor"] = ppo["iteration"] + r["val_grad"] + (score["seconds"] if "exact" in r["method"] else 0.0)
            r["floor_overhead"] = r["floor"] / ppo["iteration"]
            r["over_floor"] = r["iteration"] / r["floor"]
    cols = ["method", *PHASES, "iteration", "overhead", "floor_overhead", "over_floor", "kept_frac"]
    print(common.table(rows, cols, title=f"bench_demo_cost ({common.mode_name(args)}), seconds per iteration "
                                         f"(median of {iterations - 1}), {args.threads} thread(s)"))
    path = common.write_json(out_dir / f"demo_cost_{common.mode_name(args)}.json",
                             {"benchmark": "demo_cost", "mode": common.mode_name(args), "env": env, "iterations": iterations,
                              "threads": args.threads, "score_ops": score, "rows": rows})
    print(f"exact score ops: {score['seconds']:.3f} s per iteration ({score['layers']} layers, {score['tokens']} tokens, "
          f"{score['backend']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
