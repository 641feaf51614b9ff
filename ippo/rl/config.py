"""Run configuration: nested dataclasses, loaded from YAML, overridden by ``key=value`` strings.

Every field has a default, so a YAML file only states what differs. Unknown keys, wrong types
and impossible values raise ``ConfigError`` with the offending dotted key -- before any model is
loaded, so a typo never costs a GPU-hour.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ippo.errors import ConfigError
from ippo.rl.advantages import ADVANTAGE_ESTIMATORS
from ippo.rl.filters import CONFIG_CHECKS, control_names

__all__ = ["ConfigError", "TrainConfig", "load_config", "merge", "parse_overrides", "to_dict", "validate"]


@dataclass
class ModelConfig:
    # local HF directory; "builtin:tiny-llama" (random ~60k-param Llama, CPU tests); "builtin:tiny-arith"
    # (the bundled task model); "package:<module>" (a model shipped inside an installed Python package)
    path: str = ""
    gguf_file: str | None = None  # file name inside `path`, loaded through transformers' GGUF support
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (falls back to sdpa if missing)
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    ref_offload: bool = False  # keep the frozen reference on CPU between uses (GPU memory)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # module names (or name suffixes) that get adapters; None = PEFT's default for the architecture
    # (Llama/Qwen2: q_proj, v_proj; GPT-2: c_attn); names that match no module of the model are an error
    lora_target_modules: list[str] | None = None


@dataclass
class DataConfig:
    # Each path: a JSONL file (read without `datasets`), a .parquet/.json/.csv/.arrow file, a `save_to_disk`
    # directory, or a script-free dataset folder (e.g. data/train-*.parquet) read by datasets.load_dataset.
    train_path: str = ""  # question/answer rows (GSM8K style)
    val_path: str = ""  # gold solutions for the validation gradient; "" = hold out `val_holdout` train rows
    test_path: str = ""  # evaluation split; "" = no evaluation
    # the split of a multi-split source; "" = its only split, else train / validation / test
    train_split: str = ""
    val_split: str = ""
    test_split: str = ""
    question_field: str = "question"  # column (JSON key) of the question
    answer_field: str = "answer"  # column of the gold solution (its final answer after `#### `, or boxed)
    # read rows lazily (datasets streaming): max_*_rows reads only those rows, and no Arrow cache copy is
    # written; JSONL is always read line by line
    streaming: bool = False
    val_holdout: int = 0  # rows taken from the end of train when val_path is empty
    prompt_template: str = "Question: {question}\nAnswer:"
    chat_template: bool = False  # wrap the prompt with the tokenizer's chat template
    strip_calculator: bool = True  # remove GSM8K's <<a*b=c>> annotations from gold solutions
    max_prompt_tokens: int = 512  # longer prompts are an error (listed before training starts)
    max_train_rows: int = 0  # 0 = all
    max_test_rows: int = 0


@dataclass
class VLLMConfig:
    """The colocated vLLM rollout engine (``rollout.engine=vllm``, ``pip install -e .[vllm]``; ippo/vllm_rollout.py)."""

    # share of the GPU's *total* memory vLLM takes (its weights + KV cache) while awake; the trainer's
    # policy, critic, reference and optimizer state must fit in the rest
    gpu_memory_utilization: float = 0.3
    # between rollouts: 0 = stay awake; 1 = offload vLLM's weights to CPU and free the KV cache; 2 = free
    # both (the weight sync rewrites every weight before the next rollout; not with model.lora)
    sleep_level: int = 1
    max_model_len: int = 0  # 0 = data.max_prompt_tokens + rollout.max_new_tokens
    enforce_eager: bool = False  # True: no CUDA graphs (faster start, slower decoding)


@dataclass
class RolloutConfig:
    prompts_per_iter: int = 32  # B, global (over all ranks)
    samples_per_prompt: int = 8  # n
    max_new_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.9
    # hf: the policy's own generate(); vllm: a colocated vLLM engine that receives the policy's weights
    # before every rollout and samples each episode with its own seed (ippo/vllm_rollout.py)
    engine: str = "hf"
    gen_batch_prompts: int = 0  # hf: prompts per generate() call; 0 = all of this rank's prompts at once
    seed_per_prompt: bool = False  # hf: one generate() per prompt seeded by (seed, iter, prompt): batch-invariant
    forward_batch: int = 16  # episodes per forward in the log-prob / value / scoring passes
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class RewardConfig:
    fn: str = "auto"  # auto | gsm8k | boxed | math_verify | contains | module:function
    truncated_reward: float | None = None  # reward of responses that never emit EOS (None = parse them)


@dataclass
class PPOConfig:
    advantage: str = "gae"  # gae | grpo
    # The GAE critic. separate: a copy of the policy's backbone with a scalar head (its own forward and
    # backward). shared: a scalar head on the policy's final hidden state; its values come from the
    # rollout's and the update's own policy forwards, and the value loss also trains the policy trunk.
    critic: str = "separate"
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    epochs: int = 2
    mini_batch_size: int = 64  # episodes per optimizer step (global)
    micro_batch_size: int = 8  # episodes per forward/backward (per rank)
    lr: float = 1e-6
    value_lr: float | None = None  # None = lr
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 0  # linear LR warmup, in optimizer steps
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 1e-4
    kl_estimator: str = "k3"  # k1 | k3
    kl_in_reward: bool = False  # False: KL is a loss term (authors); True: per-token reward penalty
    entropy_coef: float = 0.0  # entropy is always logged; a bonus only when > 0
    loss_agg: str = "token_mean"  # token_mean | seq_mean
    max_grad_norm: float = 1.0
    # An optimizer step whose loss or gradient norm is NaN/Inf is skipped (weights, optimizer and LR schedule
    # untouched) and counted; this many skipped steps in a row stop the run (the weights did not change in
    # between, so they keep failing: the run diverged).
    max_nonfinite_steps: int = 3
    grpo_eps: float = 1e-6


@dataclass
class InfluenceConfig:
    enabled: bool = True  # False = plain PPO
    mode: str = "exact"  # exact | sketch | target
    rank: int = 64  # sketch / target rank
    # mode=target: how the rank-q basis of the validation gradient G is built. factor: from each layer's
    # validation (X, dY), never forming G (memory: the validation activations + O(q (d_in + d_out)) per
    # layer); dense: from G itself (4 bytes per hooked parameter). exact/sketch modes always form G.
    target_basis: str = "factor"
    backend: str = "auto"
    n_val: int = 100  # validation examples drawn each iteration (seeded)
    filter: str = "threshold"  # threshold | bottom_fraction | negative_bottom_fraction
    threshold: float = 0.0  # threshold rule: keep score > threshold
    fraction: float = 0.5  # (negative_)bottom_fraction: fraction dropped
    reweight: bool = True  # w_e = score_e / mean(kept scores); False = weight 1
    on_empty: str = "stop"  # stop | skip
    # before_update (the paper): score every episode at theta_old in a separate pass before the PPO epochs.
    # in_update: in the first PPO epoch, score each micro-batch at the current parameters inside its own
    # backward and reweight it there (engine.weighted_backward): I-PPO for the FLOPs of PPO; later epochs
    # reuse that selection. KL/entropy/value terms stay unweighted through a second gradient stream; the
    # validation gradient is taken once per iteration at theta_old.
    timing: str = "before_update"
    # What an episode's loss L_e is, for its score and for its weight. pg: its share of the clipped
    # surrogate only (the paper; KL and entropy terms stay unweighted). policy: the surrogate plus its
    # KL-penalty and entropy terms, scored and weighted together -- with KL as a loss term this lets
    # in_update run ONE backward through the policy instead of a weighted and an unweighted one.
    # all: policy plus the episode's value loss (vf_coef * its share), for ppo.critic=shared, where the
    # value loss reaches the policy's trunk: in_update then needs one backward for policy and critic.
    episode_loss: str = "pg"
    val_batch: int = 0  # validation examples per target backward: 0 = all (one backward)
    top_k_log: int = 5  # proponents/opponents recorded per iteration


@dataclass
class ControlConfig:
    """Control filters for plain-PPO runs (influence.enabled=false): what I-PPO must beat (ippo/controls.py)."""

    # none | zero_variance (drop prompts whose samples all got the same reward: DAPO's filter) |
    # random (keep as many episodes per iteration as the I-PPO run `match_run` kept, drawn at random)
    filter: str = "none"
    match_run: str = ""  # random: the I-PPO run directory to match (its influence.jsonl)
    weights: str = "matched"  # random: matched (that run's kept weights, in random order) | uniform (1)
    pool: str = "informative"  # random: informative (non-zero-advantage episodes first) | all


@dataclass
class EvalConfig:
    every: int = 0  # iterations between evaluations (0 = never; also run at the end when > 0)
    num_prompts: int = 0  # 0 = the whole test split
    k: int = 8  # samples per prompt for mean accuracy, maj@k, pass@k (0: greedy accuracy only)
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_prompts: int = 16
    # "module:function(responses: list[str], rows: list[Example]) -> dict[str, float]", called on the greedy
    # responses of each evaluation; its metrics land in eval.jsonl (e.g. faithfulness rates). "" = none.
    response_metrics: str = ""


@dataclass
class LogConfig:
    tensorboard: bool = True  # used when installed
    wandb: bool = False
    wandb_project: str = "ippo"
    progress: bool = True
    influence_log: bool = True


@dataclass
class DistConfig:
    # several processes (torchrun): ddp = whole models on every rank, gradients summed by one all-reduce;
    # fsdp = FSDP2 (fully_shard) shards policy, critic, reference and optimizer state over the ranks
    strategy: str = "ddp"  # ddp | fsdp (one process: nothing to shard, runs unsharded)
    fsdp_reshard_after_forward: bool = True  # free each block's gathered weights after its forward
    fsdp_param_dtype: str = ""  # "" = compute in model.dtype; bfloat16 = bf16 compute over model.dtype shards


@dataclass
class CheckpointConfig:
    every: int = 1  # iterations between checkpoints (0 = only at the end)
    # checkpoints kept on disk; resume falls back to an older one when the latest does not verify (1: no fall-back)
    keep_last: int = 2


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    iterations: int = 100
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# ---------------------------------------------------------------------------------------------
# loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp`` (the handful of types used above)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string: accept it as a number
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["ppo.lr=1e-5", "influence.mode=target"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(tree, key, yaml.safe_load(raw) if raw.strip() else "")
    return tree


def merge(base: dict, new: dict) -> dict:
    """``new`` merged into ``base`` recursively (sections merge, values replace)."""
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# Inputs a YAML file names by path. A relative one is looked up next to the YAML file first, then as
# given (relative to the working directory; for model.path also a hub id), so a config runs from any
# folder. run_dir (an output) and command-line overrides stay relative to the working directory.
INPUT_PATHS = ("model.path", "data.train_path", "data.val_path", "data.test_path", "control.match_run")


def _anchor_paths(data: dict, base: Path) -> dict:
    """``data`` with its relative input paths that exist under ``base`` (the YAML file's folder) made absolute."""
    out = dict(data)
    for dotted in INPUT_PATHS:
        section, key = dotted.split(".")
        node = out.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or ":" in value.split("/")[0]:  # "", builtin:, package:
            continue
        p = Path(value).expanduser()
        if p.is_absolute():
            continue
        if (base / p).exists():
            out[section] = {**node, key: str((base / p).resolve())}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + ``key=value`` overrides -> validated ``TrainConfig``.

    Relative input paths in the file (``INPUT_PATHS``) resolve against the file's folder first.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = _anchor_paths(data, p.resolve().parent)
    data = merge(data, parse_overrides(overrides or []))
    cfg = _build(TrainConfig, data)
    validate(cfg)
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def needs_critic(cfg: TrainConfig) -> bool:
    """Whether ``ppo.advantage``'s estimator trains a critic (a value model, or the shared head)."""
    return ADVANTAGE_ESTIMATORS[cfg.ppo.advantage].needs_critic


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r}: expected one of {' | '.join(options)}")


