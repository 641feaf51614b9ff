"""Score every episode of a batch against a validation gradient, then filter them as I-PPO does.

A tiny random Llama stands in for the policy: 16 episodes (sampled continuations weighted by
random advantages) are scored in exact, target-aligned and sketch modes in one backward each,
checked against a per-episode autograd loop, and passed to ``ippo.select_episodes``.

    python examples/score_episodes.py
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ippo


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    episodes = torch.randint(0, 128, (16, 32))
    advantages = torch.randn(16, 1).expand(16, 31)
    validation = torch.randint(0, 128, (8, 32))

    def policy_loss(rows=slice(None)):  # sum over episodes of -A * log pi (the PPO gradient at ratio 1)
        logp = torch.log_softmax(model(episodes[rows]).logits[:, :-1], -1)
        logp = logp.gather(-1, episodes[rows, 1:, None]).squeeze(-1)
        return -(advantages[rows] * logp).sum()

    engine = ippo.InfluenceEngine(model, rank=32)
    print(f"backends: { {k: v.available for k, v in ippo.influence.backends().items()} }")
    print(f"hooked {len(engine.module_names)} linear layers\n")
    rows = []
    for mode in ("exact", "target", "sketch"):
        start = time.perf_counter()
        with engine.recording():
            val_loss = model(validation, labels=validation).loss
            train_loss = policy_loss()
        target = engine.target(val_loss)
        scores = engine.scores(train_loss, torch.arange(16), target, mode=mode)
        rows.append((mode, scores, time.perf_counter() - start))

    # The definition, for comparison: one backward per episode, flattened gradients, dot product.
    params = [p for p in model.parameters() if p.dim() == 2 and p is not model.model.embed_tokens.weight]
    g_val = torch.cat([g.flatten() for g in torch.autograd.grad(model(validation, labels=validation).loss, params)])
    start = time.perf_counter()
    loop = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(policy_loss(slice(e, e + 1)), params)])
                        @ g_val for e in range(16)])
    loop_time = time.perf_counter() - start

    exact = rows[0][1]
    print(f"{'method':<22}{'time (s)':>10}{'rel err vs loop':>18}{'sign agreement':>16}")
    print(f"{'per-episode loop':<22}{loop_time:>10.3f}{0.0:>18.1e}{'16/16':>16}")
    for mode, scores, t in rows:
        err = float((scores - loop).norm() / loop.norm())
        agree = int(((scores > 0) == (loop > 0)).sum())
        print(f"{'ippo ' + mode:<22}{t:>10.3f}{err:>18.1e}{f'{agree}/16':>16}")
    selection = ippo.select_episodes(exact, rule="threshold", value=0.0)
    print(f"\nI-PPO keeps {selection.num_kept}/16 episodes; weights of the kept ones: "
          f"{[round(w, 2) for w in selection.weights[selection.keep].tolist()]}")


if __name__ == "__main__":
    main()
