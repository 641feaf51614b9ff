"""Rollouts: sample n responses per prompt, and lay episodes out as tensors.

Two engines behind one interface (``Sampler.sample``, picked by ``ippo.rl.components.make_sampler`` from ``rollout.engine``):
``HFSampler`` runs the policy's own ``generate`` (KV cache); ``ippo.rl.vllm_rollout.VLLMSampler`` runs a
colocated vLLM engine that first receives the policy's current weights.

Conventions that the rest of the trainer relies on:
* prompts are left-padded, responses right-padded, so every response starts at column ``P``
  (the batch's padded prompt length) and ``logits[:, P-1+t]`` predicts response token ``t``;
* a response ends at its first stop token (EOS; inclusive). Anything ``generate`` wrote after
  it (padding, which may *be* EOS when pad = eos) is dropped here, so pad = eos tokenizers are safe;
* a response that never emits a stop token is kept whole and flagged ``truncated``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ippo.rl.data import derive_seed, pad_batch
from ippo.rl.parallel import distributed as dist
from ippo.rl.parallel import fsdp


@dataclass
class Episodes:
    """One iteration's episodes on this rank (episode e = sample e % n of prompt e // n)."""

    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    truncated: list[bool]
    prompt_rows: list[int]  # dataset row of each episode's prompt
    group: list[int]  # global prompt position within the iteration (GRPO groups, logs)
    texts: list[str] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)  # V(s_t) per response token (shared critic)
    engine_logprobs: list[torch.Tensor] = field(default_factory=list)  # the rollout engine's own log-probs (vLLM)
    rollout_stats: dict[str, float] = field(default_factory=dict)  # the engine's own timings (vLLM)

    def __len__(self) -> int:
        return len(self.response_tokens)

    def take(self, idx: list[int]) -> Episodes:
        """Episodes ``idx`` (in that order); the engine's timings stay with them."""
        per_episode = {f.name: [getattr(self, f.name)[i] for i in idx] if getattr(self, f.name) else []
                       for f in dataclasses.fields(self) if f.name != "rollout_stats"}
        return Episodes(**per_episode, rollout_stats=dict(self.rollout_stats))

    @staticmethod
    def join(parts: list[Episodes], rollout_stats: dict[str, float] | None = None) -> Episodes:
        """The episodes of ``parts`` one after another, with ``rollout_stats`` (default: none)."""
        per_episode = {f.name: [x for p in parts for x in getattr(p, f.name)]
                       for f in dataclasses.fields(Episodes) if f.name != "rollout_stats"}
        return Episodes(**per_episode, rollout_stats=dict(rollout_stats or {}))


@dataclass
class Samples:
    """What a rollout engine returns: n responses per prompt, prompt-major (row i = sample i % n of prompt i // n)."""

    responses: list[list[int]]
    truncated: list[bool]
    values: list[torch.Tensor] = field(default_factory=list)  # V(s_t) per token (HF engine + shared critic)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # the engine's log-prob of each sampled token
    stats: dict[str, float] = field(default_factory=dict)  # the engine's own timings, logged as metrics


class Sampler(Protocol):
    """A rollout engine. ``seeds[j]`` is prompt j's seed, a function of (run seed, iteration, prompt position)."""

    def sample(self, prompts: list[list[int]], seeds: list[int]) -> Samples: ...


def stop_token_ids(tokenizer, model) -> set[int]:
    """EOS of the tokenizer plus the generation config's (chat models often list several)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen, int):
        ids.add(gen)
    elif isinstance(gen, (list, tuple)):
        ids.update(int(i) for i in gen)
    return {i for i in ids if i is not None}


def cut_at_stop(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """Tokens up to and including the first stop token; (tokens, truncated=True) when there is none."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], False
    return tokens, True


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], n: int, *, max_new_tokens: int, do_sample: bool,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: set[int] | None = None) -> tuple[list[list[int]], list[bool]]:
    """n responses for each prompt (prompt-major order). Seeds torch's global RNG first when given."""
    device = next(model.parameters()).device
    stop_ids = stop_ids or stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    input_ids = pad_batch(prompts, pad, side="left").to(device)
    attn = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        attn[i, input_ids.shape[1] - len(p):] = 1
    if seed is not None:
        torch.manual_seed(seed)
    kw = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "num_return_sequences": n,
              "pad_token_id": pad, "eos_token_id": sorted(stop_ids), "use_cache": True}
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=input_ids, attention_mask=attn, **kw)
    gen = out[:, input_ids.shape[1]:].tolist()
    responses, truncated = [], []
    for toks in gen:
        r, t = cut_at_stop(toks, stop_ids)
        if not r:  # max_new_tokens=0 cannot happen (validated), but never return an empty episode
            r, t = [pad], True
        responses.append(r)
        truncated.append(t)
    return responses, truncated


