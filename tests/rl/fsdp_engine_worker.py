"""Worker of test_fsdp.py, run by torchrun as 2 gloo processes: the influence engine on an FSDP2-sharded
tiny Llama against the same model whole, in this process, on the whole batch (fp32).

Rank r holds validation rows r::2 and episodes 4r..4r+3 of 8. Checked, per mode (exact, target):
the all-reduced validation gradient, every episode's score, the gradient ``weighted_backward``
leaves in the shards (plus a second, unweighted stream through the same graph, as the trainer's
KL term), the clipped gradient norm and the weights after one SGD step. Then generation inside
``fsdp.unsharded``: the tokens equal the whole model's, and the two ranks run different numbers
of forwards (which would deadlock if each forward were a collective). Then rollout.engine=vllm's
weight sync from the sharded model (gathered tensors, whole names) and, with LoRA, the adapter it
writes for vLLM. Rank 0 writes the largest relative errors as JSON to argv[2].
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ippo
from ippo.rl.config import ModelConfig
from ippo.rl.models import load_tokenizer
from ippo.rl.parallel import fsdp
from ippo.rl.rollout import generate
from ippo.rl.vllm_rollout import adapter_tensors, policy_weights

torch.set_num_threads(1)
tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank = tdist.get_rank()
model_dir, out_path = sys.argv[1], sys.argv[2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def token_logp(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)  # [b, T-1]


gen = torch.Generator().manual_seed(0)
val = torch.randint(4, 40, (4, 9), generator=gen)
episodes = torch.randint(4, 40, (8, 7), generator=gen)
adv = torch.randn(8, generator=gen)
mine_val, mine = slice(rank, None, 2), slice(4 * rank, 4 * rank + 4)
errors: dict[str, float] = {}

for mode in ("exact", "target"):
    whole = AutoModelForCausalLM.from_pretrained(model_dir)
    sharded = fsdp.shard_model(AutoModelForCausalLM.from_pretrained(model_dir))
    assert type(sharded.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"
    e_whole = ippo.InfluenceEngine(whole, rank=4, backend="torch")
    e_shard = ippo.InfluenceEngine(sharded, rank=4, backend="torch")
    n_val_tokens = val[:, 1:].numel()

    with e_whole.recording():
        t_whole = e_whole.target(-token_logp(whole, val).sum() / n_val_tokens)
    with e_shard.recording():
        t_shard = e_shard.target(-token_logp(sharded, val[mine_val]).sum() / n_val_tokens)
    t_shard.all_reduce()
    errors[f"{mode}/target"] = max(rel(t_shard.weights[k], t_whole.weights[k]) for k in t_whole.weights)

    def episode_loss(model, ids, a):  # sum_e L_e with L_e = -A_e * sum_t log pi(token)
        lp = token_logp(model, ids)
        return -(a[:, None] * lp).sum(), lp

    with e_whole.recording():
        s_whole = e_whole.scores(episode_loss(whole, episodes, adv)[0], torch.arange(8), t_whole, mode=mode)
    with e_shard.recording():
        s_shard = e_shard.scores(episode_loss(sharded, episodes[mine], adv[mine])[0], torch.arange(4), t_shard,
                                 mode=mode)
    errors[f"{mode}/scores"] = rel(s_shard, s_whole[mine])

    # in_update: the global selection (threshold 0 on the whole model's scores), reweighted; a second,
    # unweighted stream (0.1 * sum log pi^2, a KL-like term) through the retained graph
    sel = ippo.select_episodes(s_whole, "threshold", 0.0)
    assert 0 < sel.num_kept < 8, sel.num_kept

    def fixed(part, sel=sel):
        return lambda scores: ippo.Selection(sel.keep[part], sel.weights[part].to(scores.dtype),
                                             int(sel.keep[part].sum()), 0, sel.mean_kept_score)

    for model, eng, ids, a, target, part in ((whole, e_whole, episodes, adv, t_whole, slice(None)),
                                             (sharded, e_shard, episodes[mine], adv[mine], t_shard, mine)):
        with eng.recording(weighted=True):
            loss, lp = episode_loss(model, ids, a)
        out = eng.weighted_backward(loss, torch.arange(len(ids)), target, mode=mode, select=fixed(part),
                                    retain_graph=True)
        (0.1 * lp.pow(2).sum()).backward()
        if model is sharded:
            errors[f"{mode}/in_update_scores"] = rel(out.scores, s_whole[mine])
    errors[f"{mode}/grads"] = max(rel(full(p.grad), q.grad) for p, q in zip(sharded.parameters(), whole.parameters()))

    n_whole = torch.nn.utils.clip_grad_norm_(list(whole.parameters()), 0.5)
    n_shard = fsdp.clip_grad_norm_(list(sharded.parameters()), 0.5)
    assert float(n_whole) > 0.5, "clipping must be active for the check to mean anything"
    errors[f"{mode}/grad_norm"] = rel(n_shard, n_whole)
    for model in (whole, sharded):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    errors[f"{mode}/weights_after_step"] = max(rel(full(p.detach()), q.detach())
                                               for p, q in zip(sharded.parameters(), whole.parameters()))
    moved = max(rel(q.detach(), r.detach()) for q, r in
                zip(whole.parameters(), AutoModelForCausalLM.from_pretrained(model_dir).parameters()))
    assert moved > 1e-3, moved

# generation: gathered once, no collective per forward (the ranks generate different lengths)
tok = load_tokenizer(ModelConfig(path=model_dir), model_dir)
prompts = [[1, 5, 6, 7], [1, 8, 9]]
max_new = 3 if rank == 0 else 9
args = {"max_new_tokens": max_new, "do_sample": True, "seed": 7, "stop_ids": {2}}
with fsdp.unsharded(sharded):
    assert type(sharded.model.layers[0].mlp.up_proj.weight).__name__ != "DTensor"  # whole inside
    got, _ = generate(sharded, tok, prompts, 2, **args)
assert type(sharded.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"  # resharded after
expected, _ = generate(whole, tok, prompts, 2, **args)
assert got == expected, (got, expected)
assert max(len(r) for r in got) == max_new  # random weights never stop early here: different counts per rank
# a training forward/backward still works after the rollout
token_logp(sharded, episodes[mine]).sum().backward()
assert all(p.grad is not None for p in sharded.parameters())

# rollout.engine=vllm's weight sync from a sharded policy: each parameter gathered (one at a time, in the
# same order on every rank) under the whole model's name
synced = list(policy_weights(sharded))
assert [n for n, _ in synced] == [n for n, _ in whole.named_parameters()]
assert not any(hasattr(t, "full_tensor") for _, t in synced)
errors["vllm/weight_sync"] = max(rel(t, q.detach()) for (_, t), (_, q) in zip(synced, whole.named_parameters()))
# ... and with LoRA its adapter, written by PEFT's save_pretrained from the gathered tensors (PEFT alone would
# save DTensors): the same file contents as the whole model's adapter
lora_cfg = {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}  # B != 0
adapters = {}
with tempfile.TemporaryDirectory() as d:
    for kind in ("whole", "sharded"):
        torch.manual_seed(3)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**lora_cfg))
        if kind == "sharded":
            fsdp.shard_model(model)
        assert (adapter_tensors(model) is None) == (kind == "whole")
        state = adapter_tensors(model)
        model.save_pretrained(f"{d}/{kind}", **({"state_dict": state} if state is not None else {}))
        adapters[kind] = load_file(f"{d}/{kind}/adapter_model.safetensors")
assert adapters["whole"].keys() == adapters["sharded"].keys() and adapters["whole"]
errors["vllm/lora_adapter"] = max(rel(adapters["sharded"][k], adapters["whole"][k]) for k in adapters["whole"])

if rank == 0:
    Path(out_path).write_text(json.dumps(errors, indent=1))
tdist.destroy_process_group()
