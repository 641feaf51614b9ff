"""``rollout.engine=vllm``: rollouts from a vLLM engine colocated with the trainer (same process, same GPU).

Written against vLLM 0.32.0 (the release whose torch pin is this project's torch 2.13.0; ``pip install
-e .[vllm]``). Per rollout (``VLLMSampler.sample``):

1. wake the weights (``LLM.wake_up(tags=["weights"])``) when the engine sleeps between rollouts;
2. send it the policy's current weights, i.e. those of the last PPO update, without a disk round-trip:
   ``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` hands vLLM's worker the
   policy's own tensors (the engine runs in this process: ``distributed_executor_backend=
   "external_launcher"``, no engine subprocess, so nothing is serialised); vLLM's in-place reload maps
   the Hugging Face names onto its fused layers. With ``model.lora`` only the adapter travels, as a
   ``LoRARequest`` (vLLM loads adapters from a directory: a few MB, written to /dev/shm when it exists);
3. wake the KV cache and sample every episode as its own request, seeded ``derive_seed(prompt seed, s)``
   (per-request generators: the samples do not depend on how vLLM batches them), with the rollout's
   temperature and top-p, no top-k / penalties, the trainer's stop tokens, and ``logprobs=0`` (the
   sampled token's log-prob, after temperature and top-p: ``logprobs_mode="processed_logprobs"``);
4. sleep (``rollout.vllm.sleep_level``), so that the update phase gets the GPU memory back.

The engine's log-probs are logged against the trainer's own (``logp_mismatch_*`` metrics) and never
enter the loss: the PPO ratio keeps the trainer's old log-probs. The trainer's log-probs model the
temperature but not the top-p truncation, so with top_p < 1 the signed mismatch is >= 0 by the log of
the probability mass top-p keeps (<= -log(top_p) per token), on top of kernel differences.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from ippo.rl.config import ConfigError, TrainConfig
from ippo.rl.data import derive_seed
from ippo.rl.parallel import distributed as dist
from ippo.rl.rollout import Samples, cut_at_stop, stop_token_ids

VLLM_VERSION = "0.32.0"
INSTALL_HINT = ("pip install -e .[vllm]  (vLLM 0.32.0 with its CUDA build of torch 2.13.0, on a GPU machine; "
                "see README, 'vLLM rollouts')")
REQUIRED_DEVICE_TYPE = "cuda"  # vLLM's GPU executor; the CPU tests swap in a fake vLLM and lift this
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts


def import_vllm():
    """The vllm module, or an ImportError that says how to get it."""
    # In-process engine core: the weight sync hands vLLM live tensors, which an engine subprocess could not
    # receive without serialising them. external_launcher sets this too; set it before vllm reads it.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
        from vllm.lora.request import LoRARequest  # noqa: F401  (the LoRA route needs it; fail here if absent)
    except ImportError as e:
        raise ImportError(f"rollout.engine=vllm needs vLLM, which is not importable ({e}). Install it with: "
                          f"{INSTALL_HINT}; or use rollout.engine=hf") from e
    return vllm


def policy_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's parameters under their Hugging Face names (tied weights once), gathered when sharded.

    A generator: vLLM copies each tensor into its own layers as it comes, so at most one gathered
    (FSDP ``DTensor.full_tensor()``) parameter exists at a time. Every rank must drain it in step.
    """
    for name, p in policy.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t


