"""Checks the config loader (``ippo.rl.config``) runs on what it reads: YAML text read into one-line errors,
numbers that must be finite, the range of every number of the config, and "did you mean" for unknown keys.

``RANGES`` names the range of every numeric field of ``ippo.rl.settings`` (``tests/rl/test_safety.py`` checks
that none is missing, beside ``RANGE_CHECKED_ELSEWHERE``: fields whose range depends on other fields and is
checked next to them in ``ippo.rl.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from typing import Any

import yaml

from ippo.errors import ConfigError
from ippo.rl.settings import TrainConfig

Range = tuple[str, Callable[[float], bool]]  # (what it must be, in words; the check)


def _gt(low: float) -> Range:
    return f"> {low:g}", lambda v: v > low


def _ge(low: float) -> Range:
    return f">= {low:g}", lambda v: v >= low


def _between(low: float, high: float, brackets: str = "[]") -> Range:
    ok_low = (lambda v: v >= low) if brackets[0] == "[" else (lambda v: v > low)
    ok_high = (lambda v: v <= high) if brackets[1] == "]" else (lambda v: v < high)
    return f"in {brackets[0]}{low:g}, {high:g}{brackets[1]}", lambda v: ok_low(v) and ok_high(v)


def _zero_means(meaning: str) -> Range:
    """>= 0, where 0 switches something off or means "all": the message says which."""
    return f">= 0 (0 = {meaning})", lambda v: v >= 0


ANY: Range = ("any finite number", lambda v: True)
POSITIVE, NON_NEGATIVE, FRACTION = _gt(0), _ge(0), _between(0, 1)

# Every number of the config and the values it may take (None, where a field allows it, is not checked;
# a list is checked element by element). Non-finite numbers never get here: loading refuses them.
RANGES: dict[str, Range] = {
    "seed": _between(0, 2**63 - 1),
    "iterations": POSITIVE,
    "threads": _zero_means("torch's default"),
    "model.lora_r": POSITIVE,
    "model.lora_alpha": POSITIVE,
    "model.lora_dropout": _between(0, 1, "[)"),
    "data.val_holdout": NON_NEGATIVE,
    "data.max_prompt_tokens": POSITIVE,
    "data.max_train_rows": _zero_means("all rows"),
    "data.max_test_rows": _zero_means("all rows"),
    "rollout.prompts_per_iter": POSITIVE,
    "rollout.samples_per_prompt": POSITIVE,
    "rollout.max_new_tokens": POSITIVE,
    "rollout.temperature": POSITIVE,
    "rollout.top_p": _between(0, 1, "(]"),
    "rollout.gen_batch_prompts": _zero_means("all at once"),
    "rollout.forward_batch": POSITIVE,
    "rollout.vllm.gpu_memory_utilization": _between(0, 1, "()"),
    "rollout.vllm.sleep_level": ("one of 0 | 1 | 2", lambda v: v in (0, 1, 2)),
    "rollout.vllm.max_model_len": _zero_means("prompt + response"),
    "reward.truncated_reward": ANY,
    "ppo.gamma": FRACTION,
    "ppo.lam": FRACTION,
    "ppo.epochs": POSITIVE,
    "ppo.mini_batch_size": POSITIVE,
    "ppo.micro_batch_size": POSITIVE,
    "ppo.lr": POSITIVE,
    "ppo.value_lr": POSITIVE,
    "ppo.weight_decay": NON_NEGATIVE,
    "ppo.adam_betas": _between(0, 1, "[)"),
    "ppo.warmup_iters": NON_NEGATIVE,
    "ppo.clip": POSITIVE,
    "ppo.value_clip": NON_NEGATIVE,
    "ppo.vf_coef": NON_NEGATIVE,
    "ppo.kl_coef": _zero_means("no KL term"),
    "ppo.entropy_coef": _zero_means("no entropy bonus"),
    "ppo.max_grad_norm": POSITIVE,
    "ppo.max_nonfinite_steps": POSITIVE,
    "ppo.grpo_eps": POSITIVE,
    "influence.rank": POSITIVE,
    "influence.n_val": POSITIVE,
    "influence.threshold": ANY,
    "influence.fraction": FRACTION,
    "influence.val_batch": _zero_means("all at once"),
    "influence.top_k_log": NON_NEGATIVE,
    "influence.stop_kept_frac": FRACTION,
    "influence.stop_patience": _ge(1),
    "eval.every": _zero_means("never"),
    "eval.num_prompts": _zero_means("the whole test split"),
    "eval.k": _zero_means("greedy only"),
    "eval.temperature": POSITIVE,
    "eval.top_p": _between(0, 1, "(]"),
    "eval.max_new_tokens": POSITIVE,
    "eval.batch_prompts": POSITIVE,
    "checkpoint.every": _zero_means("only at the end"),
    "checkpoint.keep_last": _ge(1),
    "checkpoint.keep_every": _zero_means("off"),
}
# numbers whose range is checked in ippo.rl.config beside the fields it depends on
RANGE_CHECKED_ELSEWHERE = frozenset({
    "ppo.clip_low", "ppo.clip_high", "ppo.dual_clip", "ppo.loss_norm_len", "ppo.is_cap", "rollout.max_sample_rounds",
    "control.sft_coef",
})


class NotFinite(ConfigError):
    """A NaN or infinite number where the config needs a finite one (no other type of a union may take it)."""


def finite(value: float, key: str) -> float:
    """``value``, or a ConfigError naming ``key`` when it is NaN or infinite (YAML's .nan, .inf, 1e400)."""
    if not math.isfinite(value):
        raise NotFinite(f"{key}={value}: must be a finite number")
    return value


def read_yaml(text: str | bytes, where: str) -> Any:
    """``yaml.safe_load`` whose every failure (syntax, a tab, a ``!!python`` tag, bytes that are not UTF-8) is a
    one-line ConfigError naming ``where`` and the line."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {what}") from None


def dotted_keys(cls: type = TrainConfig, prefix: str = "", sections: bool = False) -> dict[str, Any]:
    """Every leaf key of the config as ``dotted key -> annotation`` (and every section, with ``sections``)."""
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            if sections:
                out[prefix + name] = tp
            out.update(dotted_keys(tp, f"{prefix}{name}.", sections))
        else:
            out[prefix + name] = tp
    return out


def suggestion(key: str, known: typing.Iterable[str]) -> str:
    """`` (did you mean X?)`` for the known key closest to ``key``, or ""."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_keys_message(keys: list[str]) -> str:
    known = dotted_keys(sections=True)
    return "unknown config key(s): " + ", ".join(k + suggestion(k, known) for k in keys)


def validate_numbers(cfg: TrainConfig) -> None:
    """Every number of ``cfg`` within its range (``RANGES``), and the batch sizes consistent."""
    for key, (what, ok) in RANGES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        for v in node if isinstance(node, list) else [node]:
            if v is not None and not ok(v):
                raise ConfigError(f"{key}={node}: must be {what}")
    if cfg.ppo.micro_batch_size > cfg.ppo.mini_batch_size:
        raise ConfigError(f"ppo.micro_batch_size={cfg.ppo.micro_batch_size} is larger than ppo.mini_batch_size="
                          f"{cfg.ppo.mini_batch_size}: a micro-batch is a part of a mini-batch (set "
                          "micro_batch_size <= mini_batch_size)")