def collate(prompts: list[list[int]], responses: list[list[int]], pad: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """-> input_ids [b, P+T], attention_mask [b, P+T], response_mask [b, T], P."""
    P = max(len(p) for p in prompts)
    T = max(len(r) for r in responses)
    b = len(prompts)
    ids = torch.full((b, P + T), pad, dtype=torch.long)
    attn = torch.zeros((b, P + T), dtype=torch.long)
    rmask = torch.zeros((b, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(r)] = torch.tensor(r)
        attn[i, P - len(p):P + len(r)] = 1
        rmask[i, :len(r)] = 1
    return ids, attn, rmask, P


def pad_right(rows: list[torch.Tensor], T: int | None = None) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into [n, T] (zeros after each row)."""
    T = T or max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), T, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r[:T]
    return out


class HFSampler:
    """``rollout.engine=hf``: the policy's own ``generate``, in calls of ``rollout.gen_batch_prompts`` prompts
    (one prompt per call with ``rollout.seed_per_prompt``), each call seeded by its first prompt's seed.

    With a shared critic (``value_head``) the values V(s_t) of every sampled token are read off the same
    ``generate`` forwards: generation step t's last hidden state is the state that samples token t.
    A sharded policy (``dist.strategy=fsdp``) is all-gathered once for the whole rollout
    (``fsdp.unsharded``): ranks then run different numbers of forwards without any collective.
    """

    def __init__(self, policy, tokenizer, rollout_cfg, value_head=None):
        self.policy, self.tok, self.rc, self.value_head = policy, tokenizer, rollout_cfg, value_head

    def sample(self, prompts: list[list[int]], seeds: list[int]) -> Samples:
        self.policy.eval()  # use_cache stays on; dropout is disabled anyway
        with fsdp.unsharded(self.policy):
            out = self._generate(prompts, seeds)
        self.policy.train()
        return out

    def _generate(self, prompts: list[list[int]], seeds: list[int]) -> Samples:
        rc, head = self.rc, self.value_head
        per_call = 1 if rc.seed_per_prompt else (rc.gen_batch_prompts or len(prompts))
        out = Samples([], [])
        for first in range(0, len(prompts), per_call):
            group = prompts[first:first + per_call]
            with head.reading(self.policy, last_position=True) if head else contextlib.nullcontext() as steps:
                resp, trunc = generate(self.policy, self.tok, group, rc.samples_per_prompt,
                                       max_new_tokens=rc.max_new_tokens, do_sample=True, temperature=rc.temperature,
                                       top_p=rc.top_p, seed=seeds[first])
            if head:
                if len(steps) < max(len(r) for r in resp):
                    raise RuntimeError(f"ppo.critic=shared: generate ran {len(steps)} forwards for responses of up "
                                       f"to {max(len(r) for r in resp)} tokens (the output embedding was not called "
                                       "once per sampled token)")
                step_values = torch.stack(steps, 1).cpu()  # [rows, steps]
                out.values += [step_values[row, :len(r)] for row, r in enumerate(resp)]
            out.responses += resp
            out.truncated += trunc
        return out


def sample_episodes(sampler: Sampler, tok, fmt, rows, positions: list[int], row_ids: list[int], n: int, seed: int,
                    it: int) -> Episodes:
    """Sample n responses for each prompt ``rows[row_ids[j]]`` (at position ``positions[j]`` of the iteration).

    Prompt j's seed depends on (seed, iteration, its position in the iteration) only; the HF engine
    seeds each generate() call with its first prompt's, vLLM each episode with (prompt seed, sample).
    """
    prompts = [fmt.prompt_ids(rows[r].question) for r in row_ids]
    out = sampler.sample(prompts, [derive_seed(seed, "rollout", it, p) for p in positions])
    of = [j for j in range(len(prompts)) for _ in range(n)]  # episode -> its prompt
    return Episodes(prompt_tokens=[prompts[j] for j in of], response_tokens=out.responses, truncated=out.truncated,
                    prompt_rows=[row_ids[j] for j in of], group=[positions[j] for j in of],
                    texts=[tok.decode(r, skip_special_tokens=True) for r in out.responses], values=out.values,
                    engine_logprobs=out.logprobs, rollout_stats=out.stats)


def logprob_mismatch(engine_logprobs: list[torch.Tensor], old_logp: torch.Tensor, mask: torch.Tensor
                     ) -> dict[str, float]:
    """Train-inference mismatch of the sampled tokens' log-probs, over all ranks' response tokens:
    mean |engine - trainer|, its signed mean and max. The trainer's are ``old_logp`` (theta_old, the
    PPO ratio's denominator); the engine's never enter the loss.
    """
    eng = pad_right(engine_logprobs, old_logp.shape[1]).to(old_logp.device, old_logp.dtype)
    diff = (eng - old_logp) * mask
    sums = torch.stack([diff.abs().sum(), diff.sum(), mask.sum()]).double()
    peak = diff.abs().max().reshape(1).double()
    dist.all_reduce_sum(sums)
    dist.all_reduce_max(peak)
    n = max(float(sums[2]), 1.0)
    return {"logp_mismatch_abs": float(sums[0]) / n, "logp_mismatch_mean": float(sums[1]) / n,
            "logp_mismatch_max": float(peak[0])}
