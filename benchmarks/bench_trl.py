"""ippo's PPO and I-PPO iteration against TRL's GRPOTrainer (1.16) and PPOTrainer (1.12), on one setup.

One shared setup: a random-weight Llama of about 1M parameters (``ippo.rl.models.build_tiny_llama``: 160 wide,
4 layers, its character-level tokenizer), E = 64 sequences per step (8 prompts x 8 samples), exactly T = 32
sampled tokens each, fp32, the same threads. The model's generation config carries ``min_new_tokens = T``
(and TRL's trainers are told so too), so EOS never ends a response early and every method samples E x T
tokens. Rows, each timed per step as the median over the steps after the first (warm-up):

* floors: one bare ``model.generate`` of E x T tokens; one forward+backward of the E sequences;
* ippo PPO (GAE critic + frozen reference, influence off), ippo I-PPO (influence on, exact scores, every
  episode kept with weight 1 so the update does the same work), ippo GRPO (no critic, no reference): the
  real trainer (``ippo.rl.loop.train``) with ``trainer_setup.overrides`` plus one PPO epoch over one
  mini-batch (= one micro-batch) of E episodes; per-phase times from its ``metrics.jsonl``;
* TRL 1.16 ``GRPOTrainer`` (beta = 0 as TRL defaults: no reference; num_iterations = 1; one optimizer step
  on the E completions), a trivial Python reward; timed by a ``TrainerCallback`` from on_step_begin to
  on_step_end;
* TRL 1.12 ``PPOTrainer`` (removed from TRL in 1.13; policy, reference, value model and reward model, the
  last two ``AutoModelForSequenceClassification`` of the same config with a random score head;
  num_ppo_epochs = 1, num_mini_batches = 1, stop_token none), timed from one on_step_end to the next (its
  loop calls no on_step_begin). Its two ``gc.collect()`` calls per step are timed, and the step is also
  reported without them.

Each TRL trainer runs in its own subprocess; the PPO one with ``PYTHONPATH=<the 1.12 folder>``, which
shadows the 1.16 installed in the environment. ``bash benchmarks/install_trl.sh`` installs both
(``TRL_112_DIR`` moves the 1.12 folder, default ``benchmarks/.trl-1.12``). A TRL that is not installed
gives a row ``{"skipped": reason}``; the script still succeeds.

Goals (issue 6): ippo's PPO iteration <= 0.5x TRL's PPO step and <= 1.3x TRL's GRPO step.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_trl.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common, trainer_setup

TRL_112_DIR = Path(os.environ.get("TRL_112_DIR") or common.ROOT / "benchmarks" / ".trl-1.12")
PROMPT_TEMPLATE = "q: {question}\na:"  # the template trainer_setup.overrides gives the trainer
GOALS = (("ippo PPO <= 0.5x TRL PPO step", "trl-ppo", 0.5), ("ippo PPO <= 1.3x TRL GRPO step", "trl-grpo", 1.3))
GOAL_PPO_ROWS = (("ippo-ppo", "separate critic"), ("ippo-ppo-shared", "shared critic"))  # each checked against GOALS
INSTALL = "bash benchmarks/install_trl.sh"


def plan(args) -> dict:
    if args.smoke:
        p = {"hidden": 32, "layers": 2, "E": 8, "G": 4, "T": 8, "steps": 2, "floor_repeats": 1}
    else:
        p = {"hidden": 160, "layers": 4, "E": 64, "G": 8, "T": 32, "steps": 11 if args.quick else 21,
             "floor_repeats": 5 if args.quick else 10}
    if args.repeats:
        p["steps"], p["floor_repeats"] = args.repeats + 1, args.repeats
    return p


# ----------------------------------------------------------------------------- shared setup
def make_model(work: Path, pl: dict) -> Path:
    """build_tiny_llama at the planned size; its generation config forces exactly T new tokens."""
    from transformers import GenerationConfig

    from ippo.rl.models import build_tiny_llama

    d = build_tiny_llama(work / "model", seed=0, hidden=pl["hidden"], layers=pl["layers"])
    gen = GenerationConfig.from_pretrained(d)
    gen.min_new_tokens = pl["T"]  # EOS is masked out for the first T tokens: no response ends early
    gen.save_pretrained(d)
    return d


def prompts(n: int) -> list[str]:
    """n prompts in the trainer's format, cycling through the arithmetic questions bench_step trains on."""
    rows = [json.loads(line) for line in common.TRAIN_DATA.read_text().splitlines() if line.strip()]
    return [PROMPT_TEMPLATE.replace("{question}", rows[i % len(rows)]["question"]) for i in range(n)]


