"""Memory of target mode: the rank-q basis from the dense validation gradient G vs from its factors.

Three parts, one JSON (``target_memory_<mode>.json``):

1. **One I-PPO iteration** (the real trainer, ``bench_step``'s overrides and peak-memory method) on
   a random-weight Llama of a preset's shape (``common.build_preset_dir``: its full vocabulary, a
   character tokenizer): plain PPO, I-PPO exact, I-PPO target with ``influence.target_basis=dense``
   and with ``=factor``. Peak of the whole run over what was live before it (models included).
2. **The target alone** on the same preset: ``Target.memory_bytes()`` (the tensors the target
   holds: dense G, or the factors (X, dY) and the basis) and the peak of the ``engine.target`` call
   (validation backward + basis) over the live validation graph, for each way of holding it.
3. **Projected bytes at 8B** (Llama-3-8B shapes) from the formula below, checked against part 2's
   measured ``memory_bytes`` on the preset.

The formula, per rank, for hooked linear layers l with (d_in, d_out), k_l = min(q, d_in, d_out),
w_l = min(k_l + 16, d_in, d_out), N validation tokens on this rank, b bytes per activation value:

* dense G (exact mode, and target mode with ``target_basis=dense``): ``4 * sum_l d_in d_out``
  (fp32), kept for the whole iteration; building the dense basis also stacks one shape group's G
  (``4 * max_group sum_{l in group} d_in d_out``) while it runs.
* basis (target mode, both ways): ``4 * sum_l k_l (d_in + d_out + 1)``.
* factors (``target_basis=factor``, until the basis is built; then freed): ``b * N * (sum over
  distinct layer inputs of d_in + sum_l d_out)`` -- q/k/v read one input, gate/up another -- plus the
  range finder's sketches, ``~ 3 * 4 * sum_l w_l (d_in + d_out)`` at their peak.
* the range finder's test matrices, cached by the engine across iterations (both bases):
  ``4 * sum_l w_l d_in``.

Not included: the validation forward's own activations (the same in every mode; the factors' X is
part of them until the backward frees the graph), the weights, optimizer state and rollout buffers.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_target_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common

GIB = 2**30
MIB = 2**20

# Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 32 query / 8 key-value heads (head dim 128), vocab 128256
LLAMA3_8B = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256}


def llama_layers(shape: dict) -> list[tuple[str, int, int, str]]:
    """(name, d_in, d_out, input id) of every hooked linear layer of a Llama (no biases)."""
    h, inter = shape["hidden"], shape["intermediate"]
    kv = h // shape["heads"] * shape["kv_heads"]
    out = []
    for i in range(shape["layers"]):
        out += [(f"{i}.q", h, h, f"{i}.attn_in"), (f"{i}.k", h, kv, f"{i}.attn_in"), (f"{i}.v", h, kv, f"{i}.attn_in"),
                (f"{i}.o", h, h, f"{i}.o_in"), (f"{i}.gate", h, inter, f"{i}.mlp_in"),
                (f"{i}.up", h, inter, f"{i}.mlp_in"), (f"{i}.down", inter, h, f"{i}.down_in")]
    out.append(("lm_head", h, shape["vocab"], "final"))
    return out


def projected_bytes(shape: dict, n_tokens: int, q: int, act_bytes: int) -> dict:
    """The formula of the module docstring: bytes held by the validation target, per rank."""
    layers = llama_layers(shape)
    params = sum(d_in * d_out for _, d_in, d_out, _ in layers)
    groups: dict[tuple, int] = {}
    for _, d_in, d_out, _ in layers:
        groups[(d_in, d_out)] = groups.get((d_in, d_out), 0) + d_in * d_out
    ks = [(min(q, d_in, d_out), min(min(q, d_in, d_out) + 16, d_in, d_out), d_in, d_out) for _, d_in, d_out, _ in layers]
    basis = 4 * sum(k * (d_in + d_out + 1) for k, _, d_in, d_out in ks)
    sketches = 3 * 4 * sum(w * (d_in + d_out) for _, w, d_in, d_out in ks)
    inputs = {inp: d_in for _, d_in, _, inp in layers}
    per_token = sum(inputs.values()) + sum(d_out for _, _, d_out, _ in layers)
    factors = act_bytes * n_tokens * per_token
    dense = 4 * params
    omegas = 4 * sum(w * d_in for _, w, d_in, _ in ks)
    return {
        "hooked_params": params,
        "dense_g_bytes": dense,
        "dense_stack_bytes": 4 * max(groups.values()),
        "basis_bytes": basis,
        "factor_bytes": factors,
        "factor_sketch_bytes": sketches,
        "factor_values_per_token": per_token,
        "omega_cache_bytes": omegas,
        # what each mode holds at the target's peak and through scoring + update
        "exact_peak": dense, "exact_kept": dense,
        "target_dense_peak": dense + 4 * max(groups.values()) + basis + omegas,
        "target_dense_kept": dense + basis + omegas,
        "target_factor_peak": factors + sketches + basis + omegas, "target_factor_kept": basis + omegas,
    }


# ----------------------------------------------------------------------------- part 1: the trainer
def measure_iterations(preset: str, args, work: Path) -> list[dict]:
    from benchmarks import bench_step

    model_dir = common.build_preset_dir(preset, work / f"model-{preset}")
    c = {"hidden": common.PRESETS[preset]["hidden"], "layers": common.PRESETS[preset]["layers"],
         "E": args.E, "T": args.T, "mode": "target", "rank": args.rank}
    val = (f"influence.n_val={args.n_val}", "data.val_holdout=16")
    runs = [("PPO", False, "exact", ()), ("I-PPO exact", True, "exact", ()),
            ("I-PPO target, dense basis", True, "target", ("influence.target_basis=dense",)),
            ("I-PPO target, factor basis", True, "target", ("influence.target_basis=factor",))]
    if args.smoke:  # CI: the two target bases only, no warm-up (checks the outputs, not the numbers)
        runs = runs[2:]
    else:
        bench_step.run_trainer({**c, "mode": "exact"}, model_dir, work, True, 1, args, extra=val)  # warm-up, discarded
    rows = []
    for label, influence, mode, extra in runs:
        r = bench_step.run_trainer({**c, "mode": mode}, model_dir, work, influence, 1, args, extra=val + extra)
        rows.append({"preset": preset, "run": label, "E": args.E, "T": args.T, "n_val": args.n_val, "q": args.rank,
                     "peak_mb": r["peak_mb"], "iteration_s": r["iteration"], "val_grad_s": r["val_grad"],
                     "scoring_s": r["scoring"]})
        print(f"  {label}: peak {common.fmt(r['peak_mb'])} MiB, iteration {common.fmt(r['iteration'])} s", flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- part 2: the target alone
def measure_target(preset: str, args) -> list[dict]:
    import ippo

    model = common.make_llama(preset, device=args.device)
    p = common.PRESETS[preset]
    gen = torch.Generator().manual_seed(0)
    val = torch.randint(3, p["vocab"], (args.n_val, args.T_val), generator=gen).to(args.device)
    rows = []
    for basis in ("dense", "factor"):
        engine = ippo.InfluenceEngine(model, rank=args.rank)
        holder = {}
        with engine.recording():
            loss = model(val, labels=val).loss

        def build(loss=loss, holder=holder, basis=basis, engine=engine):
            holder["target"] = engine.target(loss, rank=args.rank, basis=basis)

        t0 = time.perf_counter()
        peak = common.peak_memory_mb(build, args.device)
        seconds = time.perf_counter() - t0
        target = holder["target"]
        held = target.memory_bytes()
        after = target.drop_factors().memory_bytes() if basis == "factor" else held
        proj = projected_bytes(p, args.n_val * args.T_val, args.rank, 4)
        predicted = (proj["dense_g_bytes"] + proj["basis_bytes"] if basis == "dense"
                     else proj["factor_bytes"] + proj["basis_bytes"])
        rows.append({"preset": preset, "basis": basis, "n_tokens": args.n_val * args.T_val, "q": args.rank,
                     "held_mb": held / MIB, "predicted_held_mb": predicted / MIB, "kept_mb": after / MIB,
                     "target_call_peak_mb": peak, "target_call_s": seconds})
        print(f"  target [{basis}]: holds {held / MIB:.1f} MiB (formula {predicted / MIB:.1f}), "
              f"{after / MIB:.1f} MiB after the basis; target() peak {common.fmt(peak)} MiB, {seconds:.2f} s",
              flush=True)
        del target, holder, loss
    return rows


# ----------------------------------------------------------------------------- part 3: the projection
def projection_rows(q: int) -> list[dict]:
    rows = []
    for tokens in (2048, 8192, 32768):
        pr = projected_bytes(LLAMA3_8B, tokens, q, 2)  # bf16 activations
        rows.append({"model": "Llama-3-8B", "N_val/rank": tokens, "q": q,
                     "exact_GiB": pr["exact_kept"] / GIB,
                     "dense_peak_GiB": pr["target_dense_peak"] / GIB, "dense_kept_GiB": pr["target_dense_kept"] / GIB,
                     "factor_peak_GiB": pr["target_factor_peak"] / GIB,
                     "factor_kept_GiB": pr["target_factor_kept"] / GIB,
                     "factor_MiB_per_token": pr["factor_values_per_token"] * 2 / MIB})
    return rows


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: 125m; micro with --smoke)")
    p.add_argument("--E", type=int, default=None, help="episodes per iteration (default 16; 4 with --smoke)")
    p.add_argument("--T", type=int, default=None, help="sampled tokens per episode (default 32; 4 with --smoke)")
    p.add_argument("--n-val", type=int, default=None, help="validation sequences (default 16; 4 with --smoke)")
    p.add_argument("--T-val", type=int, default=64, help="tokens per validation sequence (part 2)")
    p.add_argument("--rank", type=int, default=64, help="target rank q")
    p.add_argument("--skip-iteration", action="store_true", help="only parts 2 and 3 (no trainer runs)")
    args = p.parse_args(argv)
    args.preset = args.preset or ("micro" if args.smoke else "125m")
    args.E = args.E or (4 if args.smoke else 16)
    args.T = args.T or (4 if args.smoke else 32)
    args.n_val = args.n_val or (4 if args.smoke else 16)
    if args.smoke:
        args.T_val, args.rank = 16, 8
    out_dir = common.setup(args)
    env = common.environment(args.device)
    print(f"bench_target_memory ({common.mode_name(args)}) on {env['device']}, preset {args.preset}", flush=True)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ippo-bench-target-"))
    try:
        common.configure_cpu_allocator()  # peak numbers that count every page a call touches
        iterations = [] if args.skip_iteration else measure_iterations(args.preset, args, work)
        target = measure_target(args.preset, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    projection = projection_rows(args.rank)
    result = {"benchmark": "target_memory", "mode": common.mode_name(args), "env": env,
              "load_avg_end": common.load_avg(), "wall_s": time.perf_counter() - t_start,
              "settings": {"preset": args.preset, "E": args.E, "T": args.T, "n_val": args.n_val, "T_val": args.T_val,
                           "q": args.rank, "memory": common.memory_method(args.device),
                           "iteration": "one trainer iteration after a discarded warm-up run; peak of the whole run "
                                        "(models, rollout, validation target, scoring, update) over what was live "
                                        "before it; bench_step.overrides (fp32, separate critic, reference)",
                           "projection": "module docstring formula; bf16 activations; per rank"},
              "iterations": iterations, "target": target, "projection": projection}
    path = common.write_json(out_dir / f"target_memory_{common.mode_name(args)}.json", result)
    if iterations:
        print()
        print(common.table(iterations, ["preset", "run", "E", "T", "n_val", "q", "peak_mb", "iteration_s",
                                        "val_grad_s"], "One iteration: peak memory (MiB over the start)"))
    print()
    print(common.table(target, ["preset", "basis", "n_tokens", "q", "held_mb", "predicted_held_mb", "kept_mb",
                                "target_call_peak_mb", "target_call_s"], "The validation target alone (MiB)"))
    print()
    print(common.table(projection, ["model", "N_val/rank", "q", "exact_GiB", "dense_peak_GiB", "dense_kept_GiB",
                                    "factor_peak_GiB", "factor_kept_GiB", "factor_MiB_per_token"],
                       "Projected: bytes held by the validation target per rank"))
    print(f"\nwrote {path} ({result['wall_s']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
