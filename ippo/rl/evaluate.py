"""Evaluation on a test split: greedy accuracy, mean per-sample accuracy, maj@k and pass@k (eval.k = 0:
greedy accuracy only).

``eval.response_metrics`` (``module:function``) adds task metrics computed from the greedy responses
(``fn(responses, rows) -> {name: float}``, e.g. the faithfulness rates of ``ippo.demo``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ippo.rl.config import EvalConfig
from ippo.rl.data import Example, PromptFormatter, derive_seed
from ippo.rl.parallel import distributed as dist
from ippo.rl.rewards import RewardFn, answers_match, extract_for_vote, load_callable, normalize_answer
from ippo.rl.rollout import generate


def majority_answer(answers: list[str | None]) -> str | None:
    """Most common normalised answer among the parseable ones; ties go to the first seen."""
    norm = [normalize_answer(a) for a in answers]
    norm = [a for a in norm if a is not None]
    if not norm:
        return None
    counts = Counter(norm)
    best = max(counts.values())
    return next(a for a in norm if counts[a] == best)


@torch.no_grad()
def evaluate(policy, tokenizer, fmt: PromptFormatter, rows: list[Example], ecfg: EvalConfig, reward_name: str,
             reward_fn: RewardFn, seed: int, iteration: int) -> dict[str, float]:
    """Each rank evaluates rows[rank::world]; counts are summed over ranks."""
    rows = rows[: ecfg.num_prompts] if ecfg.num_prompts else rows
    mine = list(range(dist.rank(), len(rows), dist.world_size()))
    extract = extract_for_vote(reward_name)
    was_training = policy.training
    policy.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # n, greedy, sample-mean, maj, pass
    greedy_texts: list[tuple[int, str]] = []  # (row index, greedy response) for eval.response_metrics
    for b in range(0, len(mine), ecfg.batch_prompts):
        batch = [rows[i] for i in mine[b:b + ecfg.batch_prompts]]
        prompts = [fmt.prompt_ids(e.question) for e in batch]
        greedy, _ = generate(policy, tokenizer, prompts, 1, max_new_tokens=ecfg.max_new_tokens, do_sample=False)
        samples = []
        if ecfg.k:  # k = 0: greedy only
            samples, _ = generate(policy, tokenizer, prompts, ecfg.k, max_new_tokens=ecfg.max_new_tokens,
                                  do_sample=True, temperature=ecfg.temperature, top_p=ecfg.top_p,
                                  seed=derive_seed(seed, "eval", iteration, mine[b]))
        for j, ex in enumerate(batch):
            g_text = tokenizer.decode(greedy[j], skip_special_tokens=True)
            greedy_texts.append((mine[b + j], g_text))
            s_texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples[j * ecfg.k:(j + 1) * ecfg.k]]
            correct = [reward_fn(t, ex.gold) > 0.5 for t in s_texts]
            sums += torch.tensor([1.0, float(reward_fn(g_text, ex.gold) > 0.5), sum(correct) / max(len(correct), 1),
                                  float(answers_match(majority_answer([extract(t) for t in s_texts]), ex.gold)),
                                  float(any(correct))], dtype=torch.float64)
    dist.all_reduce_sum(sums)
    if was_training:
        policy.train()
    n = max(sums[0].item(), 1.0)
    k = ecfg.k
    res = {"eval_prompts": int(sums[0].item()), "greedy_acc": sums[1].item() / n}
    if k:
        res.update({"mean_acc": sums[2].item() / n, f"maj@{k}": sums[3].item() / n, f"pass@{k}": sums[4].item() / n})
    if ecfg.response_metrics:
        res.update(response_metrics(ecfg.response_metrics, greedy_texts, rows, set(res)))
    return res


def response_metrics(spec: str, greedy_texts: list[tuple[int, str]], rows: list[Example],
                     reserved: set[str]) -> dict[str, float]:
    """``eval.response_metrics`` on every rank's greedy responses (gathered, in row order, so every rank
    computes the same numbers); the metrics must be numbers and must not shadow the built-in ones."""
    pairs = sorted(p for part in dist.all_gather_object(greedy_texts) for p in part)
    out = load_callable(spec)([t for _, t in pairs], [rows[i] for i, _ in pairs])
    if not isinstance(out, dict):
        raise TypeError(f"eval.response_metrics {spec!r} returned {type(out).__name__}, expected a dict")
    clash = sorted(set(out) & reserved)
    if clash:
        raise ValueError(f"eval.response_metrics {spec!r} returned reserved metric name(s): {', '.join(clash)}")
    bad = [k for k, v in out.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, (int, float))]
    if bad:
        raise TypeError(f"eval.response_metrics {spec!r}: non-numeric metric(s) {bad}")
    return {k: float(v) for k, v in out.items()}


def run_eval(cfg, checkpoint: str | None = None, base: bool = False) -> dict[str, float]:
    """``ippo eval``: the policy of ``checkpoint`` (default: the run's newest that verifies) on data.test_path;
    ``base``: model.path itself, untrained. A run with no checkpoint is an error (a mistyped run_dir would
    otherwise evaluate the untrained model), and evaluating never creates the run dir."""
    import tempfile

    from ippo.rl.checkpoint import CheckpointError, load_policy_into, verified_policy_checkpoint
    from ippo.rl.components import named_input
    from ippo.rl.config import ConfigError
    from ippo.rl.data import check_prompt_lengths, load_split
    from ippo.rl.models import load_policy, load_tokenizer, resolve_path
    from ippo.rl.rewards import make_reward_fn

    if not cfg.data.test_path:
        raise ConfigError("ippo eval needs data.test_path")
    if base and checkpoint is not None:
        raise ConfigError("ippo eval: --base evaluates model.path itself; it takes no --checkpoint")
    ck = None if base else verified_policy_checkpoint(cfg.run_dir, checkpoint)  # damaged ones reported, skipped
    if ck is None and not base:
        raise CheckpointError(f"run_dir {cfg.run_dir} has no checkpoint to evaluate (no {Path(cfg.run_dir) / 'checkpoints'}"
                              "): check run_dir, or pass --base to evaluate model.path untrained")
    device = dist.init_from_env(cfg.device)
    rows = load_split(cfg.data, "test", cfg.data.max_test_rows)
    reward_fn = named_input("reward.fn", make_reward_fn, cfg.reward.fn)
    with tempfile.TemporaryDirectory(prefix="ippo-eval-") as scratch:  # builtin:tiny-llama of a run dir not made
        path = resolve_path(cfg.model, cfg.run_dir if Path(cfg.run_dir).is_dir() else scratch)
        tok = load_tokenizer(cfg.model, path)
        fmt = PromptFormatter(tok, cfg.data.prompt_template, cfg.data.chat_template)
        check_prompt_lengths(rows, fmt, cfg.data.max_prompt_tokens, "test")
        policy = load_policy(cfg.model, path, device)
    if ck is not None:
        # whole tensors from either layout (a dist.strategy=fsdp checkpoint holds one shard file per rank)
        load_policy_into(ck, policy, cfg.model.lora, device)
    res = evaluate(policy, tok, fmt, rows, cfg.eval, cfg.reward.fn, reward_fn, cfg.seed, 0)
    res["checkpoint"] = str(ck) if ck is not None else None
    return res
