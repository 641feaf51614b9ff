"""Each ``ippo.influence.ops`` op on every available backend against the torch reference, over a size sweep.

Ops: exact_token_scores, projected_token_scores, segment_sketch, segment_sum, select_episodes.
Sizes: N tokens, d = d_in = d_out (plus one d_out = 4 d row: an MLP up-projection), k the
projection rank, E episodes. Correctness: ``rel_err = ||out - ref|| / ||ref||`` against the
reference run in float64 (for select_episodes: the keep mask must match and the weights' rel err).
Time: median of repeats after a warm-up. Achieved bandwidth (GB/s) and FLOP rate (GFLOP/s) are
reported on every device; ``floor_s`` is the time to read X and dY once at the copy bandwidth
measured on this device, and ``x_floor = time / floor_s`` (1.0 = bandwidth-bound optimum). On a
GPU the times come from CUDA events and the bf16 inputs are swept too.
The triton backend is timed only on a GPU (its CPU interpreter is for tests).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_kernels.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ippo
from benchmarks import common
from ippo.influence import ops

OPS = ("exact_token_scores", "projected_token_scores", "segment_sketch", "segment_sum", "select_episodes")


def backends_for(device: str) -> list[str]:
    kind = torch.device(device).type
    out = []
    for name, info in ippo.influence.backends().items():
        if not info:
            continue
        if kind == "cpu" and name in ("cuda", "triton"):
            continue  # cuda needs a GPU; the triton interpreter is never timed
        if kind == "cuda" and name == "cpp":
            continue
        out.append(name)
    return out


def implemented(backend: str, op: str) -> bool:
    """Whether the backend has its own kernel for ``op`` (else ``ops.get`` falls back to the reference)."""
    if backend == "torch":
        return True
    import importlib

    try:
        mod = importlib.import_module(f"ippo.influence.ops.{backend}")
    except ImportError:
        return False
    return getattr(mod, op, None) is not None


def plan(args) -> dict:
    if args.smoke:
        return {"sizes": [{"N": 256, "d": 64, "d_out": 64, "k": 16, "E": 8}], "repeats": 1}
    if args.quick:
        sizes = [{"N": n, "d": d, "d_out": d, "k": k, "E": 64}
                 for n in (4096, 16384) for d in (256, 1024) for k in (16, 64)]
        sizes.append({"N": 4096, "d": 256, "d_out": 1024, "k": 64, "E": 64})
        sizes.append({"N": 4096, "d": 256, "d_out": 256, "k": 64, "E": 1024})
        return {"sizes": sizes, "repeats": 3}
    big = torch.device(args.device).type == "cuda"
    ns = (4096, 16384, 65536, 262144) if big else (4096, 16384, 65536)
    ds = (256, 1024, 4096) if big else (256, 1024)
    sizes = [{"N": n, "d": d, "d_out": d, "k": k, "E": 256} for n in ns for d in ds for k in (16, 64, 128)]
    sizes += [{"N": ns[1], "d": d, "d_out": 4 * d, "k": 64, "E": 256} for d in ds]
    sizes += [{"N": ns[1], "d": 1024, "d_out": 1024, "k": 64, "E": e} for e in (16, 1024, 4096)]
    return {"sizes": sizes, "repeats": 10}


def make_inputs(s: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    N, d, d_out, k, E = s["N"], s["d"], s["d_out"], s["k"], s["E"]

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    ids = torch.randint(0, E, (N,), generator=g).sort().values  # contiguous episodes, as in a batch
    ids[torch.randperm(N, generator=g)[: N // 50]] = -1  # a few padding tokens
    host = {
        "x": rn(N, d), "dy": rn(N, d_out), "g": rn(d_out, d, scale=d ** -0.5), "g_bias": rn(d_out),
        "p_in": rn(k, d, scale=k ** -0.5), "p_in_bias": rn(k, scale=k ** -0.5), "p_out": rn(k, d_out, scale=k ** -0.5),
        "w": rn(k).abs(), "values": rn(N), "scores": rn(E), "ids": ids,
    }
    out = {}
    for name, t in host.items():
        t = t.to(device)
        out[name] = t if name == "ids" or dtype is None else t.to(dtype)
    return out


def call(op_ns, op: str, a: dict, E: int):
    if op == "exact_token_scores":
        return op_ns.exact_token_scores(a["x"], a["dy"], a["g"], a["g_bias"])
    if op == "projected_token_scores":
        return op_ns.projected_token_scores(a["x"], a["dy"], a["p_in"], a["p_in_bias"], a["p_out"], a["w"])
    if op == "segment_sketch":
        return op_ns.segment_sketch(a["x"], a["dy"], a["p_in"], a["p_in_bias"], a["p_out"], a["ids"], E)
    if op == "segment_sum":
        return op_ns.segment_sum(a["values"], a["ids"], E)
    if op == "select_episodes":
        return op_ns.select_episodes(a["scores"], "bottom_fraction", 0.3)
    raise ValueError(op)


def cost(op: str, s: dict, elem: int) -> tuple[float, float]:
    """(bytes read/written at least once, FLOPs) of one call; the floor reads X and dY once."""
    N, d, d_out, k, E = s["N"], s["d"], s["d_out"], s["k"], s["E"]
    xdy = N * (d + d_out) * elem
    if op == "exact_token_scores":
        return xdy + d_out * d * elem + 4 * N, 2.0 * N * d * d_out + 2.0 * N * d_out
    if op == "projected_token_scores":
        return xdy + k * (d + d_out) * elem + 4 * N, 2.0 * N * k * (d + d_out) + 3.0 * N * k
    if op == "segment_sketch":
        return xdy + k * (d + d_out) * elem + 8 * N + 4 * E * k * k, 2.0 * N * k * (d + d_out) + 2.0 * N * k * k
    if op == "segment_sum":
        return N * (elem + 8) + 4 * E, float(N)
    return E * (elem + 5), E * 20.0  # select_episodes: a sort


def floor_bytes(op: str, s: dict, elem: int) -> float:
    if op in ("segment_sum",):
        return s["N"] * (elem + 8)
    if op == "select_episodes":
        return s["E"] * elem
    return s["N"] * (s["d"] + s["d_out"]) * elem


def copy_bandwidth(device: str) -> float:
    """Achievable bytes/s of a large device copy (read + write), the roofline's memory side."""
    n = (256 << 20) // 4 if torch.device(device).type == "cuda" else (64 << 20) // 4
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    res = common.time_fn(lambda: b.copy_(a), 2, 5, device)
    return 2 * a.numel() * 4 / res["median_s"]


