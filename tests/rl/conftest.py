"""Fixtures for the trainer tests: one tiny random Llama + char tokenizer on disk, and fast configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ippo.rl.config import load_config
from ippo.rl.models import build_tiny_llama

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def fast_overrides(model_dir: Path, run_dir: Path) -> list[str]:
    """A config that runs an iteration in about a second on 2 CPU cores."""
    return [
        f"model.path={model_dir}", f"run_dir={run_dir}", "device=cpu", "iterations=2",
        f"data.train_path={DATA / 'arith_train.jsonl'}", "data.val_holdout=8",
        'data.prompt_template="q: {question}\\na:"', "data.max_prompt_tokens=64",
        "rollout.prompts_per_iter=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "reward.fn=tests.rl.toy_rewards:has_digit",
        "ppo.mini_batch_size=8", "ppo.micro_batch_size=8", "ppo.lr=1e-3",
        "influence.n_val=8", "log.tensorboard=false", "log.progress=false", "threads=1",
    ]


@pytest.fixture
def make_cfg(tiny_model_dir, tmp_path):
    def make(*extra: str, run_dir: Path | None = None):
        return load_config(None, fast_overrides(tiny_model_dir, run_dir or tmp_path / "run") + list(extra))
    return make


@pytest.fixture(autouse=True)
def restore_threads():
    """train() sets torch's thread count for the process: undo it after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