def adapter_tensors(policy: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded (FSDP) PEFT policy's adapter as whole tensors, for ``save_pretrained(state_dict=...)``;
    None when the policy is not sharded (PEFT then reads its own state dict).

    PEFT's ``save_pretrained`` reads ``state_dict()``, whose values are DTensors on a sharded model: it
    would not write whole adapters. Every rank gathers every trainable parameter, in the same order.
    """
    trainable = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    if not any(hasattr(p, "full_tensor") for _, p in trainable):
        return None
    return {name: (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()) for name, p in trainable}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env() -> None:
    """vLLM's external launcher reads torchrun's variables; a process torchrun did not start is rank 0 of 1.

    vLLM then initialises torch.distributed in this process (world size 1), so ``ippo.rl.parallel.distributed``'s
    collectives run over that group from here on: identities with one rank.
    """
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))


class VLLMSampler:
    """The colocated vLLM engine of one rank: ``sample(prompts, seeds)`` as ``ippo.rl.rollout.HFSampler``'s,
    plus the engine's own log-probs and timings. Every rank builds one (vLLM's start-up is collective)."""

    def __init__(self, cfg: TrainConfig, policy: torch.nn.Module, tokenizer, model_path: str,
                 device: torch.device):
        if device.type != REQUIRED_DEVICE_TYPE:
            raise ConfigError(f"rollout.engine=vllm needs a CUDA GPU, but this run's device is {device} "
                              "(device=auto found none): use rollout.engine=hf")
        vllm = import_vllm()
        from vllm.lora.request import LoRARequest

        self.vllm, self.lora_request_cls = vllm, LoRARequest
        self.cfg, self.rc, self.vc = cfg, cfg.rollout, cfg.rollout.vllm
        self.policy, self.tok = policy, tokenizer
        self.stop_ids = stop_token_ids(tokenizer, policy)
        self.lora = cfg.model.lora
        self.asleep: set[str] = set()  # the memory tags vLLM has released ("weights", "kv_cache")
        self.version = 0  # weight syncs so far (LoRA adapter ids are 1, 2, ...)
        self.lora_request = None
        self.lora_dir = None
        if self.lora:
            shm = Path("/dev/shm")
            self.lora_dir = Path(tempfile.mkdtemp(prefix=f"ippo-lora-rank{dist.rank()}-",
                                                  dir=shm if shm.is_dir() else None))
            weakref.finalize(self, shutil.rmtree, self.lora_dir, True)
        _launcher_env()
        kwargs = {
            "model": model_path, "tokenizer": model_path, "dtype": cfg.model.dtype, "seed": cfg.seed,
            "trust_remote_code": cfg.model.trust_remote_code,
            "gpu_memory_utilization": self.vc.gpu_memory_utilization,
            "max_model_len": self.vc.max_model_len or cfg.data.max_prompt_tokens + self.rc.max_new_tokens,
            "enforce_eager": self.vc.enforce_eager,
            "enable_sleep_mode": self.vc.sleep_level > 0,
            # in this process, one engine per rank (each rank samples its own prompts)
            "distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1,
            "logprobs_mode": "processed_logprobs",  # the sampled distribution: after temperature and top-p
            "generation_config": "vllm",  # no sampling defaults from the checkpoint: SamplingParams say it all
        }
        if self.lora:
            rank = next((r for r in LORA_RANKS if r >= cfg.model.lora_r), None)
            if rank is None:
                raise ConfigError(f"model.lora_r={cfg.model.lora_r}: vLLM supports LoRA ranks up to {LORA_RANKS[-1]}")
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        self.llm = vllm.LLM(**kwargs)

    # ------------------------------------------------------------------ phases of one rollout
    def _wake(self, tag: str) -> float:
        if tag not in self.asleep:
            return 0.0
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the trainer's cached blocks back so that vLLM can map its memory
        self.llm.wake_up(tags=[tag])
        self.asleep.discard(tag)
        return time.perf_counter() - t0

    def _sleep(self) -> float:
        if not self.vc.sleep_level:
            return 0.0
        t0 = time.perf_counter()
        self.llm.sleep(level=self.vc.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        return time.perf_counter() - t0

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Make vLLM sample from the policy as it is now: all its weights, or with LoRA its adapter."""
        self.version += 1
        if self.lora:
            self._sync_adapter()
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(self.policy),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def _sync_adapter(self) -> None:
        # vLLM loads an adapter from a directory when a request first names its id; the previous
        # version's was loaded by the previous rollout and its id is never used again (LRU-evicted)
        for old in self.lora_dir.iterdir():
            shutil.rmtree(old)
        path = self.lora_dir / f"v{self.version}"
        whole = adapter_tensors(self.policy)  # sharded (dist.strategy=fsdp): gathered; else None
        # PEFT: adapter_config.json + adapter_model.safetensors only
        self.policy.save_pretrained(str(path), **({"state_dict": whole} if whole is not None else {}))
        self.lora_request = self.lora_request_cls(lora_name=f"ippo-policy-v{self.version}",
                                                  lora_int_id=self.version, lora_path=str(path))

    def sampling_params(self, seed: int):
        rc = self.rc
        return self.vllm.SamplingParams(
            n=1, seed=seed, temperature=rc.temperature, top_p=rc.top_p, top_k=0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            max_tokens=rc.max_new_tokens, stop_token_ids=sorted(self.stop_ids), logprobs=0,
            detokenize=False)  # the trainer decodes

    def sample(self, prompts: list[list[int]], seeds: list[int]) -> Samples:
        n = self.rc.samples_per_prompt
        t_wake = self._wake("weights")
        t0 = time.perf_counter()
        self.sync_weights()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t_sync = time.perf_counter() - t0
        t_wake += self._wake("kv_cache")
        requests = [{"prompt_token_ids": p} for p in prompts for _ in range(n)]
        params = [self.sampling_params(derive_seed(seed, s)) for seed in seeds for s in range(n)]
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        t_gen = time.perf_counter() - t0
        t_sleep = self._sleep()
        out = Samples([], [])
        for req in outputs:
            c = req.outputs[0]
            tokens = list(c.token_ids)
            if not tokens:
                raise RuntimeError(f"vLLM returned an empty response (finish_reason={c.finish_reason!r}) for a "
                                   f"prompt of {len(req.prompt_token_ids)} tokens")
            resp, truncated = cut_at_stop(tokens, self.stop_ids)
            out.responses.append(resp)
            out.truncated.append(truncated)
            out.logprobs.append(torch.tensor([c.logprobs[i][t].logprob for i, t in enumerate(resp)]))
        out.stats = {"time_vllm_weight_sync": t_sync, "time_vllm_generate": t_gen,
                     "time_vllm_wake": t_wake, "time_vllm_sleep": t_sleep,
                     "vllm_tokens_per_s": sum(len(r) for r in out.responses) / max(t_gen, 1e-9)}
        return out
