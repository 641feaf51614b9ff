"""Tasks: the embedded arithmetic task, the faithfulness checker, GSM8K, the bundled model.

Why here: ``ippo demo`` must run end to end with nothing downloaded -- a verifiable task,
a reward, a way to tell faithful from unfaithful-but-correct chains, and a tiny starting
policy -- and the same reward/checker must apply unchanged to real GSM8K runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ippo.tasks import arithmetic, faithfulness, gsm8k
from ippo.tasks.faithfulness import FaithfulnessReport, check

__all__ = [
    "TINY_MODEL_DIR",
    "FaithfulnessReport",
    "arithmetic",
    "check",
    "faithfulness",
    "gsm8k",
    "load_tiny_model",
    "model_task_spec",
    "tiny_model_info",
]

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_arith"


def tiny_model_info() -> dict[str, Any]:
    """The bundled model's ``build_info.json`` (seed, settings, measured accuracy...)."""
    return json.loads((TINY_MODEL_DIR / "build_info.json").read_text())


def model_task_spec(model_dir: str | Path = TINY_MODEL_DIR) -> arithmetic.TaskSpec:
    """The arithmetic ``TaskSpec`` a model was trained on (``task_spec`` in its ``build_info.json``); the
    default spec for a directory without one (e.g. a model built before specs existed)."""
    info = Path(model_dir) / "build_info.json"
    if not info.is_file():
        return arithmetic.DEFAULT_SPEC
    try:
        return arithmetic.TaskSpec.from_dict(json.loads(info.read_text()).get("task_spec"))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{info}: bad task_spec ({e})") from None


def load_tiny_model(device: str = "cpu") -> tuple[Any, Any]:
    """Load the bundled tiny arithmetic policy and its character tokenizer, offline.

    safetensors only and no ``trust_remote_code``: the files ship inside the package, so
    loading them must not be able to run code. Returns ``(model, tokenizer)``; the model
    is in eval mode, the tokenizer pads on the left for generation.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not (TINY_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled model missing at {TINY_MODEL_DIR}; rebuild it with scripts/build_tiny_model.py"
        )
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    tokenizer.padding_side = "left"
    model = LlamaForCausalLM.from_pretrained(
        TINY_MODEL_DIR, use_safetensors=True, local_files_only=True, trust_remote_code=False
    )
    model.to(device)
    model.eval()
    return model, tokenizer
