"""Per-episode influence scores: ippo's one-pass engine against the per-episode loop and peers.

For E episodes of T tokens on a random-weight Llama preset, every method computes
``score_e = <grad L_e, grad L_val>`` over all hooked linear layers (every ``nn.Linear``,
lm_head included), where ``L_e`` is episode e's advantage-weighted log-likelihood (a PPO-style
per-token loss) and ``L_val`` the mean SFT loss on the validation sequences:

* ``loop``     the authors' method: per episode one forward + backward
               (``torch.autograd.grad`` over the hooked weights), flatten, dot with the flattened
               validation gradient.
* ``func``     per-sample gradients with ``torch.func`` (``functional_call`` + ``vmap(grad)``,
               in chunks), then a dot per parameter. Runs eager attention (SDPA has no vmap rule).
* ``dattri``   dattri-llm online scoring (``HookManager`` + ``DataSelectionCallback`` with a
               val_loader target, ghost inner products), when installed; ``dattri-inv`` is its
               ``invasive_linear_io`` capture that skips weight-gradient GEMMs. The validation
               pass runs inside its step, so only the total is measured.
* ``plain``    a batched forward + ``loss.backward()`` with no hooks (not a scoring method: the
               floor that the memory target is measured against).
* ``ippo``     ``InfluenceEngine`` exact, sketch (ranks 16-128; at rank 64 also through the fused
               linear path, ``recording(fused_sketch=True)``) and target-aligned (q = 64) modes,
               on each available backend.

Times: ``target_s`` (validation forward + validation gradient; + SVD / target sketch where the
mode needs it), ``scoring_s`` (training forward + scoring with a ready target), ``total_s`` =
both: the validation target INCLUDED. Medians of ``--repeats`` after one warm-up.
Peak memory: see ``common.peak_memory_mb`` (measured after all timings, one run per method).
Agreement: against ippo exact on the torch backend: ``max_rel_err`` = max|s - ref| / max|ref|,
and the Spearman rank correlation.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_scoring.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ippo
from benchmarks import common

SKETCH_RANKS = (16, 32, 64, 128)
TARGET_Q = 64


# ----------------------------------------------------------------------------- losses
def token_logprobs(model, tokens):
    logits = model(tokens).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def train_loss(model, tokens, adv):
    """Sum over episodes of the advantage-weighted log-likelihood (episodes do not interact)."""
    return (token_logprobs(model, tokens) * adv).sum()


def val_loss(model, val):
    return model(val, labels=val).loss


def make_data(vocab: int, E: int, T: int, n_val: int, T_val: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (E, T), generator=g)
    adv = torch.randn(E, T - 1, generator=g)
    val = torch.randint(3, vocab, (n_val, T_val), generator=g)
    return tokens.to(device), adv.to(device), val.to(device)


def hooked_modules(model) -> dict[str, torch.nn.Module]:
    """The layers ippo's engine hooks by default: every nn.Linear and HF Conv1D with a trainable weight."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m.weight.requires_grad}


def tied_note(model) -> str:
    """A hooked weight shared with another module (a tied lm_head) gets the gradient of every use in an
    autograd loop, while ippo and dattri-llm score its linear use only: they differ by that much."""
    hooked = hooked_modules(model).values()
    weights, modules = {id(m.weight) for m in hooked}, {id(m) for m in hooked}
    shared = sorted(n for n, m in model.named_modules() if id(m) not in modules
                    and any(id(p) in weights for p in m.parameters(recurse=False)))
    return (f"; tied weights ({', '.join(shared)} shares a hooked weight): this gradient includes that use, "
            "ippo and dattri-llm score the linear use only") if shared else ""


def hooked_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in hooked_modules(model).items():
        out[f"{n}.weight"] = m.weight
        if m.bias is not None:
            out[f"{n}.bias"] = m.bias
    return out


