"""The trainer tests' fixtures (a tiny random Llama on disk, fast configs), and short runs to inspect."""

from __future__ import annotations

from tests.rl.conftest import make_cfg, restore_threads, tiny_model_dir  # noqa: F401 -- fixtures

# 3 iterations, a checkpoint after each; keep_last=1 would leave only the last, keep_every=2 keeps iter_2 too
KEEP = ["iterations=3", "checkpoint.every=1", "checkpoint.keep_last=1", "checkpoint.keep_every=2"]
