"""One PPO iteration against one I-PPO iteration with the same config, phase by phase.

Drives the real trainer (``ippo.rl.loop.train``) on a small arithmetic task with a random
character-level Llama (``ippo.rl.models.build_tiny_llama`` at the requested width and depth), once
with ``influence.enabled=false`` (PPO) and once with it on (I-PPO), and reads the per-phase wall
times the trainer logs in ``metrics.jsonl``: ``generate``, ``ref_old_logprobs`` (reference and
critic forwards; PPO's old log-probs too), ``val_grad`` (validation target), ``scoring`` (the
engine pass, which also yields I-PPO's old log-probs), ``update`` (PPO epochs). The first
iteration is a warm-up; phase times are medians over the rest.

To measure the cost of scoring alone, I-PPO keeps every episode with weight 1
(``filter=bottom_fraction, fraction=0, reweight=false``): both runs then update on the same
number of episodes. (A real I-PPO run drops episodes, which makes its update cheaper.)
Sweeps E (episodes per iteration), T (response tokens), model size and the scoring mode/rank;
the overhead is ``time_iteration(I-PPO) / time_iteration(PPO)``.

Each config also runs I-PPO with ``influence.timing=in_update`` (exact and target modes): each
micro-batch of the first epoch is scored inside the update's own backward, so there is no scoring
pass at all. ``overhead_in_update`` is its iteration time over PPO's (the goal: <= 1.03) with
``influence.episode_loss=policy`` (KL weighted along: one backward through the policy);
``overhead_in_update_pg`` with ``episode_loss=pg`` (the KL term needs a second, unweighted backward).

``--model PATH`` (a local Hugging Face model directory with its tokenizer, or a .gguf file) runs one
configuration on that model with its own weights instead (``--E``, ``--T``, ``--mode``, ``--rank``):
what an I-PPO iteration costs on your model.

``--vs-trl`` also runs ``bench_trl.py``'s comparison with TRL's GRPO and PPO trainers once (its
rows record a skip reason when TRL is not installed).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchmarks import common
from benchmarks.trainer_setup import PHASES, overrides


def _cfg(hidden: int, layers: int, E: int, T: int, mode: str = "exact", rank: int = 64) -> dict:
    return {"hidden": hidden, "layers": layers, "E": E, "T": T, "mode": mode, "rank": rank}


def plan(args) -> dict:
    if args.model:
        desc = common.describe_model(args.model, pretrained=True)
        c = _cfg(desc["hidden_size"], desc["num_hidden_layers"], args.E or (8 if args.smoke else 16),
                 args.T or (8 if args.smoke else 32), args.mode, args.rank)
        c.update(model_path=args.model, model=common.model_label(args.model))
        return {"configs": [c], "iterations": 2 if args.smoke else 4}
    if args.smoke:
        return {"configs": [_cfg(32, 2, 8, 8)], "iterations": 2}
    if args.quick:
        base = _cfg(128, 2, 16, 16)
        big = _cfg(512, 4, 16, 32)
        wide = {**base, "hidden": 256, "layers": 4}
        # E=64 rows: the validation pass (8 sequences) weighs less against a batch nearer real rollout sizes
        cfgs = [base, {**base, "E": 32}, {**base, "E": 64}, {**base, "T": 32}, wide, {**wide, "E": 64},
                {**base, "mode": "target", "rank": 64}, {**base, "mode": "sketch", "rank": 32},
                big, {**big, "mode": "target", "rank": 64}]
        return {"configs": cfgs, "iterations": 4}
    base = _cfg(256, 4, 32, 32) if args.device == "cpu" else _cfg(512, 8, 64, 128)
    cfgs = [base]
    cfgs += [{**base, "E": base["E"] * f} for f in (0.25, 0.5, 2, 4)]
    cfgs += [{**base, "T": base["T"] * f} for f in (0.25, 0.5, 2)]
    cfgs += [{**base, "hidden": base["hidden"] * 2, "layers": base["layers"] * 2},
             {**base, "hidden": base["hidden"] // 2, "layers": max(2, base["layers"] // 2)}]
    cfgs += [{**base, "mode": "target", "rank": q} for q in (16, 64, 128)]
    cfgs += [{**base, "mode": "sketch", "rank": q} for q in (32, 128)]
    for c in cfgs:
        c["E"], c["T"] = int(c["E"]), int(c["T"])
    return {"configs": cfgs, "iterations": 4}


def run_trainer(c: dict, model_dir: Path, work: Path, influence: bool, iterations: int, args,
                timing: str = "before_update", episode_loss: str = "pg", extra: tuple[str, ...] = ()) -> dict:
    from ippo.rl.config import load_config
    from ippo.rl.loop import train

    run_dir = work / f"run-{'ippo' if influence else 'ppo'}-{time.time_ns()}"
    cfg = load_config(None, overrides(c, model_dir, run_dir, influence, iterations, args, timing, episode_loss,
                                      extra))
    t0 = time.perf_counter()
    # the whole run's peak memory over what was live before it (the models it loads included)
    peak_mb = common.peak_memory_mb(lambda: train(cfg), args.device)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = recs[1:] if len(recs) > 1 else recs  # the first iteration is the warm-up
    out = {"wall_s": wall, "iterations_timed": len(recs), "peak_mb": peak_mb}
    for ph in (*PHASES, "iteration"):
        vals = [r.get(f"time_{ph}", 0.0) for r in recs]
        out[ph] = statistics.median(vals) if vals else None
    out["kept_frac"] = statistics.median([r.get("kept_frac", 1.0) for r in recs]) if recs else None
    out["episodes"] = recs[-1].get("episodes") if recs else None
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_trl(args, out_dir: Path) -> dict:
    """ippo's PPO / I-PPO iteration against TRL's GRPOTrainer (1.16) and PPOTrainer (1.12), once, on bench_trl's
    ~1M-parameter setup (E=64, T=32; tiny at --smoke). TRL rows record a skip reason when TRL is not installed."""
    from benchmarks import bench_trl

    argv = ["--threads", str(args.threads), "--device", args.device, "--out", str(out_dir)]
    argv += ["--smoke"] if args.smoke else ["--quick"] if args.quick else []
    argv += ["--repeats", str(args.repeats)] if args.repeats else []
    argv += ["--no-plots"] if args.no_plots else []
    return bench_trl.main(argv)


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--vs-trl", action="store_true", help="also compare with TRL's GRPO and PPO trainers (bench_trl.py; skipped rows without TRL)")
    p.add_argument("--max-configs", type=int, default=None,
                   help="run only the first N configurations of the plan (the base one first; a short GPU lease)")
    mine = p.add_argument_group("your model (instead of the built-in sweep): what will an I-PPO iteration cost on it?")
    mine.add_argument("--model", default=None, help="a local Hugging Face model directory (with its tokenizer) or a "
                                                    ".gguf file; its own weights, no download, no remote code")
    mine.add_argument("--E", type=int, default=None, help="episodes per iteration (default 16)")
    mine.add_argument("--T", type=int, default=None, help="sampled tokens per episode (default 32)")
    mine.add_argument("--mode", default="exact", choices=["exact", "target", "sketch"], help="influence.mode")
    mine.add_argument("--rank", type=int, default=64, help="influence.rank (target and sketch modes)")
    args = p.parse_args(argv)
    if not args.model and (args.E is not None or args.T is not None):
        p.error("--E/--T apply to --model runs; the built-in sweep sets its own sizes")
    out_dir = common.setup(args)
    pl = plan(args)
    if args.max_configs:
        pl["configs"] = pl["configs"][:args.max_configs]
    env = common.environment(args.device)
    print(f"bench_step ({common.mode_name(args)}) on {env['device']}, {env['threads']} threads, "
          f"load {env['load_avg']}", flush=True)
    t_start = time.perf_counter()
    rows, note = [], "drives ippo.rl.loop.train (the real loop)"
    work = Path(tempfile.mkdtemp(prefix="ippo-bench-step-"))
    try:
        from ippo.rl.models import build_tiny_llama

        models: dict[tuple, Path] = {}
        # one discarded run first: one-time allocations (libraries, thread pools) must not count as the
        # first configuration's peak memory
        c0 = pl["configs"][0]
        models[(c0["hidden"], c0["layers"])] = (Path(args.model) if args.model else build_tiny_llama(
            work / f"model-{c0['hidden']}x{c0['layers']}", hidden=c0["hidden"], layers=c0["layers"]))
        run_trainer(c0, models[(c0["hidden"], c0["layers"])], work, True, 1, args)
        for c in pl["configs"]:
            key = (c["hidden"], c["layers"])
            if key not in models:
                models[key] = build_tiny_llama(work / f"model-{key[0]}x{key[1]}", hidden=key[0], layers=key[1])
            n_params = common.saved_params(models[key]) if models[key].is_dir() else None
            ppo = run_trainer(c, models[key], work, False, pl["iterations"], args)
            ipp = run_trainer(c, models[key], work, True, pl["iterations"], args)
            # in_update scores inside the update's own backward (exact/target modes only)
            scored_inside = c["mode"] != "sketch"
            iu = (run_trainer(c, models[key], work, True, pl["iterations"], args, timing="in_update",
                              episode_loss="policy") if scored_inside else None)
            iu_pg = (run_trainer(c, models[key], work, True, pl["iterations"], args, timing="in_update")
                     if scored_inside else None)
            row = {**c, "params": n_params, "load_avg_1m": common.load_avg()[0] if common.load_avg() else None}
            for ph in (*PHASES, "iteration"):
                row[f"ppo_{ph}_s"] = ppo[ph]
                row[f"ippo_{ph}_s"] = ipp[ph]
            row["ippo_kept_frac"] = ipp["kept_frac"]
            row["episodes"] = ipp["episodes"]
            row["overhead"] = _ratio(ipp["iteration"], ppo["iteration"])
            row["in_update_iteration_s"] = iu["iteration"] if iu else None
            row["in_update_update_s"] = iu["update"] if iu else None
            row["overhead_in_update"] = _ratio(iu["iteration"], ppo["iteration"]) if iu else None
            row["in_update_pg_iteration_s"] = iu_pg["iteration"] if iu_pg else None
            row["overhead_in_update_pg"] = _ratio(iu_pg["iteration"], ppo["iteration"]) if iu_pg else None
            row["ppo_peak_mb"], row["ippo_peak_mb"] = ppo["peak_mb"], ipp["peak_mb"]
            row["in_update_peak_mb"] = iu["peak_mb"] if iu else None
            row["mem_overhead"] = _ratio(ipp["peak_mb"], ppo["peak_mb"])
            row["mem_overhead_in_update"] = _ratio(iu["peak_mb"], ppo["peak_mb"]) if iu else None
            infl = (ipp["val_grad"] or 0) + (ipp["scoring"] or 0)
            row["influence_share"] = infl / ipp["iteration"] if ipp["iteration"] else None
            rows.append(row)
            print(f"  h={c['hidden']} L={c['layers']} E={c['E']} T={c['T']} {c['mode']}-{c['rank']}: "
                  f"PPO {common.fmt(ppo['iteration'])} s, I-PPO {common.fmt(ipp['iteration'])} s, "
                  f"overhead x{common.fmt(row['overhead'])}; in_update "
                  f"{common.fmt(row['in_update_iteration_s'])} s, x{common.fmt(row['overhead_in_update'])}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "step",
        "mode": common.mode_name(args),
        "env": env,
        "load_avg_end": common.load_avg(),
        "wall_s": time.perf_counter() - t_start,
        "note": note,
        "settings": {"iterations": pl["iterations"], "warmup_iterations": 1, "configs": pl["configs"],
                     "phases": list(PHASES), "timing": "median over the iterations after the first",
                     "ippo_filter": "bottom_fraction 0.0, reweight off (keeps every episode, weight 1)",
                     "in_update": "influence.timing=in_update, episode_loss=policy: scored inside the first "
                                  "epoch's backward, KL weighted along (one backward through the policy)",
                     "in_update_pg": "influence.timing=in_update, episode_loss=pg: the KL term is a second, "
                                     "unweighted backward",
                     "memory": "peak of each whole training run (models, rollouts and every iteration) over "
                               "what was live before it: " + common.memory_method(args.device)},
        "rows": rows,
    }
    if args.vs_trl:  # once, not per config: its own setup, table and trl_<mode>.json
        result["vs_trl"] = run_trl(args, out_dir)
    stamp = common.mode_name(args) + (f"-model-{pl['configs'][0]['model']}" if args.model else "")
    path = common.write_json(out_dir / f"step_{stamp}.json", result)
    cols = ["hidden", "layers", "E", "T", "mode", "rank", "ppo_iteration_s", "ippo_iteration_s", "overhead",
            "in_update_iteration_s", "overhead_in_update", "overhead_in_update_pg",
            "ippo_val_grad_s", "ippo_scoring_s", "ppo_ref_old_logprobs_s", "ippo_ref_old_logprobs_s",
            "ppo_update_s", "ippo_update_s", "ppo_generate_s"]
    print()
    on = f" on {pl['configs'][0]['model']}" if args.model else ""
    print(common.table(rows, cols, f"PPO vs I-PPO iteration{on} (seconds, medians)"))
    mem_cols = ["hidden", "layers", "E", "T", "mode", "rank", "params", "ppo_peak_mb", "ippo_peak_mb", "mem_overhead",
                "in_update_peak_mb", "mem_overhead_in_update"]
    print()
    print(common.table(rows, mem_cols, "Peak memory of the whole run (MiB over the start; models included)"))
    if not args.no_plots and rows:
        result["plots"] = plots(out_dir, rows, stamp)
        common.write_json(path, result)
    print(f"\nwrote {path} ({result['wall_s']:.1f} s)")
    return result


def plots(out_dir: Path, rows: list[dict], stamp: str) -> list[str]:
    base = rows[0]
    made = []
    for axis in ("E", "T"):
        sel = sorted((r for r in rows if all(r[k] == base[k] for k in ("hidden", "layers", "mode", "rank",
                                                                          "E", "T") if k != axis)),
                     key=lambda r: r[axis])
        if len(sel) < 2:
            continue
        xs = [r[axis] for r in sel]
        series = {"PPO iteration": (xs, [r["ppo_iteration_s"] for r in sel]),
                  "I-PPO iteration": (xs, [r["ippo_iteration_s"] for r in sel]),
                  "I-PPO val_grad + scoring": (xs, [(r["ippo_val_grad_s"] or 0) + (r["ippo_scoring_s"] or 0)
                                                    for r in sel])}
        p = common.plot_series(out_dir / f"step_time_vs_{axis}_{stamp}.png", series, axis, "seconds",
                               f"PPO vs I-PPO iteration vs {axis} (h={base['hidden']}, L={base['layers']})")
        if p:
            made.append(str(p))
        mem = {name: (xs, [r[key] for r in sel]) for name, key in
               (("PPO run", "ppo_peak_mb"), ("I-PPO run", "ippo_peak_mb"), ("I-PPO in_update run", "in_update_peak_mb"))
               if all(r.get(key) is not None for r in sel)}
        if mem:
            p = common.plot_series(out_dir / f"step_memory_vs_{axis}_{stamp}.png", mem, axis, "peak MiB",
                                   f"Peak memory of a training run vs {axis} (h={base['hidden']}, L={base['layers']})")
            if p:
                made.append(str(p))
    return made


if __name__ == "__main__":
    main()
