"""The trainer run that ``bench_step.py`` times and ``bench_trl.py`` compares with TRL: its config overrides.

Both benchmarks import this module (``bench_step --vs-trl`` runs ``bench_trl``; never the other way).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common

# the per-phase wall times the trainer logs in metrics.jsonl (``time_<phase>``)
PHASES = ("generate", "ref_old_logprobs", "val_grad", "scoring", "update")


def overrides(c: dict, model_dir: Path, run_dir: Path, influence: bool, iterations: int, args,
              timing: str = "before_update", episode_loss: str = "pg", extra: tuple[str, ...] = ()) -> list[str]:
    """``key=value`` overrides of one trainer run for configuration ``c`` (hidden, layers, E, T, mode, rank):
    the arithmetic prompts, E episodes of T tokens, two PPO epochs; I-PPO (``influence``) keeps every episode
    with weight 1, so PPO and I-PPO update on the same episodes."""
    samples = 4 if c["E"] >= 4 else 1
    model_dir, kw = common.model_source(str(model_dir))  # a .gguf (--model): its folder + model.gguf_file
    return [*(f"model.{k}={v}" for k, v in kw.items()),
        f"run_dir={run_dir}", "seed=0", f"iterations={iterations}", f"device={args.device}",
        f"threads={args.threads}", f"model.path={model_dir}", "model.dtype=float32",
        f"data.train_path={common.TRAIN_DATA}", "data.val_holdout=8", "data.max_prompt_tokens=64",
        "data.prompt_template='q: {question}\\na:'",
        f"rollout.prompts_per_iter={max(1, c['E'] // samples)}", f"rollout.samples_per_prompt={samples}",
        f"rollout.max_new_tokens={c['T']}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        # the scoring forward holds its activations like an update micro-batch: the same size keeps the
        # memory comparison fair (forward_batch = E would hold twice the update's activations)
        f"rollout.forward_batch={max(1, c['E'] // 2)}", "reward.fn=contains",
        "ppo.epochs=2", f"ppo.mini_batch_size={max(1, c['E'] // 2)}", f"ppo.micro_batch_size={max(1, c['E'] // 2)}",
        "ppo.lr=1.0e-4", "ppo.kl_coef=1.0e-4",
        f"influence.enabled={'true' if influence else 'false'}", f"influence.mode={c['mode']}",
        f"influence.rank={c['rank']}", "influence.n_val=8", "influence.filter=bottom_fraction",
        "influence.fraction=0.0", "influence.reweight=false", "influence.on_empty=skip",
        f"influence.timing={timing}", f"influence.episode_loss={episode_loss}", "eval.every=0", "log.tensorboard=false", "log.progress=false", "log.influence_log=false",
        f"checkpoint.every={iterations + 1}", "checkpoint.keep_last=1", *extra,
    ]
