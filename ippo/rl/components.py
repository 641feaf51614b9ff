"""What one run is built from: data, models, rollout engine, influence scorer, optimizer, and its resume state.

``build(cfg)`` makes them in a fixed order -- data and config errors first (before any model loads), then
the models under a seeded generator (LoRA adapters and value heads start equal on every rank and in every
run), FSDP2 sharding before the engine hooks the layers and the optimizer takes the parameters -- and
``restore(components)`` loads the newest checkpoint that verifies. The loop (``ippo.rl.loop``) only reads them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ippo.errors import ConfigError
from ippo.influence import InfluenceEngine
from ippo.rl.advantages import ADVANTAGE_ESTIMATORS
from ippo.rl.checkpoint import restore_checkpoint, save_checkpoint, save_sharded_checkpoint, warn
from ippo.rl.config import TrainConfig
from ippo.rl.data import Example, PromptFormatter, check_prompt_lengths, derive_seed, load_split
from ippo.rl.filters import MATCHED_FILTERS, MatchedSchedule, load_matched_schedule
from ippo.rl.gold_sft import GoldSFT
from ippo.rl.models import (
    SharedValueHead,
    load_policy,
    load_reference,
    load_tokenizer,
    load_value_model,
    resolve_path,
    trainable_parameters,
)
from ippo.rl.parallel import distributed as dist
from ippo.rl.parallel import fsdp
from ippo.rl.rewards import RewardFn, load_callable, make_reward_fn
from ippo.rl.rollout import HFSampler, Sampler
from ippo.rl.run_dir import check_resumed_state
from ippo.rl.scoring import InfluenceScorer
from ippo.rl.step_guard import StepGuard


@dataclass(frozen=True)
class Layout:
    """Which episodes of an iteration this rank owns: prompts ``lo:hi`` of B, episodes ``e0 : e0 + E_local`` of E."""

    B: int  # prompts per iteration (global)
    n: int  # samples per prompt
    lo: int
    hi: int

    @property
    def E(self) -> int:
        return self.B * self.n

    @property
    def E_local(self) -> int:
        return (self.hi - self.lo) * self.n

    @property
    def e0(self) -> int:
        return self.lo * self.n

    def owns(self, episode: int) -> bool:
        return self.e0 <= episode < self.e0 + self.E_local


@dataclass
class TaskData:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    reward_fn: RewardFn
    tok: object
    fmt: PromptFormatter
    model_path: str
    matched: MatchedSchedule | None  # control.filter=random: the I-PPO run whose kept counts it copies

    @property
    def pad(self) -> int:
        return self.tok.pad_token_id


@dataclass
class Components:
    cfg: TrainConfig
    device: torch.device
    layout: Layout
    data: TaskData
    policy: torch.nn.Module
    critic: torch.nn.Module | None  # a separate value model, or the shared head (then also `value_head`)
    value_head: SharedValueHead | None
    ref: torch.nn.Module | None
    sampler: Sampler
    scorer: InfluenceScorer | None
    gold_sft: GoldSFT | None  # control.sft_coef > 0
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter] = field(default_factory=list)
    step_guard: StepGuard = field(default_factory=StepGuard)  # undoes an optimizer step that leaves NaN/Inf weights

    @property
    def sharded(self) -> bool:  # one process: nothing to shard
        return self.cfg.dist.strategy == "fsdp" and dist.world_size() > 1

    @property
    def in_update(self) -> bool:
        return self.scorer is not None and self.cfg.influence.timing == "in_update"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


@dataclass
class RunState:
    """What carries from one iteration to the next (and through a checkpoint)."""

    iteration: int = 0  # iterations done
    stopped: str | None = None  # why the run stopped (empty buffer, divergence, low kept fraction), once it has
    nonfinite_streak: int = 0  # optimizer steps skipped as NaN/Inf in a row
    nonfinite_reason: str | None = None  # set when skipped steps (or NaN scores) stop the run
    low_kept_streak: int = 0  # iterations in a row whose kept fraction was below influence.stop_kept_frac
    train_seconds: float = 0.0  # wall time of the iterations so far (rollout, scoring, update; not evaluation)


def build(cfg: TrainConfig) -> Components:
    """Everything a run needs, in an order that surfaces config and data errors before any model loads."""
    device = dist.init_from_env(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = dist.world_size()
    B = cfg.rollout.prompts_per_iter
    if B % world:
        raise ConfigError(f"rollout.prompts_per_iter={B} must be divisible by the number of processes ({world})")
    if cfg.influence.enabled and cfg.influence.n_val < world:
        raise ConfigError(f"influence.n_val={cfg.influence.n_val} must be >= the number of processes ({world})")
    data = load_task_data(cfg)
    policy, critic, value_head, ref = load_models(cfg, data.model_path, device)
    sampler = make_sampler(cfg, policy, data.tok, data.model_path, device, value_head)
    scorer = None
    if cfg.influence.enabled:
        engine = InfluenceEngine(policy, rank=cfg.influence.rank, seed=cfg.seed, backend=cfg.influence.backend)
        scorer = InfluenceScorer(engine, cfg)
    gold_sft = None
    if cfg.control.sft_coef > 0:
        gold_sft = GoldSFT(cfg.control.sft_coef, policy, data.fmt, data.pad, data.val, cfg.influence.n_val, cfg.seed,
                           cfg.influence.val_batch, device, lockstep=cfg.dist.strategy == "fsdp" and world > 1)
    params, optimizer, scheduler = make_optimizer(cfg, policy, critic)
    lo, hi = dist.shard(B)
    return Components(cfg, device, Layout(B, cfg.rollout.samples_per_prompt, lo, hi), data, policy, critic,
                      value_head, ref, sampler, scorer, gold_sft, optimizer, scheduler, params)


def load_task_data(cfg: TrainConfig) -> TaskData:
    """Splits (validation: ``data.val_path`` or the last ``val_holdout`` train rows), reward, tokenizer."""
    train_rows = load_split(cfg.data, "train", cfg.data.max_train_rows)
    val_rows = []
    if cfg.data.val_path:
        val_rows = load_split(cfg.data, "val")
    elif cfg.data.val_holdout:
        if cfg.data.val_holdout >= len(train_rows):
            raise ConfigError(f"data.val_holdout={cfg.data.val_holdout} leaves no training rows")
        val_rows, train_rows = train_rows[-cfg.data.val_holdout:], train_rows[:-cfg.data.val_holdout]
    test_rows = []
    if cfg.data.test_path and cfg.eval.every > 0:
        test_rows = load_split(cfg.data, "test", cfg.data.max_test_rows)
    reward_fn = named_input("reward.fn", make_reward_fn, cfg.reward.fn)
    matched = None
    if cfg.control.filter in MATCHED_FILTERS:  # random, max_variance
        matched = named_input("control.match_run", load_matched_schedule, cfg.control.match_run)
    if cfg.eval.response_metrics:  # found now, not after the first iterations' training
        named_input("eval.response_metrics", load_callable, cfg.eval.response_metrics)
    run_dir = Path(cfg.run_dir)
    if dist.is_main():
        resolve_path(cfg.model, run_dir)  # materialises builtin:tiny-llama once
    dist.barrier()
    model_path = resolve_path(cfg.model, run_dir)
    tok = load_tokenizer(cfg.model, model_path)
    fmt = PromptFormatter(tok, cfg.data.prompt_template, cfg.data.chat_template)
    for rows, split in ((train_rows, "train"), (val_rows, "validation"), (test_rows, "test")):
        check_prompt_lengths(rows, fmt, cfg.data.max_prompt_tokens, split)
    return TaskData(train_rows, val_rows, test_rows, reward_fn, tok, fmt, model_path, matched)


def named_input(key: str, load, value: str):
    """``load(value)`` for the input config key ``key`` names (a module, a file); its failure is one line naming
    the key (ConfigError)."""
    try:
        return load(value)
    except (OSError, ValueError, ImportError) as e:
        if isinstance(e, ConfigError):
            raise
        reason = " ".join(str(e).split())
        raise ConfigError(reason if reason.startswith(key) else f"{key}={value}: {reason}") from None


def load_models(cfg: TrainConfig, model_path: str, device: torch.device):
    """(policy, critic, shared value head, reference); sharded with FSDP2 under ``dist.strategy=fsdp``."""
    needs_critic = ADVANTAGE_ESTIMATORS[cfg.ppo.advantage].needs_critic
    shared_critic = needs_critic and cfg.ppo.critic == "shared"
    # LoRA's adapters (and any weight a checkpoint lacks) are drawn while loading: the same draw on every
    # rank and in every run (torch's default generator starts from a random seed in each process)
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    policy = load_policy(cfg.model, model_path, device).train()
    critic = None  # a separate model, or a head on the policy (its values ride the policy's forwards)
    if shared_critic:
        critic = SharedValueHead(policy.config.hidden_size).to(device).train()
    elif needs_critic:
        critic = load_value_model(cfg.model, model_path, device).train()
    value_head = critic if shared_critic else None
    ref = load_reference(cfg.model, model_path, device) if cfg.ppo.kl_coef > 0 else None
    if cfg.dist.strategy == "fsdp" and dist.world_size() > 1:  # before the engine hooks layers and the optimizer
        shard = functools.partial(fsdp.shard_model, reshard_after_forward=cfg.dist.fsdp_reshard_after_forward,
                                  param_dtype=cfg.dist.fsdp_param_dtype)
        shard(policy)
        if critic is not None and not shared_critic:
            shard(critic, own_dtype_units=(critic.head,))  # its float32 head: a unit of its own
        if ref is not None:
            shard(ref)
    return policy, critic, value_head, ref


def make_sampler(cfg: TrainConfig, policy, tokenizer, model_path: str, device: torch.device,
                 value_head=None) -> Sampler:
    """The rollout engine that ``rollout.engine`` names (vLLM is imported only when asked for)."""
    if cfg.rollout.engine == "vllm":
        from ippo.rl.vllm_rollout import VLLMSampler

        return VLLMSampler(cfg, policy, tokenizer, model_path, device)
    return HFSampler(policy, tokenizer, cfg.rollout, value_head)


def make_optimizer(cfg: TrainConfig, policy, critic):
    """AdamW over the policy's and the critic's trainable parameters (the critic at ``ppo.value_lr``), with a
    linear warm-up over ``ppo.warmup_iters`` optimizer steps."""
    pol_params = trainable_parameters(policy)
    val_params = trainable_parameters(critic) if critic is not None else []
    groups = [{"params": pol_params, "lr": cfg.ppo.lr}]
    if val_params:
        groups.append({"params": val_params, "lr": cfg.ppo.value_lr or cfg.ppo.lr})
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.ppo.adam_betas), weight_decay=cfg.ppo.weight_decay)
    warm = cfg.ppo.warmup_iters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
    return pol_params + val_params, optimizer, scheduler


def restore(c: Components) -> RunState:
    """The newest checkpoint that verifies (damaged ones are reported and skipped; CheckpointError if none
    loads), or a fresh state. Sharded: every rank verifies and reads its own shards, and all fall back together."""
    if not c.cfg.resume:
        return RunState()
    state = restore_checkpoint(c.run_dir, policy=c.policy, value=c.critic, optimizer=c.optimizer,
                               scheduler=c.scheduler, trainable_only=c.cfg.model.lora, device=c.device,
                               sharded=c.sharded, report=warn if dist.is_main() else lambda _: None)
    if state is None:
        return RunState()
    check_resumed_state(state, c.cfg)
    return RunState(state["iteration"], state.get("stopped"), state.get("nonfinite_streak", 0),
                    low_kept_streak=state.get("low_kept_streak", 0), train_seconds=state.get("train_seconds", 0.0))


def save(c: Components, state: RunState) -> None:
    """Checkpoint after ``state.iteration`` iterations (atomic, verified before ``latest`` moves)."""
    cfg = c.cfg
    # a non-finite stop also keeps the checkpoint before it: the last one from before the failing iteration
    kw = {"policy": c.policy, "value": c.critic, "optimizer": c.optimizer, "scheduler": c.scheduler,
          "trainable_only": cfg.model.lora,
          "keep_last": cfg.checkpoint.keep_last + (state.nonfinite_reason is not None),
          "keep_every": cfg.checkpoint.keep_every,
          "state": {"stopped": state.stopped, "seed": cfg.seed, "data_order": "seeded permutation per epoch",
                    "prompts_consumed": state.iteration * c.layout.B, "nonfinite_streak": state.nonfinite_streak,
                    "low_kept_streak": state.low_kept_streak, "train_seconds": state.train_seconds}}
    if c.sharded:  # every rank writes its own shards
        save_sharded_checkpoint(c.run_dir, state.iteration, **kw)
    elif dist.is_main():
        save_checkpoint(c.run_dir, state.iteration, **kw)
    dist.barrier()