def load_tok(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"  # prompts are left-padded for generation everywhere
    return tok


def load_tok_model(model_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    return load_tok(model_dir), AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


# ----------------------------------------------------------------------------- floors
def floors(model_dir: Path, pl: dict, args) -> list[dict]:
    """Bare generate of E x T tokens and one forward+backward of the E sequences (no trainer around them)."""
    tok, model = load_tok_model(model_dir, args.device)
    E, G, T = pl["E"], pl["G"], pl["T"]
    enc = tok(prompts(E // G), return_tensors="pt", padding=True).to(args.device)
    P = enc["input_ids"].shape[1]
    out = {}

    @torch.no_grad()
    def gen():
        model.eval()
        out["seq"] = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=T,
                                    min_new_tokens=T, num_return_sequences=G, use_cache=True,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    tg = common.time_fn(gen, warmup=1, repeats=pl["floor_repeats"], device=args.device)
    seq = out["seq"]
    if tuple(seq.shape) != (E, P + T):
        raise RuntimeError(f"generate returned {tuple(seq.shape)}, expected {(E, P + T)}")
    attn = torch.cat([enc["attention_mask"].repeat_interleave(G, 0), torch.ones(E, T, dtype=torch.long,
                                                                                  device=args.device)], 1)

    def fwd_bwd():
        model.train()
        logits = model(input_ids=seq, attention_mask=attn, use_cache=False).logits[:, P - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, P:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    tb = common.time_fn(fwd_bwd, warmup=1, repeats=pl["floor_repeats"], device=args.device)
    la = common.load_avg()
    return [{"method": "floor: bare generate", "key": "floor-generate", "framework": "torch",
             "step_s": tg["median_s"], "times_s": tg["times_s"], "load_avg_1m": la[0] if la else None,
             "note": f"model.generate, {E // G} prompts x {G} samples x {T} tokens, KV cache, sampling"},
            {"method": "floor: one forward+backward", "key": "floor-fwd-bwd", "framework": "torch",
             "step_s": tb["median_s"], "times_s": tb["times_s"], "load_avg_1m": la[0] if la else None,
             "note": f"{E} sequences of {P}+{T} tokens, token-mean cross-entropy on the response"}]


# ----------------------------------------------------------------------------- ippo
IPPO_RUNS = (  # key, method, influence, extra overrides
    ("ippo-ppo", "ippo PPO (critic + ref)", False, []),
    ("ippo-ppo-shared", "ippo PPO, shared critic (+ ref)", False, ["ppo.critic=shared"]),
    ("ippo-ippo", "ippo I-PPO exact (critic + ref)", True, []),
    ("ippo-ippo-in-update", "ippo I-PPO exact, in_update (critic + ref)", True,
     ["influence.timing=in_update", "influence.episode_loss=policy"]),
    ("ippo-ippo-in-update-shared", "ippo I-PPO exact, in_update, shared critic (+ ref)", True,
     ["influence.timing=in_update", "influence.episode_loss=all", "ppo.critic=shared"]),
    ("ippo-grpo", "ippo GRPO (no critic, no ref)", False, ["ppo.advantage=grpo", "ppo.kl_coef=0.0"]),
)


def ippo_overrides(pl: dict) -> list[str]:
    """What this comparison changes in trainer_setup.overrides: TRL-like batch layout, one epoch, one optimizer step."""
    E, G = pl["E"], pl["G"]
    return [f"rollout.prompts_per_iter={E // G}", f"rollout.samples_per_prompt={G}", f"rollout.forward_batch={E}",
            "ppo.epochs=1", f"ppo.mini_batch_size={E}", f"ppo.micro_batch_size={E}"]


def run_ippo(key: str, method: str, influence: bool, extra: list[str], model_dir: Path, work: Path, pl: dict,
             args) -> dict:
    """The real trainer (trainer_setup's overrides + this comparison's); per-phase medians after the first iteration."""
    from ippo.rl.config import load_config
    from ippo.rl.loop import train

    c = {"hidden": pl["hidden"], "layers": pl["layers"], "E": pl["E"], "T": pl["T"], "mode": "exact", "rank": 64}
    run_dir = work / f"run-{key}"
    ov = trainer_setup.overrides(c, model_dir, run_dir, influence, pl["steps"], args) + ippo_overrides(pl) + extra
    t0 = time.perf_counter()
    train(load_config(None, ov))
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = recs[1:] if len(recs) > 1 else recs  # the first iteration is the warm-up
    times = [r["time_iteration"] for r in timed]
    la = common.load_avg()
    row = {"method": method, "key": key, "framework": "ippo", "step_s": statistics.median(times),
           "times_s": times, "steps_timed": len(times), "wall_s": wall, "load_avg_1m": la[0] if la else None,
           "phases_s": {ph: statistics.median([r.get(f"time_{ph}", 0.0) for r in timed])
                        for ph in trainer_setup.PHASES},
           "episodes": timed[-1]["episodes"], "kept_frac": timed[-1]["kept_frac"],
           "response_len": statistics.mean(r["response_len"] for r in timed),
           "overrides": ippo_overrides(pl) + extra}
    row["generate_s"] = row["phases_s"]["generate"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


# ----------------------------------------------------------------------------- TRL (subprocess workers)
class _Events:
    """(name, start, duration) of timed calls, summed per step interval afterwards."""

    def __init__(self):
        self.items: list[tuple[str, float, float]] = []

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.items.append((name, t0, time.perf_counter() - t0))

        setattr(obj, attr, timed)

    def within(self, name: str, a: float, b: float) -> tuple[float, int]:
        hits = [d for n, s, d in self.items if n == name and a <= s < b]
        return sum(hits), len(hits)


def _step_timer(events: _Events):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start, self.begins, self.ends, self.threads = None, [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.threads = torch.get_num_threads()

    return StepTimer()


def _summary(events: _Events, intervals: list[tuple[float, float]], warmup: int = 1) -> dict:
    timed = intervals[warmup:] if len(intervals) > warmup else intervals
    times = [b - a for a, b in timed]
    gc_s = [events.within("gc", a, b)[0] for a, b in timed]
    gen_s = [events.within("generate", a, b)[0] for a, b in timed]
    return {"step_s": statistics.median(times), "times_s": times, "steps_timed": len(times),
            "gc_s": statistics.median(gc_s), "gc_calls_per_step": statistics.median(
                [events.within("gc", a, b)[1] for a, b in timed]),
            "step_no_gc_s": statistics.median([t - g for t, g in zip(times, gc_s)]),
            "generate_s": statistics.median(gen_s)}


def _worker_grpo(spec: dict, events: _Events) -> dict:
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    E, G, T, steps = spec["E"], spec["G"], spec["T"], spec["steps"]
    tok, model = load_tok_model(Path(spec["model_dir"]), spec["device"])
    events.wrap(model, "generate", "generate")
    lengths: list[int] = []

    def reward_digits(completions, completion_ids, **kwargs):  # trivial Python reward: share of digits
        lengths.extend(len(c) for c in completion_ids)
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    cfg = GRPOConfig(
        output_dir=spec["work"], per_device_train_batch_size=E, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=T, max_steps=steps, learning_rate=1e-4, beta=0.0, num_iterations=1,
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": T},
        use_cpu=spec["device"] == "cpu", bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    timer = _step_timer(events)
    ds = Dataset.from_dict({"prompt": prompts(steps * (E // G))})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_digits, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    torch.set_num_threads(spec["threads"])
    trainer.train()
    out = _summary(events, list(zip(timer.begins, timer.ends)))
    out.update(trl_version=trl.__version__, trl_path=str(Path(trl.__file__).parent), threads=timer.threads,
               completion_len_mean=statistics.mean(lengths), completions_per_step=len(lengths) / max(1, steps),
               interval_end_to_end_s=statistics.median([b - a for a, b in itertools.pairwise(timer.ends)])
               if len(timer.ends) > 1 else None,
               config={"per_device_train_batch_size": E, "num_generations": G, "max_completion_length": T,
                       "beta": cfg.beta, "num_iterations": cfg.num_iterations, "loss_type": cfg.loss_type,
                       "steps_per_generation": cfg.steps_per_generation, "gradient_checkpointing": False,
                       "bf16": False, "generation_kwargs": {"min_new_tokens": T}})
    return out


def _worker_ppo(spec: dict, events: _Events) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    E, T, steps = spec["E"], spec["T"], spec["steps"]
    d = Path(spec["model_dir"])
    tok, policy = load_tok_model(d, spec["device"])
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1, dtype=torch.float32)
    events.wrap(policy, "generate", "generate")

    class TimedGC:  # stands in for the gc module inside ppo_trainer only
        def __getattr__(self, name):
            import gc

            return getattr(gc, name)

    import gc as _gc

    tgc = TimedGC()
    tgc.collect = _gc.collect
    events.wrap(tgc, "collect", "gc")
    ppo_mod.gc = tgc
    cfg = PPOConfig(
        output_dir=spec["work"], per_device_train_batch_size=E, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=1, total_episodes=E * steps, response_length=T, stop_token=None, temperature=1.0,
        local_rollout_forward_batch_size=E, num_sample_generations=0, learning_rate=1e-4,
        use_cpu=spec["device"] == "cpu", bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    ids = [tok(p).input_ids for p in prompts(E * steps)]
    timer = _step_timer(events)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=Dataset.from_dict({"input_ids": ids}),
                         eval_dataset=Dataset.from_dict({"input_ids": ids[:E]}), value_model=value,
                         callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    resp_lens = []
    orig_bg = ppo_mod.batch_generation

    def bg(model, queries, *a, **kw):
        qr, logits = orig_bg(model, queries, *a, **kw)
        resp_lens.append(qr.shape[1] - queries.shape[1])
        return qr, logits

    ppo_mod.batch_generation = bg
    torch.set_num_threads(spec["threads"])
    trainer.train()
    ends = [timer.start, *timer.ends]
    out = _summary(events, list(itertools.pairwise(ends)))
    out.update(trl_version=trl.__version__, trl_path=str(Path(trl.__file__).parent), threads=timer.threads,
               completion_len_mean=statistics.mean(resp_lens) if resp_lens else None,
               completions_per_step=E,
               config={"per_device_train_batch_size": E, "num_mini_batches": 1, "num_ppo_epochs": cfg.num_ppo_epochs,
                       "response_length": T, "stop_token": None, "kl_coef": cfg.kl_coef,
                       "kl_estimator": cfg.kl_estimator, "vf_coef": cfg.vf_coef, "gradient_checkpointing": False,
                       "bf16": False, "num_sample_generations": 0})
    return out


def trl_worker(spec_path: str) -> int:
    """Entry of a TRL subprocess: run one trainer and write its summary (or why it was skipped) as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    events = _Events()
    try:
        import trl  # noqa: F401
    except ImportError as e:
        res = {"skipped": f"TRL is not importable ({e}); {INSTALL}"}
    else:
        try:
            res = (_worker_grpo if spec["kind"] == "grpo" else _worker_ppo)(spec, events)
        except ImportError as e:
            res = {"skipped": f"this TRL has no {'GRPOTrainer' if spec['kind'] == 'grpo' else 'PPOTrainer'} "
                              f"({e}); {INSTALL}"}
    common.write_json(Path(spec["out"]), res)
    return 0


TRL_RUNS = (("trl-grpo", "TRL 1.16 GRPOTrainer", "grpo"), ("trl-ppo", "TRL 1.12 PPOTrainer", "ppo"))


def trl_missing(kind: str) -> str | None:
    """Why this TRL run cannot start (None when it can)."""
    if kind == "grpo":
        if importlib.util.find_spec("trl") is None:
            return f"TRL is not installed in this environment ({INSTALL})"
        return None
    if not (TRL_112_DIR / "trl" / "__init__.py").is_file():
        return f"TRL 1.12 is not installed at {TRL_112_DIR} ({INSTALL}; TRL_112_DIR moves it)"
    return None


def start_trl(kind: str, model_dir: Path, work: Path, pl: dict, args) -> tuple[subprocess.Popen, Path]:
    out = work / f"trl-{kind}.json"
    spec = {"kind": kind, "model_dir": str(model_dir), "work": str(work / f"trl-{kind}-out"), "out": str(out),
            "E": pl["E"], "G": pl["G"], "T": pl["T"], "steps": pl["steps"], "threads": args.threads,
            "device": args.device}
    spec_path = work / f"trl-{kind}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        ([str(TRL_112_DIR)] if kind == "ppo" else []) + [str(common.ROOT)] + ([env["PYTHONPATH"]] if env.get(
            "PYTHONPATH") else []))
    with open(work / f"trl-{kind}.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec_path),
                                 "--threads", str(args.threads)], cwd=common.ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    return proc, out


def finish_trl(proc: subprocess.Popen, out: Path, timeout: float) -> dict:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    if rc == 0 and out.is_file():
        return json.loads(out.read_text())
    log = out.with_suffix(".log")
    tail = log.read_text()[-2000:] if log.is_file() else ""
    return {"error": f"TRL subprocess exited with {rc}: {tail}"}


# ----------------------------------------------------------------------------- main
def goals(by_key: dict) -> list[dict]:
    """Each goal for each ippo PPO critic (GOAL_PPO_ROWS): ippo's iteration / TRL's step against its limit."""
    out = []
    for ppo_key, critic in GOAL_PPO_ROWS:
        ppo = by_key.get(ppo_key, {}).get("step_s")
        for name, key, limit in GOALS:
            r = by_key.get(key, {})
            g = {"goal": f"{name} ({critic})", "limit": limit}
            if not ppo or not r.get("step_s"):
                out.append({**g, "ratio": None, "status": "not measured",
                            "why": r.get("skipped") or r.get("error") or "no ippo PPO time"})
                continue
            out.append(_goal(g, ppo, r, key))
    return out


def _goal(g: dict, ppo: float, r: dict, key: str) -> dict:
    ratio, limit = ppo / r["step_s"], g["limit"]
    g = {**g, "ratio": ratio, "status": "met" if ratio <= limit else "missed"}
    if key == "trl-ppo" and r.get("step_no_gc_s"):  # also against TRL's step without its gc.collect() calls
        g["ratio_vs_no_gc"] = ppo / r["step_no_gc_s"]
        g["status_vs_no_gc"] = "met" if g["ratio_vs_no_gc"] <= limit else "missed"
    return g


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)  # internal: one TRL subprocess
    args = p.parse_args(argv)
    if args.trl_worker:
        torch.set_num_threads(args.threads)
        raise SystemExit(trl_worker(args.trl_worker))
    out_dir = common.setup(args)
    pl = plan(args)
    env = common.environment(args.device)
    print(f"bench_trl ({common.mode_name(args)}) on {env['device']}, {env['threads']} threads, load {env['load_avg']}",
          flush=True)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ippo-bench-trl-"))
    rows: list[dict] = []
    try:
        model_dir = make_model(work, pl)
        n_params = common.saved_params(model_dir)
        enc_lens = [len(ids) for ids in load_tok(model_dir)(prompts(48)).input_ids]
        trl_rows = {key: {"method": m, "key": key, "framework": "trl", "skipped": why}
                    for key, m, kind in TRL_RUNS if (why := trl_missing(kind))}
        todo = [(key, m, kind) for key, m, kind in TRL_RUNS if key not in trl_rows]
        # --smoke: the TRL subprocesses run beside the rest (timings are not checked there); otherwise one at a time
        procs = {key: start_trl(kind, model_dir, work, pl, args) for key, m, kind in todo} if args.smoke else {}
        for key, method, influence, extra in IPPO_RUNS:
            rows.append(run_ippo(key, method, influence, extra, model_dir, work, pl, args))
            print(f"  {method}: {common.fmt(rows[-1]['step_s'])} s / iteration", flush=True)
        rows += floors(model_dir, pl, args)
        for key, m, kind in todo:
            proc, out = procs[key] if key in procs else start_trl(kind, model_dir, work, pl, args)
            la = common.load_avg()
            res = finish_trl(proc, out, timeout=900)
            trl_rows[key] = {"method": m, "key": key, "framework": "trl", **res,
                             "load_avg_1m": la[0] if la else None}
            print(f"  {m}: " + (f"{common.fmt(res['step_s'])} s / step" if "step_s" in res
                                else f"{'skipped' if 'skipped' in res else 'error'}: "
                                     f"{res.get('skipped') or res.get('error')}"), flush=True)
        rows += [trl_rows[key] for key, _, _ in TRL_RUNS]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by_key = {r["key"]: r for r in rows}
    ppo = by_key["ippo-ppo"]["step_s"]
    noisy = []
    for r in rows:
        r["ippo_ppo_ratio"] = ppo / r["step_s"] if r.get("step_s") else None
        if r.get("times_s"):
            r["min_s"] = min(r["times_s"])
            r["median_over_min"] = r["step_s"] / r["min_s"] if r["min_s"] > 0 else None
            if not args.smoke and (r["median_over_min"] or 0) > 1.3:
                noisy.append(r["method"])
    gl = goals(by_key)
    result = {
        "benchmark": "trl",
        "mode": common.mode_name(args),
        "env": env,
        "load_avg_end": common.load_avg(),
        "wall_s": time.perf_counter() - t_start,
        "versions": {"trl_grpo": by_key["trl-grpo"].get("trl_version"),
                     "trl_ppo": by_key["trl-ppo"].get("trl_version"), "trl_112_dir": str(TRL_112_DIR)},
        "settings": {
            "model": f"build_tiny_llama(hidden={pl['hidden']}, layers={pl['layers']}), random weights, "
                     "character-level tokenizer, fp32",
            "params": n_params, **{k: pl[k] for k in ("hidden", "layers", "E", "G", "T", "steps", "floor_repeats")},
            "prompt_tokens": [min(enc_lens), max(enc_lens)],
            "prompt_template": PROMPT_TEMPLATE,
            "tokens": "exactly T new tokens per sequence: generation config min_new_tokens = max_new_tokens = T",
            "timing": "median over the steps after the first; ippo: time_iteration from metrics.jsonl; TRL GRPO: "
                      "on_step_begin -> on_step_end; TRL PPO: on_step_end -> next on_step_end (includes its "
                      "two gc.collect() calls, also timed); floors: common.time_fn, 1 warm-up",
            "ippo_overrides": "trainer_setup.overrides + " + " ".join(ippo_overrides(pl)),
            "isolation": "each TRL trainer in its own subprocess; PPO with PYTHONPATH=<trl 1.12 folder>",
        },
        "rows": rows,
        "goals": gl,
        "noisy_rows": noisy,  # median > 1.3x min: the machine was busy while they ran (2 threads on 2 cores)
    }
    path = common.write_json(out_dir / f"trl_{result['mode']}.json", result)
    for r in rows:
        r["gc_or_note"] = (f"gc {common.fmt(r['gc_s'])} s; no gc {common.fmt(r['step_no_gc_s'])} s"
                           if r.get("gc_s") else r.get("skipped") or (r.get("error", "")[:60] or None))
    print()
    print(common.table(rows, ["method", "step_s", "min_s", "ippo_ppo_ratio", "generate_s", "gc_or_note"],
                       f"ippo vs TRL, one step (E={pl['E']}, T={pl['T']}, {n_params / 1e6:.2f}M params; seconds, "
                       "medians; ippo_ppo_ratio = ippo PPO iteration / this)"))
    print()
    ph = [{"method": r["method"], **r["phases_s"], "step_s": r["step_s"]} for r in rows if r["framework"] == "ippo"]
    print(common.table(ph, ["method", *trainer_setup.PHASES, "step_s"], "ippo phases (seconds, medians)"))
    print()
    print(common.table(gl, ["goal", "limit", "ratio", "status", "ratio_vs_no_gc", "status_vs_no_gc"], "Goals"))
    for r in rows:
        r.pop("gc_or_note", None)
    if noisy:
        print(f"\nWARNING: noisy timings (median > 1.3x min; load {common.load_avg()}): {', '.join(noisy)}")
    if not args.no_plots:
        plot = plot_steps(out_dir / f"trl_step_{result['mode']}.png", rows, pl, n_params)
        result["plots"] = [str(plot)] if plot else []
        common.write_json(path, result)
    print(f"\nwrote {path} ({result['wall_s']:.1f} s)")
    return result


def plot_steps(path: Path, rows: list[dict], pl: dict, n_params: int) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("step_s")]
    if not sel:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(sel) + 1.2), dpi=110)
    ys = list(range(len(sel)))[::-1]
    ax.barh(ys, [r["step_s"] for r in sel], color=["C0" if r["framework"] == "ippo" else "C1"
                                                   if r["framework"] == "trl" else "C7" for r in sel])
    for y, r in zip(ys, sel):
        if r.get("gc_s"):
            ax.barh(y, r["gc_s"], left=r["step_s"] - r["gc_s"], color="C3", label="gc.collect()")
    ax.set_yticks(ys, [r["method"] for r in sel], fontsize=7)
    ax.set_xlabel("seconds per step (median)")
    ax.set_title(f"one step, E={pl['E']} x T={pl['T']} tokens, {n_params / 1e6:.2f}M-param Llama, fp32", fontsize=9)
    if any(r.get("gc_s") for r in sel):
        ax.legend(fontsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