# ----------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    family: str
    backend: str | None
    score: object  # callable(target) -> scores [E] or None
    target: object = None  # callable() -> target; None when the target runs inside score
    mode: str | None = None
    rank: int | None = None
    setup: object = None
    teardown: object = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def loop_method(model, tokens, adv, val) -> Method:
    params = list(hooked_params(model).values())

    def target():
        grads = torch.autograd.grad(val_loss(model, val), params)
        return torch.cat([g.reshape(-1) for g in grads])

    def score(gv):
        out = torch.empty(tokens.shape[0], dtype=torch.float32, device=tokens.device)
        for e in range(tokens.shape[0]):
            grads = torch.autograd.grad(train_loss(model, tokens[e:e + 1], adv[e:e + 1]), params)
            out[e] = torch.cat([g.reshape(-1) for g in grads]) @ gv
        return out

    return Method("loop", "loop", None, score, target,
                  note="per episode: forward + autograd.grad over hooked weights, flatten, dot" + tied_note(model))


def func_method(model, tokens, adv, val, chunk_bytes: int = 256 << 20) -> Method:
    from torch.func import functional_call, grad, vmap

    params = hooked_params(model)
    per_sample = sum(p.numel() * p.element_size() for p in params.values())
    chunk = max(1, min(tokens.shape[0], chunk_bytes // max(1, per_sample)))

    def loss_one(p, tok, a):
        logits = functional_call(model, p, (tok[None],)).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tok[None, 1:, None]).squeeze(-1)
        return (lp[0] * a).sum()

    per_sample_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    detached = {k: v.detach() for k, v in params.items()}

    def target():
        grads = torch.autograd.grad(val_loss(model, val), list(params.values()))
        return {k: g.reshape(-1) for k, g in zip(params, grads)}

    def score(gv):
        impl = model.config._attn_implementation
        model.config._attn_implementation = "eager"  # SDPA has no vmap batching rule on CPU
        try:
            parts = []
            for s in range(0, tokens.shape[0], chunk):
                g = per_sample_grad(detached, tokens[s:s + chunk], adv[s:s + chunk])
                parts.append(sum(g[k].flatten(1) @ gv[k] for k in g))
                del g
            return torch.cat(parts)
        finally:
            model.config._attn_implementation = impl

    return Method("func", "func", None, score, target, extra={"chunk": chunk},
                  note=f"torch.func vmap(grad) in chunks of {chunk} episodes, eager attention" + tied_note(model))


def dattri_available() -> tuple[bool, str]:
    try:
        import dattri_llm
        from dattri_llm import DataSelectionCallback, HookManager, HookManagerConfig  # noqa: F401
    except (ImportError, AttributeError) as e:  # not installed, or an API this script does not know
        return False, f"dattri-llm not usable ({type(e).__name__}: {e}); `pip install dattri-llm` to add it"
    return True, f"dattri-llm {getattr(dattri_llm, '__version__', '?')}"


def dattri_method(model, tokens, adv, val, invasive: bool = False) -> Method:
    from dattri_llm import DataSelectionCallback, HookManager, HookManagerConfig

    names = list(hooked_modules(model))
    family = "invasive_linear_io" if invasive else "linear_io"
    state = {}

    def setup():
        cb = DataSelectionCallback(model, target="val_loader", val_loader=[val],
                                   val_loss_fn=lambda m, b: val_loss(m, b),
                                   selection_kwargs={"threshold": float("-inf")})  # score, drop nothing
        state["cb"] = cb
        state["hm"] = HookManager(model, config=HookManagerConfig(hook_types={n: family for n in names}),
                                  callbacks=[cb])

    def teardown():
        state["hm"].remove()
        state.clear()
        model.zero_grad(set_to_none=True)

    def score(_):
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with state["hm"].collect():
                train_loss(model, tokens, adv).backward()
        return state["cb"].last_scores.to(tokens.device).float()

    name = "dattri-inv" if invasive else "dattri"
    return Method(name, "dattri", None, score, None, setup=setup, teardown=teardown,
                  note=f"HookManager({family}) + DataSelectionCallback(target='val_loader'); "
                       "validation pass inside the step")


def plain_method(model, tokens, adv) -> Method:
    def score(_):
        model.zero_grad(set_to_none=True)
        train_loss(model, tokens, adv).backward()

    return Method("plain", "plain", None, score, None, teardown=lambda: model.zero_grad(set_to_none=True),
                  note="batched forward + loss.backward(), no hooks (param grads written)")


def ippo_method(model, tokens, adv, val, mode: str, backend: str, rank: int | None = None,
                fused: bool = False) -> Method:
    """``fused=True`` (sketch mode): the projections come out of the layers' own GEMMs
    (``recording(fused_sketch=True)``, ``ippo.influence.fused``) instead of the hook path's extra pass."""
    q = rank if mode == "target" else None
    engine = ippo.InfluenceEngine(model, rank=rank or TARGET_Q, backend=backend)
    ids = torch.arange(tokens.shape[0], device=tokens.device)

    def target():
        with engine.recording():
            vl = val_loss(model, val)
        t = engine.target(vl, rank=q)  # target mode: the basis from the validation factors (the default)
        if mode == "sketch":
            engine.target_sketch(t, rank)
        return t

    def score(t):
        with engine.recording(fused_sketch=fused):
            tl = train_loss(model, tokens, adv)
        return engine.scores(tl, ids, t, mode=mode, rank=rank)

    name = f"ippo-{mode}" + ("-fused" if fused else "") + (f"-{rank}" if rank else "") + f"[{backend}]"
    return Method(name, "ippo", backend, score, target, mode=mode, rank=rank,
                  note="fused linear path" if fused else "")


def ippo_backends(device) -> list[str]:
    kind = torch.device(device).type
    out = []
    for name, info in ippo.influence.backends().items():
        if not info:
            continue
        if name == "triton" and kind != "cuda":
            continue  # the interpreter is for tests, never timed
        if (name == "cuda" and kind != "cuda") or (name == "cpp" and kind != "cpu"):
            continue
        out.append(name)
    return out


def build_methods(model, tokens, adv, val, which: set[str], device, sketch_ranks, with_dattri: bool,
                  backends: list[str] | None = None) -> list:
    """``backends``: the ippo backends to run (default: every one available on ``device``)."""
    methods = []
    if "loop" in which:
        methods.append(loop_method(model, tokens, adv, val))
    if "func" in which:
        methods.append(func_method(model, tokens, adv, val))
    if "dattri" in which and with_dattri:
        methods.append(dattri_method(model, tokens, adv, val))
        methods.append(dattri_method(model, tokens, adv, val, invasive=True))
    if "plain" in which:
        methods.append(plain_method(model, tokens, adv))
    for be in backends if backends is not None else ippo_backends(device):
        if "exact" in which:
            methods.append(ippo_method(model, tokens, adv, val, "exact", be))
        if "target" in which:
            methods.append(ippo_method(model, tokens, adv, val, "target", be, TARGET_Q))
        if "sketch" in which:
            methods += [ippo_method(model, tokens, adv, val, "sketch", be, r) for r in sketch_ranks]
            r = min(sketch_ranks, key=lambda k: abs(k - TARGET_Q))  # the hook path vs the fused path
            methods.append(ippo_method(model, tokens, adv, val, "sketch", be, r, fused=True))
    return methods


# ----------------------------------------------------------------------------- running
ALL = {"loop", "func", "dattri", "plain", "exact", "target", "sketch"}
SWEEP = {"loop", "dattri", "plain", "exact", "target"}


def _cfg(preset: str, E: int, T: int, methods: set[str], n_val: int = 16, T_val: int = 64,
         memory: set[str] | None = None, all_backends: bool = True) -> dict:
    """One configuration; ``memory``: the method families whose peak memory is measured (default all);
    ``all_backends=False``: ippo on its fastest available backend only (the compiled one)."""
    return {"preset": preset, "E": E, "T": T, "n_val": n_val, "T_val": T_val, "methods": methods,
            "memory": methods if memory is None else memory, "all_backends": all_backends}


def fastest_backend(device) -> list[str]:
    """The compiled backend when there is one (cuda > triton > cpp), else torch."""
    available = ippo_backends(device)
    for name in ("cuda", "triton", "cpp"):
        if name in available:
            return [name]
    return available[:1]


def plan(args) -> dict:
    """Configurations to run: (preset, E, T, methods). The first is the headline config."""
    if args.model:  # the user's model: one configuration, sizes from the flags
        smoke = args.smoke
        E = args.E or (8 if smoke else 64)
        T = args.T or (16 if smoke else 256 if args.device == "cuda" else 64)
        methods = set(args.methods.split(",")) if args.methods else {"loop", "dattri", "plain", "exact", "target"}
        unknown = methods - ALL
        if unknown:
            raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {sorted(ALL)}")
        cfg = _cfg(f"model:{common.model_label(args.model)}", E, T, methods, n_val=args.n_val or (4 if smoke else 16),
                   T_val=args.T_val or (16 if smoke else 64))
        cfg["model_path"] = args.model
        return {"configs": [cfg], "repeats": 1 if smoke else 3, "sketch_ranks": (16,) if smoke else SKETCH_RANKS}
    if args.smoke:
        return {"configs": [_cfg("micro", 8, 16, ALL, n_val=4, T_val=16)], "repeats": 1, "sketch_ranks": (16,)}
    no_loop = SWEEP - {"loop"}
    if args.quick:
        # Small enough for a shared 2-core CPU: the loop is linear in E, so it is timed at E <= 64 only.
        # Every backend in the headline config; the sweep runs ippo on the compiled backend only.
        cfgs = [_cfg("tiny", 64, 64, ALL)]
        cfgs += [_cfg("tiny", 16, 64, SWEEP, memory=no_loop, all_backends=False),
                 _cfg("tiny", 128, 64, no_loop, all_backends=False)]
        cfgs += [_cfg("tiny", 64, 32, no_loop, all_backends=False), _cfg("tiny", 64, 128, no_loop, all_backends=False)]
        cfgs += [_cfg("small", 16, 64, SWEEP, memory=no_loop, all_backends=False)]
        return {"configs": cfgs, "repeats": 3, "sketch_ranks": SKETCH_RANKS}
    presets = args.presets.split(",") if args.presets else (
        ["tiny", "small", "125m", "350m", "1b"] if args.device == "cuda" else ["tiny", "small", "125m"])
    T0 = 256 if args.device == "cuda" else 64
    cfgs = [_cfg("tiny", 64, 64, ALL)]
    cfgs += [_cfg("tiny", e, T0, SWEEP) for e in (16, 32, 64, 128, 256)]
    cfgs += [_cfg("tiny", 64, t, SWEEP) for t in (32, 128, 256, 512)]
    cfgs += [_cfg(p, 64, T0, SWEEP | {"sketch"}) for p in presets if p != "tiny"]
    return {"configs": cfgs, "repeats": 5, "sketch_ranks": SKETCH_RANKS}


def _run_into(score, target, out: dict) -> None:
    out["s"] = score(target)


def run_config(cfg: dict, args, repeats: int, sketch_ranks, with_dattri: bool, memory: bool) -> list[dict]:
    device = args.device
    dtype = getattr(torch, args.dtype)
    if cfg.get("model_path"):
        model = common.load_model(cfg["model_path"], dtype=dtype, device=device, pretrained=args.pretrained)
    else:
        model = common.make_llama(cfg["preset"], dtype=dtype, device=device)
    vocab = model.config.vocab_size
    tokens, adv, val = make_data(vocab, cfg["E"], cfg["T"], cfg["n_val"], cfg["T_val"], device)
    which = cfg["memory"] if memory else cfg["methods"]
    backends = None if cfg.get("all_backends", True) else fastest_backend(device)
    methods = build_methods(model, tokens, adv, val, which, device, sketch_ranks, with_dattri, backends)
    rows, scores = [], {}
    for m in methods:
        # The per-episode methods are slow: at most 3 timed calls after the warm-up. (One is not
        # enough: func's per-sample-gradient chunks are fresh mmaps whose page faults can triple a call.)
        reps = min(repeats, 3) if m.family in ("func", "loop") else repeats
        row = dict(preset=cfg["preset"], E=cfg["E"], T=cfg["T"], method=m.name, family=m.family,
                   backend=m.backend, mode=m.mode, rank=m.rank, note=m.note, **m.extra)
        if m.setup:
            m.setup()
        try:
            if memory:
                # (the timing pass already ran every code path once in this process: no warm-up here)
                row["target_peak_mb"] = common.peak_memory_mb(m.target, device) if m.target else None
                t = m.target() if m.target else None
                row["scoring_peak_mb"] = common.peak_memory_mb(functools.partial(m.score, t), device)
            else:
                if m.target:
                    row.update({f"target_{k}": v for k, v in
                                common.time_fn(m.target, 1, reps, device).items() if k == "median_s"})
                    t = m.target()
                else:
                    row["target_median_s"] = None
                    t = None
                out = {}
                res = common.time_fn(functools.partial(_run_into, m.score, t, out), 1, reps, device)
                row["scoring_median_s"] = res["median_s"]
                row["scoring_times_s"] = res["times_s"]
                row["target_included"] = m.target is None and m.family == "dattri"
                if out.get("s") is not None:
                    scores[m.name] = out["s"].detach().float().cpu()
                row["load_avg_1m"] = common.load_avg()[0] if common.load_avg() else None
        except Exception as e:
            if m.family == "ippo":
                raise
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            if m.teardown:
                m.teardown()
        rows.append(row)
        if not memory:
            print(f"  {cfg['preset']} E={cfg['E']} T={cfg['T']} {m.name}: target {common.fmt(row.get('target_median_s'))}"
                  f" s, scoring {common.fmt(row.get('scoring_median_s'))} s", flush=True)
        else:
            print(f"  {cfg['preset']} E={cfg['E']} T={cfg['T']} {m.name}: scoring peak "
                  f"{common.fmt(row.get('scoring_peak_mb'))} MiB", flush=True)
    if not memory:
        # The reference: ippo exact on the torch backend, else on whichever backend ran (the sweep).
        exact = [n for n in scores if n.startswith("ippo-exact[")]
        ref_name = "ippo-exact[torch]" if "ippo-exact[torch]" in scores else (exact[0] if exact else None)
        ref = scores.get(ref_name) if ref_name else None
        for row in rows:
            s = scores.get(row["method"])
            if ref is not None and s is not None:
                row.update(common.agreement(s, ref))
                row["agreement_ref"] = ref_name
            t, sc = row.get("target_median_s"), row.get("scoring_median_s")
            row["total_s"] = None if sc is None else sc + (t or 0.0)
    del model, methods
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Ratios per configuration: speedups against the loop and dattri-llm, memory against plain."""
    by_cfg: dict[tuple, list[dict]] = {}
    for r in rows:
        by_cfg.setdefault((r["preset"], r["E"], r["T"]), []).append(r)
    for group in by_cfg.values():
        named = {r["method"]: r for r in group}
        loop, dattri, plain = named.get("loop"), named.get("dattri"), named.get("plain")
        for r in group:
            tot = r.get("total_s")
            if tot:
                if loop and loop.get("total_s"):
                    r["speedup_vs_loop"] = loop["total_s"] / tot
                if dattri and dattri.get("total_s"):
                    r["speedup_vs_dattri"] = dattri["total_s"] / tot
            if plain and plain.get("scoring_peak_mb") and r.get("scoring_peak_mb") is not None:
                r["mem_vs_plain"] = r["scoring_peak_mb"] / plain["scoring_peak_mb"]
    return rows


def targets(rows: list[dict], main: dict) -> dict:
    """The issue's targets, evaluated on the headline configuration."""
    group = {r["method"]: r for r in rows if (r["preset"], r["E"], r["T"]) == (main["preset"], main["E"], main["T"])}
    out = {}
    for r in group.values():
        if r["family"] != "ippo" or r["mode"] != "target":
            continue
        be = r["backend"]
        loop, dattri, plain = group.get("loop"), group.get("dattri"), group.get("plain")
        d = {}
        if loop and r.get("total_s") and loop.get("total_s"):
            d["speedup_vs_loop"] = loop["total_s"] / r["total_s"]
            d["speedup_vs_loop_scoring_only"] = loop["scoring_median_s"] / r["total_s"]
            d["speedup_vs_loop_met"] = d["speedup_vs_loop"] >= 2.0
        if dattri and r.get("total_s") and dattri.get("total_s"):
            d["speedup_vs_dattri"] = dattri["total_s"] / r["total_s"]
            d["speedup_vs_dattri_met"] = d["speedup_vs_dattri"] >= 1.8
            inv = group.get("dattri-inv")
            if inv and inv.get("total_s"):
                d["speedup_vs_dattri_invasive"] = inv["total_s"] / r["total_s"]
        if plain and plain.get("scoring_peak_mb") and r.get("scoring_peak_mb") is not None:
            d["mem_vs_plain"] = r["scoring_peak_mb"] / plain["scoring_peak_mb"]
            d["mem_vs_plain_met"] = d["mem_vs_plain"] <= 1.1
        if r.get("spearman") is not None:
            d["spearman_q64"] = r["spearman"]
            d["spearman_q64_met"] = r["spearman"] >= 0.99
        out[be] = d
    return out


COLUMNS = ["method", "target_median_s", "scoring_median_s", "total_s", "speedup_vs_loop", "speedup_vs_dattri",
           "scoring_peak_mb", "mem_vs_plain", "max_rel_err", "spearman"]
SWEEP_COLUMNS = ["preset", "E", "T", "method", "total_s", "speedup_vs_loop", "scoring_peak_mb", "mem_vs_plain"]


def plots(out_dir: Path, rows: list[dict], stamp: str) -> list[str]:
    made = []
    tiny = [r for r in rows if r["preset"] == "tiny"]
    for axis, fixed_key, fixed in (("E", "T", 64), ("T", "E", 64)):
        pts = sorted({r[axis] for r in tiny if r[fixed_key] == fixed})
        if len(pts) < 2:
            continue
        names = [m for m in dict.fromkeys(r["method"] for r in tiny)
                 if sum(1 for r in tiny if r["method"] == m and r[fixed_key] == fixed) >= 2]
        for metric, ylabel, fname in (("total_s", "seconds (validation target included)", "time"),
                                      ("scoring_peak_mb", "scoring-pass peak memory (MiB)", "memory")):
            series = {}
            for m in names:
                vals = {r[axis]: r.get(metric) for r in tiny if r["method"] == m and r[fixed_key] == fixed}
                series[m] = (pts, [vals.get(p) for p in pts])
            p = common.plot_series(out_dir / f"scoring_{fname}_vs_{axis}_{stamp}.png", series, axis, ylabel,
                                   f"tiny Llama, {fixed_key}={fixed}: {fname} vs {axis}")
            if p:
                made.append(str(p))
    return made


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--presets", default=None, help="comma-separated presets for the size sweep (full mode)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--main-only", action="store_true", help="only the headline configuration (no sweep)")
    mine = p.add_argument_group("your model (instead of the presets): what will scoring cost on it?")
    mine.add_argument("--model", default=None,
                      help="a local Hugging Face model directory (config.json) or a .gguf file; random weights "
                           "from its config unless --pretrained (no download, no remote code)")
    mine.add_argument("--pretrained", action="store_true", help="load the model's own weights")
    mine.add_argument("--E", type=int, default=None, help="episodes (default 64)")
    mine.add_argument("--T", type=int, default=None, help="tokens per episode (default 64 on CPU, 256 on GPU)")
    mine.add_argument("--n-val", type=int, default=None, help="validation sequences (default 16)")
    mine.add_argument("--T-val", type=int, default=None, help="tokens per validation sequence (default 64)")
    mine.add_argument("--methods", default=None,
                      help=f"comma list from {','.join(sorted(ALL))} (default loop,dattri,plain,exact,target)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (scores accumulate in fp32 either way)")
    args = p.parse_args(argv)
    if not args.model and any(v is not None for v in (args.E, args.T, args.n_val, args.T_val, args.methods)):
        p.error("--E/--T/--n-val/--T-val/--methods apply to --model runs; the presets use the built-in sweep")
    if args.pretrained and not args.model:
        p.error("--pretrained needs --model")
    out_dir = common.setup(args)
    pl = plan(args)
    if args.main_only:
        pl["configs"] = pl["configs"][:1]
    repeats = args.repeats or pl["repeats"]
    with_dattri, dattri_note = dattri_available()
    env = common.environment(args.device)
    t_start = time.perf_counter()
    print(f"bench_scoring ({common.mode_name(args)}) on {env['device']}, {env['threads']} threads, "
          f"load {env['load_avg']}, {dattri_note}", flush=True)
    rows = []
    for cfg in pl["configs"]:
        rows += run_config(cfg, args, repeats, pl["sketch_ranks"], with_dattri, memory=False)
    if not args.no_memory:
        if args.device == "cpu":
            common.configure_cpu_allocator()
        mem_rows = []
        for cfg in pl["configs"]:
            mem_rows += run_config(cfg, args, repeats, pl["sketch_ranks"], with_dattri, memory=True)
        index = {(r["preset"], r["E"], r["T"], r["method"]): r for r in mem_rows}
        for r in rows:
            m = index.get((r["preset"], r["E"], r["T"], r["method"]), {})
            r["target_peak_mb"] = m.get("target_peak_mb")
            r["scoring_peak_mb"] = m.get("scoring_peak_mb")
            if m.get("error") and not r.get("error"):
                r["error"] = m["error"]
    summarize(rows)
    main_cfg = pl["configs"][0]
    result = {
        "benchmark": "scoring",
        "mode": common.mode_name(args),
        "env": env,
        "load_avg_end": common.load_avg(),
        "wall_s": time.perf_counter() - t_start,
        "settings": {"repeats": repeats, "warmup": 1, "configs": [{k: (sorted(v) if isinstance(v, set) else v)
                                                                 for k, v in c.items()} for c in pl["configs"]],
                     "presets": {c["preset"]: common.PRESETS.get(c["preset"]) or common.describe_model(
                                     c["model_path"], args.pretrained) for c in pl["configs"]},
                     "sketch_ranks": list(pl["sketch_ranks"]), "target_q": TARGET_Q, "dtype": args.dtype,
                     "timing": "median after 1 warm-up; total_s = target_s + scoring_s (validation target "
                               "included); dattri: one step with its validation pass inside",
                     "memory": common.memory_method(args.device),
                     "agreement_reference": "ippo-exact[torch] (ippo-exact on the compiled backend where only that ran)"},
        "dattri": dattri_note,
        "rows": rows,
        "targets": targets(rows, main_cfg),
    }
    stamp = common.mode_name(args) + (f"-model-{common.model_label(args.model)}" if args.model
                                      else "-main" if args.main_only else "")
    path = common.write_json(out_dir / f"scoring_{stamp}.json", result)
    main_rows = [r for r in rows if (r["preset"], r["E"], r["T"]) == (main_cfg["preset"], main_cfg["E"], main_cfg["T"])]
    print()
    print(common.table(main_rows, COLUMNS, f"{main_cfg['preset']}, E={main_cfg['E']}, T={main_cfg['T']}, "
                                           f"{main_cfg['n_val']} validation sequences, {args.dtype}"))
    others = [r for r in rows if r not in main_rows]
    if others:
        print()
        print(common.table(others, SWEEP_COLUMNS, "sweep"))
    print()
    for be, d in result["targets"].items():
        print(f"targets [{be}]: " + ", ".join(f"{k}={common.fmt(v)}" for k, v in d.items()))
    if not args.no_plots:
        result["plots"] = plots(out_dir, rows, stamp)
        common.write_json(path, result)
    print(f"\nwrote {path} ({result['wall_s']:.1f} s)")
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
