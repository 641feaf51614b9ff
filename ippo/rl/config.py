"""Run configuration: the dataclasses of ``ippo.rl.settings``, loaded from YAML, overridden by ``key=value``
strings, and validated (choices that name a registered advantage estimator or episode filter included).

Every field has a default, so a YAML file only states what differs. Unknown keys, wrong types
and impossible values raise ``ConfigError`` with the offending dotted key -- before any model is
loaded, so a typo never costs a GPU-hour.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from ippo.errors import ConfigError
from ippo.rl.advantages import ADVANTAGE_ESTIMATORS
from ippo.rl.config_checks import NotFinite, finite, read_yaml, unknown_keys_message, validate_numbers
from ippo.rl.filters import CONFIG_CHECKS, control_names
from ippo.rl.losses import LOSS_AGGS
from ippo.rl.settings import (
    CheckpointConfig,
    ControlConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    InfluenceConfig,
    LogConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
    VLLMConfig,
)

__all__ = [  # the settings are defined in ippo.rl.settings and re-exported here
    "CheckpointConfig", "ConfigError", "ControlConfig", "DataConfig", "DistConfig", "EvalConfig", "InfluenceConfig",
    "LogConfig", "ModelConfig", "PPOConfig", "RewardConfig", "RolloutConfig", "TrainConfig", "VLLMConfig",
    "load_config", "merge", "parse_overrides", "to_dict", "validate",
]


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
            except NotFinite:
                raise
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
            return finite(float(value), key)
        if isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string: accept it as a number
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return finite(number, key)
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
        raise ConfigError(unknown_keys_message([prefix + k for k in unknown]))
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
        _set_dotted(tree, key, read_yaml(raw, f"override {item!r}") if raw.strip() else "")
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
        data = read_yaml(p.read_bytes(), str(p)) or {}
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
    _validate_choices(cfg)
    validate_numbers(cfg)
    _validate_combinations(cfg)
    _validate_ranges(cfg)
    _validate_control(cfg)
    validate_rollout_engine(cfg)
    validate_algorithms(cfg)
    rm = cfg.eval.response_metrics
    if rm and (rm.count(":") != 1 or not all(part.strip() for part in rm.split(":"))):
        raise ConfigError(f"eval.response_metrics={rm!r}: expected 'module:function' (or empty)")
    for k in ("question_field", "answer_field"):
        if not getattr(cfg.data, k).strip():
            raise ConfigError(f"data.{k} must name a column")
    if "{question}" not in cfg.data.prompt_template:
        raise ConfigError("data.prompt_template must contain {question}")


def _validate_choices(cfg: TrainConfig) -> None:
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    _choice("model.attn_implementation", cfg.model.attn_implementation,
            ("sdpa", "eager", "flash_attention_2"))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _choice("ppo.advantage", cfg.ppo.advantage, tuple(ADVANTAGE_ESTIMATORS))
    _choice("ppo.critic", cfg.ppo.critic, ("separate", "shared"))
    _choice("ppo.kl_estimator", cfg.ppo.kl_estimator, ("k1", "k3"))
    _choice("ppo.loss_agg", cfg.ppo.loss_agg, LOSS_AGGS)
    _choice("influence.mode", cfg.influence.mode, ("exact", "sketch", "target"))
    _choice("influence.target_basis", cfg.influence.target_basis, ("factor", "dense"))
    _choice("influence.filter", cfg.influence.filter,
            ("threshold", "bottom_fraction", "negative_bottom_fraction"))
    _choice("influence.on_empty", cfg.influence.on_empty, ("stop", "skip"))
    _choice("influence.timing", cfg.influence.timing, ("before_update", "in_update"))
    _choice("influence.episode_loss", cfg.influence.episode_loss, ("pg", "policy", "all"))
    _choice("dist.strategy", cfg.dist.strategy, ("ddp", "fsdp"))
    _choice("dist.fsdp_param_dtype", cfg.dist.fsdp_param_dtype, ("", "float32", "bfloat16", "float16"))


def _validate_combinations(cfg: TrainConfig) -> None:
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


def _validate_ranges(cfg: TrainConfig) -> None:
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
    if cfg.influence.filter != "threshold" and not 0 <= cfg.influence.fraction <= 1:
        raise ConfigError(f"influence.fraction={cfg.influence.fraction}: must be in [0, 1]")
    if cfg.influence.enabled and not cfg.data.val_path and cfg.data.val_holdout <= 0:
        raise ConfigError("influence needs gold validation solutions: set data.val_path or data.val_holdout")


def _validate_control(cfg: TrainConfig) -> None:
    _choice("control.filter", cfg.control.filter, control_names())
    _choice("control.weights", cfg.control.weights, ("matched", "uniform"))
    _choice("control.pool", cfg.control.pool, ("informative", "all"))
    if cfg.control.filter != "none" and cfg.influence.enabled:
        raise ConfigError(f"control.filter={cfg.control.filter} is a control for plain PPO: set "
                          "influence.enabled=false (the influence filter and a control filter exclude each other)")
    if cfg.control.filter in CONFIG_CHECKS:  # the filter's own requirements
        CONFIG_CHECKS[cfg.control.filter](cfg)
    if not 0 <= cfg.control.sft_coef < float("inf"):
        raise ConfigError(f"control.sft_coef={cfg.control.sft_coef}: must be a finite number >= 0 (0 = off)")
    if cfg.control.sft_coef > 0 and not cfg.data.val_path and cfg.data.val_holdout <= 0:
        raise ConfigError("control.sft_coef trains on the gold validation solutions: set data.val_path or "
                          "data.val_holdout")
    if not 0 <= cfg.influence.stop_kept_frac <= 1:
        raise ConfigError(f"influence.stop_kept_frac={cfg.influence.stop_kept_frac}: must be in [0, 1] (0 = off)")
    if cfg.influence.stop_patience < 1:
        raise ConfigError(f"influence.stop_patience={cfg.influence.stop_patience}: must be >= 1")


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


def validate_algorithms(cfg: TrainConfig) -> None:
    """The estimator's needs, the loss modes, the clip range, the rollout correction and dynamic sampling."""
    ppo, ro = cfg.ppo, cfg.rollout
    est = ADVANTAGE_ESTIMATORS[ppo.advantage]
    if est.needs_groups and ro.samples_per_prompt < 2:
        raise ConfigError(f"ppo.advantage={ppo.advantage} needs rollout.samples_per_prompt >= 2")
    if est.reward_kl is False and ppo.kl_in_reward and ppo.kl_coef > 0:
        raise ConfigError(f"ppo.advantage={ppo.advantage} uses the outcome reward only, so ppo.kl_in_reward=true "
                          "would drop the KL penalty: set ppo.kl_in_reward=false (KL as a loss term)")
    if ppo.loss_norm_len is not None and (ppo.loss_agg != "token_sum_norm" or ppo.loss_norm_len <= 0):
        raise ConfigError(f"ppo.loss_norm_len={ppo.loss_norm_len}: a length > 0, used by ppo.loss_agg=token_sum_norm "
                          "only (leave it unset for rollout.max_new_tokens)")
    if ppo.clip_low is not None and not 0 < ppo.clip_low <= 1:
        raise ConfigError(f"ppo.clip_low={ppo.clip_low}: must be in (0, 1] (the ratio's lower bound is 1 - clip_low)")
    if ppo.clip_high is not None and not ppo.clip_high > 0:
        raise ConfigError(f"ppo.clip_high={ppo.clip_high}: must be > 0")
    if ppo.dual_clip is not None and not 1 < ppo.dual_clip < float("inf"):
        raise ConfigError(f"ppo.dual_clip={ppo.dual_clip}: must be a finite c > 1 (or unset: off)")
    _choice("ppo.is_correction", ppo.is_correction, ("none", "tis", "mis"))
    _choice("ppo.is_level", ppo.is_level, ("token", "sequence"))
    if ppo.is_correction != "none" and ro.engine != "vllm":
        raise ConfigError(f"ppo.is_correction={ppo.is_correction} corrects for the rollout engine's own sampling "
                          "log-probs, which only rollout.engine=vllm returns: set ppo.is_correction=none")
    if not 1 <= ppo.is_cap < float("inf"):
        raise ConfigError(f"ppo.is_cap={ppo.is_cap}: must be a finite number >= 1 (a cap below 1 would cut "
                          "on-policy tokens, whose ratio is 1)")
    if ro.max_sample_rounds < 1:
        raise ConfigError(f"rollout.max_sample_rounds={ro.max_sample_rounds}: must be >= 1 (the first round included)")
    if ro.dynamic_sampling and ro.samples_per_prompt < 2:
        raise ConfigError("rollout.dynamic_sampling keeps prompts whose samples' rewards differ: it needs "
                          "rollout.samples_per_prompt >= 2")