def validate(cfg: TrainConfig) -> None:
    """Value checks that need no files or models. File/data checks happen in ``ippo.rl.data``."""
    if not cfg.model.path:
        raise ConfigError("model.path is required")
    if not cfg.data.train_path:
        raise ConfigError("data.train_path is required")
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    _choice("model.attn_implementation", cfg.model.attn_implementation,
            ("sdpa", "eager", "flash_attention_2"))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _choice("ppo.advantage", cfg.ppo.advantage, tuple(ADVANTAGE_ESTIMATORS))
    _choice("ppo.critic", cfg.ppo.critic, ("separate", "shared"))
    _choice("ppo.kl_estimator", cfg.ppo.kl_estimator, ("k1", "k3"))
    _choice("ppo.loss_agg", cfg.ppo.loss_agg, ("token_mean", "seq_mean"))
    _choice("influence.mode", cfg.influence.mode, ("exact", "sketch", "target"))
    _choice("influence.target_basis", cfg.influence.target_basis, ("factor", "dense"))
    _choice("influence.filter", cfg.influence.filter,
            ("threshold", "bottom_fraction", "negative_bottom_fraction"))
    _choice("influence.on_empty", cfg.influence.on_empty, ("stop", "skip"))
    _choice("influence.timing", cfg.influence.timing, ("before_update", "in_update"))
    _choice("influence.episode_loss", cfg.influence.episode_loss, ("pg", "policy", "all"))
    _choice("dist.strategy", cfg.dist.strategy, ("ddp", "fsdp"))
    _choice("dist.fsdp_param_dtype", cfg.dist.fsdp_param_dtype, ("", "float32", "bfloat16", "float16"))
    if cfg.dist.fsdp_param_dtype and cfg.dist.strategy != "fsdp":
        raise ConfigError(f"dist.fsdp_param_dtype={cfg.dist.fsdp_param_dtype} needs dist.strategy=fsdp "
                          "(with ddp, set model.dtype)")
    if cfg.dist.strategy == "fsdp" and cfg.model.ref_offload:
        raise ConfigError("model.ref_offload moves the whole reference to the CPU; with dist.strategy=fsdp the "
                          "reference is sharded over the ranks instead: set model.ref_offload=false")
    if cfg.influence.episode_loss == "all" and needs_critic(cfg) and cfg.ppo.critic != "shared":
        raise ConfigError("influence.episode_loss=all scores and weights the value loss with its episode, which "
                          "only reaches the policy with ppo.critic=shared; with a separate critic use "
                          "influence.episode_loss=policy")
    if cfg.influence.enabled and cfg.influence.timing == "in_update" and cfg.influence.mode == "sketch":
        raise ConfigError("influence.timing=in_update scores inside the update's backward: use influence.mode "
                          "exact or target (sketch scores need the target sketch, use timing=before_update)")
    positive = {
        "iterations": cfg.iterations,
        "rollout.prompts_per_iter": cfg.rollout.prompts_per_iter,
        "rollout.samples_per_prompt": cfg.rollout.samples_per_prompt,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.forward_batch": cfg.rollout.forward_batch,
        "ppo.epochs": cfg.ppo.epochs,
        "ppo.mini_batch_size": cfg.ppo.mini_batch_size,
        "ppo.micro_batch_size": cfg.ppo.micro_batch_size,
        "ppo.max_nonfinite_steps": cfg.ppo.max_nonfinite_steps,
        "influence.rank": cfg.influence.rank,
        "influence.n_val": cfg.influence.n_val,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "eval.batch_prompts": cfg.eval.batch_prompts,
        "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
    }
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k}={v}: must be > 0")
    for k, v in {"iterations": cfg.iterations, "checkpoint.every": cfg.checkpoint.every,
                 "eval.every": cfg.eval.every, "eval.k": cfg.eval.k, "ppo.warmup_iters": cfg.ppo.warmup_iters,
                 "data.val_holdout": cfg.data.val_holdout}.items():
        if v < 0:
            raise ConfigError(f"{k}={v}: must be >= 0")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: must be >= 1 (2 or more leaves a "
                          "checkpoint to fall back to when the latest is damaged)")
    if cfg.model.lora_target_modules is not None and not cfg.model.lora_target_modules:
        raise ConfigError("model.lora_target_modules is empty: list module names, or leave it unset (null) for "
                          "PEFT's default for the architecture")
    if cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0 (sampling); use eval for greedy decoding")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p}: must be in (0, 1]")
    if cfg.ppo.lr <= 0:
        raise ConfigError(f"ppo.lr={cfg.ppo.lr}: must be > 0")
    if not 0 <= cfg.ppo.gamma <= 1 or not 0 <= cfg.ppo.lam <= 1:
        raise ConfigError("ppo.gamma and ppo.lam must be in [0, 1]")
    if cfg.ppo.clip <= 0 or cfg.ppo.value_clip < 0:
        raise ConfigError("ppo.clip must be > 0 and ppo.value_clip >= 0")
    if len(cfg.ppo.adam_betas) != 2:
        raise ConfigError("ppo.adam_betas must be two numbers")
    if cfg.ppo.advantage == "grpo" and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError("ppo.advantage=grpo needs rollout.samples_per_prompt >= 2")
    if cfg.influence.filter != "threshold" and not 0 <= cfg.influence.fraction <= 1:
        raise ConfigError(f"influence.fraction={cfg.influence.fraction}: must be in [0, 1]")
    if cfg.influence.enabled and not cfg.data.val_path and cfg.data.val_holdout <= 0:
        raise ConfigError("influence needs gold validation solutions: set data.val_path or data.val_holdout")
    _choice("control.filter", cfg.control.filter, control_names())
    _choice("control.weights", cfg.control.weights, ("matched", "uniform"))
    _choice("control.pool", cfg.control.pool, ("informative", "all"))
    if cfg.control.filter != "none" and cfg.influence.enabled:
        raise ConfigError(f"control.filter={cfg.control.filter} is a control for plain PPO: set "
                          "influence.enabled=false (the influence filter and a control filter exclude each other)")
    if cfg.control.filter in CONFIG_CHECKS:  # the filter's own requirements
        CONFIG_CHECKS[cfg.control.filter](cfg)
    validate_rollout_engine(cfg)
    rm = cfg.eval.response_metrics
    if rm and (rm.count(":") != 1 or not all(part.strip() for part in rm.split(":"))):
        raise ConfigError(f"eval.response_metrics={rm!r}: expected 'module:function' (or empty)")
    for k in ("question_field", "answer_field"):
        if not getattr(cfg.data, k).strip():
            raise ConfigError(f"data.{k} must name a column")
    if "{question}" not in cfg.data.prompt_template:
        raise ConfigError("data.prompt_template must contain {question}")


