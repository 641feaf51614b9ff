"""Rollout throughput: the trainer's two engines (``rollout.engine=hf|vllm``) on the same prompts.

Both rows run the samplers the trainer runs (``ippo.rl.rollout.HFSampler``, ``ippo.rl.vllm_rollout.VLLMSampler``)
with the same prompts, seeds, temperature/top-p and response budget, on one model: ``--model PATH``, or by
default a random-weight Qwen2.5-0.5B-shaped directory written by ``scripts/write_random_model.py``
(no hub offline). A random model almost never samples EOS, so every episode runs to
``--max-new-tokens`` in both engines: equal work. Reported per engine: generated tokens per second of
the whole rollout call (vLLM: weight sync from the policy, wake, generate, sleep) and of generation
alone, over ``--repeats`` calls after one warm-up.

vLLM is an optional extra (``pip install -e .[vllm]``, CUDA only). Where it is not importable, or on the
CPU, its row records why it was skipped and the HF row is still measured.

    python benchmarks/bench_rollout.py                                    # GPU: 64 prompts x 8, 256 tokens
    python benchmarks/bench_rollout.py --model /models/Qwen2.5-0.5B-Instruct --prompts 32 --n 8
    python benchmarks/bench_rollout.py --smoke                            # CPU: tiny model, HF only
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_rollout.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common

DATA = common.TRAIN_DATA


def make_cfg(model_dir: str, args, dtype: str):
    from ippo.rl.config import load_config

    return load_config(None, [
        f"model.path={model_dir}", f"model.dtype={dtype}", f"data.train_path={DATA}", "data.val_holdout=4",
        "data.max_prompt_tokens=128", f"rollout.samples_per_prompt={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=0.6", "rollout.top_p=0.9",
        f"rollout.prompts_per_iter={args.prompts}", "device=auto",
        f"rollout.vllm.gpu_memory_utilization={args.gpu_memory_utilization}", "rollout.vllm.sleep_level=1"])


def prompts_and_seeds(tok, n_prompts: int) -> tuple[list[list[int]], list[int]]:
    from ippo.rl.data import PromptFormatter, derive_seed, load_jsonl

    rows = load_jsonl(DATA)
    chat = bool(getattr(tok, "chat_template", None))
    fmt = PromptFormatter(tok, "{question}\nLet's think step by step and end with '#### <answer>'.", chat)
    prompts = [fmt.prompt_ids(rows[i % len(rows)].question) for i in range(n_prompts)]
    return prompts, [derive_seed(0, "rollout", 0, i) for i in range(n_prompts)]


def measure(sampler, prompts, seeds, repeats: int, device: str) -> dict:
    walls, gens, tokens = [], [], []
    for rep in range(repeats + 1):  # the first call is a warm-up
        common.sync(device)
        t0 = time.perf_counter()
        out = sampler.sample(prompts, seeds)
        common.sync(device)
        wall = time.perf_counter() - t0
        if rep:
            walls.append(wall)
            gens.append(out.stats.get("time_vllm_generate", wall))
            tokens.append(sum(len(r) for r in out.responses))
    ntok = statistics.median(tokens)
    row = {"episodes": len(prompts) * sampler.rc.samples_per_prompt, "tokens": ntok,
           "wall_s": statistics.median(walls), "generate_s": statistics.median(gens)}
    row["tokens_per_s"] = ntok / row["wall_s"]
    row["generate_tokens_per_s"] = ntok / row["generate_s"]
    if out.logprobs:
        row["mean_logprob"] = float(torch.cat(out.logprobs).mean())
    return row


def vllm_skip_reason(device: str) -> str | None:
    if torch.device(device).type != "cuda":
        return "vLLM runs on CUDA GPUs only"
    if importlib.util.find_spec("vllm") is None:
        return ("vllm is not importable here: pip install -e .[vllm] (vLLM 0.32.0 + the CUDA build of torch "
                "2.13.0); a machine without a registry needs them as wheels")
    return None


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: a random Qwen2.5-0.5B shape)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per rollout (default 64; smoke 4)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default 8; smoke 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default 256; smoke 8)")
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = p.parse_args(argv)
    out_dir = common.setup(args)
    args.prompts = args.prompts or (4 if args.smoke else 64)
    args.n = args.n or (2 if args.smoke else 8)
    args.max_new_tokens = args.max_new_tokens or (8 if args.smoke else 256)
    reps = args.repeats or (1 if args.smoke else 2)
    device = args.device
    dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    env = common.environment(device)
    t_start = time.perf_counter()

    from ippo.rl.models import load_policy, load_tokenizer
    from ippo.rl.rollout import HFSampler

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.model_source(args.model)[0] if args.model else None  # clear error if missing
        if model_dir is None:
            sys.path.insert(0, str(common.ROOT / "scripts"))
            import write_random_model

            model_dir = str(write_random_model.write(Path(tmp) / "model", "tiny-qwen" if args.smoke else "qwen2.5-0.5b",
                                                     dtype))
        cfg = make_cfg(model_dir, args, dtype)
        tok = load_tokenizer(cfg.model, model_dir)
        policy = load_policy(cfg.model, model_dir, torch.device(device)).eval()
        prompts, seeds = prompts_and_seeds(tok, args.prompts)
        rows = []
        for engine in args.engines.split(","):
            row = {"engine": engine, "model": common.model_label(model_dir) if args.model else
                   ("random tiny-qwen" if args.smoke else "random Qwen2.5-0.5B shape")}
            try:
                if engine == "hf":
                    sampler = HFSampler(policy, tok, cfg.rollout)
                elif engine == "vllm":
                    reason = vllm_skip_reason(device)
                    if reason:
                        row["skipped"] = reason
                        rows.append(row)
                        print(f"vllm: skipped ({reason})", flush=True)
                        continue
                    from ippo.rl.vllm_rollout import VLLMSampler

                    sampler = VLLMSampler(cfg, policy, tok, model_dir, torch.device(device))
                else:
                    raise SystemExit(f"--engines: unknown engine {engine!r} (hf | vllm)")
                row.update(measure(sampler, prompts, seeds, reps, device))
            except Exception as e:  # noqa: BLE001 -- report a failing engine, keep the other row
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(row, flush=True)
    by = {r["engine"]: r for r in rows}
    if by.get("hf", {}).get("tokens_per_s") and by.get("vllm", {}).get("tokens_per_s"):
        by["vllm"]["speedup_vs_hf"] = by["vllm"]["tokens_per_s"] / by["hf"]["tokens_per_s"]
    result = {"benchmark": "rollout", "mode": common.mode_name(args), "env": env,
              "wall_s": time.perf_counter() - t_start, "load_avg_end": common.load_avg(),
              "settings": {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                           "temperature": 0.6, "top_p": 0.9, "dtype": dtype, "repeats": reps, "warmup": 1,
                           "gpu_memory_utilization": args.gpu_memory_utilization},
              "rows": rows}
    path = common.write_json(out_dir / f"rollout_{common.mode_name(args)}.json", result)
    cols = ["engine", "model", "episodes", "tokens", "wall_s", "tokens_per_s", "generate_tokens_per_s",
            "speedup_vs_hf", "skipped", "error"]
    print()
    print(common.table(rows, cols, "rollout throughput (generated tokens / s)"))
    print(f"\nwrote {path} ({result['wall_s']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
