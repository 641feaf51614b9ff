"""A CPU stand-in for the part of vLLM 0.32's offline API that ``ippo.rl.vllm_rollout`` calls.

``install(monkeypatch)`` puts modules ``vllm`` and ``vllm.lora.request`` into ``sys.modules``. They expose
``LLM(model, **engine_args)`` with ``generate``, ``collective_rpc("reload_weights", kwargs=...)``,
``sleep`` / ``wake_up``, ``reset_prefix_cache``; ``SamplingParams``; ``LoRARequest``; and outputs shaped
like vLLM's (``RequestOutput.outputs[0].token_ids``, ``.logprobs[i] == {token: Logprob}``,
``.finish_reason``). Keyword names outside vLLM 0.32's are rejected, as vLLM would.

Generation uses the real tiny HF model, one request at a time and token by token, with a
``torch.Generator`` seeded by the request's seed, and returns vLLM's "processed" log-probs (after
temperature and top-p; ``LLM.logprob_offset`` shifts the reported ones, a known train-inference mismatch).
Level-2 sleep overwrites the weights with NaN, as vLLM discards them: a rollout
that forgot to send the weights after waking would show it. Everything the trainer sent is recorded.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file

# vLLM 0.32 names (vllm/engine/arg_utils.py EngineArgs, vllm/sampling_params.py SamplingParams)
ENGINE_ARGS = {"tokenizer", "dtype", "seed", "trust_remote_code", "gpu_memory_utilization", "max_model_len",
               "enforce_eager", "enable_sleep_mode", "distributed_executor_backend", "tensor_parallel_size",
               "logprobs_mode", "generation_config", "enable_lora", "max_lora_rank", "max_loras"}
SAMPLING_DEFAULTS = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                     "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": None,
                     "stop_token_ids": None, "ignore_eos": False, "max_tokens": 16, "min_tokens": 0,
                     "logprobs": None, "detokenize": True, "skip_special_tokens": True}


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword(s) {sorted(unknown)}")
        for k, v in {**SAMPLING_DEFAULTS, **kwargs}.items():
            setattr(self, k, v)


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")


class LLM:
    instances: ClassVar[list[LLM]] = []  # every engine built, in order (the tests read them)
    logprob_offset: ClassVar[float] = 0.0  # a test switch: added to every log-prob the engine reports (not sampled)

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs got unexpected keyword(s) {sorted(unknown)}")
        self.model_path, self.kwargs = model, kwargs
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.eos = self.model.config.eos_token_id
        self.skip_reload = False  # a test switch: pretend the weights arrived, keep the old ones
        self.asleep: set[str] = set()
        self.events: list = []  # what was called, in order
        self.received: list[dict[str, torch.Tensor]] = []  # every reload_weights: name -> tensor
        self.sampling: list[SamplingParams] = []
        self.lora_requests: list[LoRARequest] = []
        self.adapters: dict[int, dict[str, torch.Tensor]] = {}  # lora_int_id -> the adapter file's tensors
        self._lora_models: dict[int, torch.nn.Module] = {}
        LLM.instances.append(self)

    # ---- weights
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if method != "reload_weights":
            raise NotImplementedError(f"fake vLLM: collective_rpc({method!r})")
        return [self._reload_weights(*args, **(kwargs or {}))]

    @torch.no_grad()
    def _reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        if "weights" in self.asleep:
            raise RuntimeError("reload_weights while the weights are asleep (wake_up(tags=['weights']) first)")
        assert weights_iterator is not None and is_checkpoint_format
        params = dict(self.model.named_parameters())
        got = {}
        for name, t in weights_iterator:
            if name not in params:
                raise ValueError(f"There is no module or parameter named {name!r}")
            got[name] = t.detach().clone()
            if not self.skip_reload:
                params[name].copy_(t)
        self.received.append(got)
        self._lora_models.clear()  # vLLM's reload resets its LoRA state
        self.events.append("reload_weights")

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False) -> bool:
        self.events.append("reset_prefix_cache")
        return True

    # ---- sleep mode
    @torch.no_grad()
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("sleep() needs enable_sleep_mode=True")
        if level == 2:  # the weights are discarded: whatever reads them before a reload gets garbage
            for p in self.model.parameters():
                p.fill_(float("nan"))
        self.asleep = {"weights", "kv_cache"}
        self.events.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        for t in tags or ["weights", "kv_cache"]:
            assert t in ("weights", "kv_cache", "scheduling"), t
            self.asleep.discard(t)
        self.events.append(("wake_up", tuple(tags or ())))
        return not self.asleep

    # ---- generation
    def _lora_model(self, req: LoRARequest) -> torch.nn.Module:
        from peft import PeftModel

        if not self.kwargs.get("enable_lora"):
            raise ValueError("a LoRA request to an engine built without enable_lora=True")
        if req.lora_int_id not in self._lora_models:
            self.adapters[req.lora_int_id] = load_file(str(Path(req.lora_path) / "adapter_model.safetensors"))
            self._lora_models[req.lora_int_id] = PeftModel.from_pretrained(copy.deepcopy(self.model),
                                                                           req.lora_path).eval()
        return self._lora_models[req.lora_int_id]

    @torch.no_grad()
    def _sample(self, model, prompt: list[int], sp: SamplingParams) -> CompletionOutput:
        g = torch.Generator().manual_seed(sp.seed)
        stop = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else {self.eos})
        ids, tokens, logprobs, finish = list(prompt), [], [], "length"
        for _ in range(sp.max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float() / sp.temperature
            if sp.top_p < 1.0:  # nucleus: keep the most likely tokens until their mass reaches top_p
                probs, order = torch.softmax(logits, -1).sort(descending=True)
                drop = probs.cumsum(-1) - probs >= sp.top_p
                logits[order[drop]] = float("-inf")
            logp = torch.log_softmax(logits, -1)  # "processed_logprobs": after temperature and top-p
            tok = int(torch.multinomial(logp.exp(), 1, generator=g))
            tokens.append(tok)
            logprobs.append({tok: Logprob(float(logp[tok]) + self.logprob_offset,
                                          rank=int((logp > logp[tok]).sum()) + 1)})
            ids.append(tok)
            if tok in stop:
                finish = "stop"
                break
        return CompletionOutput(0, "", tokens, sum(lp[t].logprob for lp, t in zip(logprobs, tokens)),
                                logprobs if sp.logprobs is not None else None, finish)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, **_):
        if self.asleep:
            raise RuntimeError(f"generate() while asleep: {sorted(self.asleep)}")
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        assert len(sampling_params) == len(prompts)
        model = self.model
        if lora_request is not None:
            self.lora_requests.append(lora_request)
            model = self._lora_model(lora_request)
        self.events.append("generate")
        self.sampling += sampling_params
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            assert sp.n == 1 and sp.seed is not None
            ids = p["prompt_token_ids"]
            outs.append(RequestOutput(str(i), None, ids, [self._sample(model, ids, sp)]))
        return outs


def install(monkeypatch) -> types.ModuleType:
    """Make ``import vllm`` find this fake for the rest of the test, and let it run on the CPU."""
    import ippo.rl.vllm_rollout

    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.32.0+fake"
    vllm.LLM, vllm.SamplingParams, vllm.RequestOutput = LLM, SamplingParams, RequestOutput
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    vllm.lora, lora.request = lora, request
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(ippo.rl.vllm_rollout, "REQUIRED_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(LLM, "instances", [])
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(var, "")  # records the original state, so that what the sampler sets is undone
        monkeypatch.delenv(var)
    return vllm
