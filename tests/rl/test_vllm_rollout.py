"""rollout.engine=vllm against a fake vLLM with the real API's surface (tests/rl/fake_vllm.py).

vLLM cannot run on the CPU. The fake records what the trainer's code path really calls -- the engine
arguments, the weights it received before each rollout, the SamplingParams of every request, the order
of sleep / wake / reload / generate -- and samples with the real tiny model, so a run goes end to end.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ippo.rl.config import ConfigError, load_config
from ippo.rl.data import derive_seed
from ippo.rl.loop import train

from . import fake_vllm
from .conftest import DATA

ROOT = Path(__file__).resolve().parents[2]
VLLM = ["rollout.engine=vllm", "device=auto", "rollout.temperature=0.7"]


@pytest.fixture
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _checkpoint(run: Path, done: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"iter_{done:06d}" / "policy.safetensors"))


def test_vllm_rollouts_end_to_end(make_cfg, tmp_path, tiny_model_dir, fake):
    """Weights sent before every rollout equal the policy's at that point, each request carries the
    rollout's sampling settings and its own seed, and the logged train-inference mismatch is ~0."""
    run = tmp_path / "run"
    cfg = make_cfg(*VLLM, "iterations=3", "checkpoint.keep_last=3", run_dir=run)
    assert train(cfg)["stopped"] is None
    (llm,) = fake_vllm.LLM.instances
    kw = llm.kwargs
    assert llm.model_path == str(tiny_model_dir)
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["tensor_parallel_size"] == 1
    assert kw["enable_sleep_mode"] is True and kw["gpu_memory_utilization"] == 0.3
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["generation_config"] == "vllm"
    assert kw["max_model_len"] == 64 + 8 and kw["dtype"] == "float32" and "enable_lora" not in kw

    # the weights vLLM got before rollout k are the policy's after k updates (k = 0: the initial model)
    assert len(llm.received) == 3
    expected = [load_file(str(tiny_model_dir / "model.safetensors"))] + [_checkpoint(run, k) for k in (1, 2)]
    for got, want in zip(llm.received, expected):
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name
    assert any(not torch.equal(expected[0][k], expected[2][k]) for k in expected[0])  # the policy did change

    # one request per episode: the rollout's temperature / top-p / length / stop tokens, seed (prompt seed, s)
    assert len(llm.sampling) == 3 * 16
    for sp in llm.sampling:
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (1, 0.7, 1.0, 0, 8)
        assert sp.stop_token_ids == [2] and sp.logprobs == 0 and sp.repetition_penalty == 1.0
    seeds = [derive_seed(derive_seed(0, "rollout", it, p), s) for it in range(3) for p in range(4) for s in range(4)]
    assert [sp.seed for sp in llm.sampling] == seeds and len(set(seeds)) == len(seeds)

    # colocated: asleep between rollouts; weights woken first, loaded, then the KV cache for generation
    per_rollout = [("wake_up", ("weights",)), "reload_weights", "reset_prefix_cache", ("wake_up", ("kv_cache",)),
                   "generate", ("sleep", 1)]
    assert llm.events == per_rollout[1:3] + per_rollout[4:] + per_rollout * 2

    for r in _jsonl(run / "metrics.jsonl"):
        assert r["logp_mismatch_abs"] < 1e-4 and abs(r["logp_mismatch_mean"]) < 1e-4, r
        assert r["time_vllm_generate"] > 0 and r["time_vllm_weight_sync"] > 0 and r["vllm_tokens_per_s"] > 0
    recs = _jsonl(run / "influence.jsonl")
    assert len(recs) == 3 * 16 and all(isinstance(r["response"], str) for r in recs)


def test_vllm_mismatch_metric_sees_stale_weights(make_cfg, tmp_path, fake, monkeypatch):
    """A control for the metric above: an engine that keeps its first weights drifts from the policy."""
    orig = fake_vllm.LLM.__init__

    def stale_init(self, *a, **k):
        orig(self, *a, **k)
        self.skip_reload = True

    monkeypatch.setattr(fake_vllm.LLM, "__init__", stale_init)
    run = tmp_path / "stale"
    assert train(make_cfg(*VLLM, "ppo.lr=1e-2", run_dir=run))["stopped"] is None
    m = _jsonl(run / "metrics.jsonl")
    assert m[0]["logp_mismatch_abs"] < 1e-4  # same weights at the start
    assert m[1]["logp_mismatch_abs"] > 1e-3 and m[1]["logp_mismatch_max"] > m[1]["logp_mismatch_abs"]