def validate_rollout_engine(cfg: TrainConfig) -> None:
    """``rollout.engine`` and the combinations the vLLM engine cannot run."""
    _choice("rollout.engine", cfg.rollout.engine, ("hf", "vllm"))
    vc = cfg.rollout.vllm
    if cfg.rollout.engine != "vllm":
        return
    if cfg.device == "cpu":
        raise ConfigError("rollout.engine=vllm runs on CUDA GPUs only: set device=cuda (or auto), or use "
                          "rollout.engine=hf on the CPU")
    if needs_critic(cfg) and cfg.ppo.critic == "shared":
        raise ConfigError("rollout.engine=vllm with ppo.critic=shared is not supported: the shared critic reads its "
                          "values off HF generate's forwards; use ppo.critic=separate, ppo.advantage=grpo or "
                          "rollout.engine=hf")
    if cfg.model.gguf_file:
        raise ConfigError("rollout.engine=vllm loads the Hugging Face directory model.path; model.gguf_file is not "
                          "supported with it (use rollout.engine=hf)")
    if not 0 < vc.gpu_memory_utilization < 1:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization={vc.gpu_memory_utilization}: must be in (0, 1)")
    if vc.sleep_level not in (0, 1, 2):
        raise ConfigError(f"rollout.vllm.sleep_level={vc.sleep_level}: expected one of 0 | 1 | 2")
    if vc.sleep_level == 2 and cfg.model.lora:
        raise ConfigError("rollout.vllm.sleep_level=2 discards vLLM's weights, but with model.lora=true only the "
                          "adapter is sent to vLLM: use rollout.vllm.sleep_level=1 (or 0)")
    if vc.max_model_len < 0:
        raise ConfigError(f"rollout.vllm.max_model_len={vc.max_model_len}: must be >= 0 (0 = prompt + response)")
    if vc.max_model_len and vc.max_model_len < cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens:
        raise ConfigError(f"rollout.vllm.max_model_len={vc.max_model_len} is shorter than data.max_prompt_tokens + "
                          f"rollout.max_new_tokens ({cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens})")

_merge = merge  # the demo still imports this name; removed once it imports merge