def time_call(fn, reps: int, device: str) -> float:
    if torch.device(device).type == "cuda":  # CUDA events: device time without host jitter
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]
    return common.time_fn(fn, 1, reps, device)["median_s"]


def compare(op: str, out, ref) -> dict:
    if op == "select_episodes":
        keep, w = out
        rkeep, rw = ref
        match = bool(torch.equal(keep.cpu(), rkeep.cpu()))
        return {"rel_err": common.max_rel_err(w, rw) if rw.abs().max() > 0 else 0.0, "keep_match": match}
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    den = float(r.norm())
    return {"rel_err": float((o - r).norm()) / den if den > 0 else float((o - r).norm())}


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--dtypes", default=None, help="comma list: float32,bfloat16 (default float32; +bf16 on GPU)")
    args = p.parse_args(argv)
    out_dir = common.setup(args)
    pl = plan(args)
    reps = args.repeats or pl["repeats"]
    device = args.device
    dtypes = args.dtypes.split(",") if args.dtypes else (
        ["float32", "bfloat16"] if torch.device(device).type == "cuda" else ["float32"])
    env = common.environment(device)
    bw = copy_bandwidth(device)
    print(f"bench_kernels ({common.mode_name(args)}) on {env['device']}, {env['threads']} threads, load "
          f"{env['load_avg']}, copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    t_start = time.perf_counter()
    bes = backends_for(device)
    rows = []
    ref_ns = ops.get("torch")
    for s in pl["sizes"]:
        ref_inputs = make_inputs(s, torch.float64, "cpu")
        refs = {op: call(ref_ns, op, ref_inputs, s["E"]) for op in OPS}
        for dt_name in dtypes:
            dt = getattr(torch, dt_name)
            a = make_inputs(s, dt, device)
            elem = torch.empty((), dtype=dt).element_size()
            for op in OPS:
                for be in bes:
                    ns = ops.get(be)
                    row = {"op": op, "backend": be, "dtype": dt_name, **s, "own_kernel": implemented(be, op)}
                    try:
                        out = call(ns, op, a, s["E"])
                        row.update(compare(op, out, refs[op]))
                        t = time_call(lambda ns=ns, op=op, a=a, E=s["E"]: call(ns, op, a, E), reps, device)
                    except Exception as e:  # noqa: BLE001 -- report a failing backend, keep going
                        row["error"] = f"{type(e).__name__}: {e}"
                        rows.append(row)
                        continue
                    nbytes, flops = cost(op, s, elem)
                    floor = floor_bytes(op, s, elem) / bw
                    row.update({"time_s": t, "gb_s": nbytes / t / 1e9, "gflop_s": flops / t / 1e9,
                                "floor_s": floor, "x_floor": t / floor})
                    rows.append(row)
    # speedup of each backend over the torch reference, same op/size/dtype
    index = {(r["op"], r["dtype"], r["N"], r["d"], r["d_out"], r["k"], r["E"]): r
             for r in rows if r["backend"] == "torch"}
    for r in rows:
        ref = index.get((r["op"], r["dtype"], r["N"], r["d"], r["d_out"], r["k"], r["E"]))
        if ref and r.get("time_s") and ref.get("time_s"):
            r["speedup_vs_torch"] = ref["time_s"] / r["time_s"]
    result = {
        "benchmark": "kernels",
        "mode": common.mode_name(args),
        "env": env,
        "load_avg_end": common.load_avg(),
        "wall_s": time.perf_counter() - t_start,
        "copy_bandwidth_gb_s": bw / 1e9,
        "settings": {"repeats": reps, "warmup": 1, "sizes": pl["sizes"], "dtypes": dtypes, "backends": bes,
                     "reference": "ippo.influence.ops.reference in float64 on CPU",
                     "timing": "CUDA events median" if device == "cuda" else "wall-clock median"},
        "rows": rows,
    }
    stamp = common.mode_name(args)
    path = common.write_json(out_dir / f"kernels_{stamp}.json", result)
    cols = ["op", "backend", "dtype", "N", "d", "d_out", "k", "E", "time_s", "speedup_vs_torch", "rel_err",
            "gb_s", "gflop_s", "x_floor"]
    print()
    print(common.table(rows, cols, "ippo.influence.ops per backend"))
    if not args.no_plots:
        result["plots"] = plots(out_dir, rows, stamp)
        common.write_json(path, result)
    print(f"\nwrote {path} ({result['wall_s']:.1f} s)")
    return result


def plots(out_dir: Path, rows: list[dict], stamp: str) -> list[str]:
    made = []
    for op in ("exact_token_scores", "projected_token_scores", "segment_sketch"):
        sel = [r for r in rows if r["op"] == op and r.get("time_s") and r["d"] == r["d_out"] and r["k"] == 64
               and r["E"] == rows[0]["E"]]
        if len({r["N"] for r in sel}) < 2:
            continue
        series = {}
        for r in sel:
            name = f"{r['backend']} {r['dtype']} d={r['d']}"
            xs, ys = series.setdefault(name, ([], []))
            xs.append(r["N"])
            ys.append(r["time_s"])
        p = common.plot_series(out_dir / f"kernels_{op}_{stamp}.png", series, "N (tokens)", "seconds",
                               f"{op} (k=64): time vs N")
        if p:
            made.append(str(p))
    return made


if __name__ == "__main__":
    main()