@pytest.mark.parametrize("level", [0, 2])
def test_vllm_sleep_levels(make_cfg, tmp_path, fake, level):
    """Level 2 discards vLLM's weights (the fake fills them with NaN): the sync after waking restores
    them, so rollouts stay exact. Level 0 never sleeps."""
    run = tmp_path / f"sleep{level}"
    assert train(make_cfg(*VLLM, f"rollout.vllm.sleep_level={level}", run_dir=run))["stopped"] is None
    (llm,) = fake_vllm.LLM.instances
    assert llm.kwargs["enable_sleep_mode"] is (level > 0)
    if level == 0:
        assert llm.events == ["reload_weights", "reset_prefix_cache", "generate"] * 2
    else:
        assert ("sleep", 2) in llm.events and llm.events.count("reload_weights") == 2
    for r in _jsonl(run / "metrics.jsonl"):
        assert r["logp_mismatch_abs"] < 1e-4, r


def test_vllm_resume_samples_from_the_resumed_policy(make_cfg, tmp_path, fake):
    """A run killed after iteration 1 and resumed sends vLLM the checkpoint's weights: same end weights."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(make_cfg(*VLLM, run_dir=whole))
    train(make_cfg(*VLLM, "iterations=1", run_dir=part))
    train(make_cfg(*VLLM, "resume=true", run_dir=part))
    a, b = _checkpoint(whole, 2), _checkpoint(part, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = fake_vllm.LLM.instances[-1]
    assert all(torch.equal(resumed.received[0][k], _checkpoint(part, 1)[k]) for k in a)


def test_vllm_lora_sends_only_the_adapter(make_cfg, tmp_path, fake):
    run = tmp_path / "lora"
    cfg = make_cfg(*VLLM, "model.lora=true", "model.lora_r=4", "checkpoint.keep_last=2", run_dir=run)
    assert train(cfg)["stopped"] is None
    (llm,) = fake_vllm.LLM.instances
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8 and llm.kwargs["max_loras"] == 1
    assert llm.received == []  # no full-weight reload: the base model never changes
    assert [r.lora_int_id for r in llm.lora_requests] == [1, 2]
    # adapter version 2 (sent before rollout 2) == the policy's LoRA weights after the first update
    trained = {k.replace(".default", ""): v for k, v in _checkpoint(run, 1).items() if "lora_" in k}
    assert trained and set(llm.adapters[2]) == set(trained)
    for k, v in trained.items():
        assert torch.equal(llm.adapters[2][k], v), k
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B left zero: the update moved it
    for r in _jsonl(run / "metrics.jsonl"):
        assert r["logp_mismatch_abs"] < 1e-4, r  # vLLM samples from base + the adapter it was sent


BASE = ["model.path=/nonexistent/model", f"data.train_path={DATA / 'arith_train.jsonl'}", "data.val_holdout=4",
        "rollout.engine=vllm"]


@pytest.mark.parametrize("override,match", [
    ("device=cpu", "rollout.engine=vllm runs on CUDA GPUs only"),
    ("ppo.critic=shared", "ppo.critic=shared is not supported"),
    ("rollout.vllm.sleep_level=3", "rollout.vllm.sleep_level=3"),
    ("rollout.vllm.gpu_memory_utilization=1.0", "gpu_memory_utilization=1.0"),
    ("rollout.vllm.max_model_len=100", "max_model_len=100 is shorter"),
    ("model.gguf_file=m.gguf", "model.gguf_file is not supported"),
    ("rollout.engine=sglang", "rollout.engine='sglang'"),
    ("rollout.vllm.gpu_mem=0.5", "unknown config key.*rollout.vllm.gpu_mem"),
])
def test_vllm_bad_configs(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, BASE + [override])


def test_vllm_sleep_level_2_excludes_lora():
    with pytest.raises(ConfigError, match="sleep_level=2 discards"):
        load_config(None, BASE + ["model.lora=true", "rollout.vllm.sleep_level=2"])
    load_config(None, BASE + ["model.lora=true"])  # level 1 (the default) is fine


def test_vllm_missing_or_no_gpu_fails_clearly(monkeypatch, make_cfg):
    import ippo.rl.vllm_rollout as vr

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r"rollout.engine=vllm needs vLLM.*pip install -e \.\[vllm\]"):
        vr.import_vllm()
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):  # device=auto resolved to the CPU
        vr.VLLMSampler(make_cfg(*VLLM), None, None, "", torch.device("cpu"))


def test_large_model_configs_load():
    """The 0.5B (one GPU) and 8B (8 GPUs, FSDP) configs load, and run rollouts through vLLM."""
    for name, util, sleep in (("gsm8k_qwen0.5b_ippo.yaml", 0.3, 1), ("gsm8k_llama8b_ippo.yaml", 0.4, 2)):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.rollout.engine == "vllm" and cfg.device == "cuda" and cfg.model.dtype == "bfloat16", name
        assert cfg.rollout.vllm.gpu_memory_utilization == util and cfg.rollout.vllm.sleep_level == sleep, name
        assert cfg.ppo.critic == "separate", name
    # the 8B config shards its models over the 8 ranks (FSDP2); the reference is sharded, not offloaded
    big = load_config(ROOT / "configs" / "gsm8k_llama8b_ippo.yaml")
    assert big.dist.strategy == "fsdp" and not big.model.ref_offload
