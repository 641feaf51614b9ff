"""THE loop: Influence-Guided PPO (I-PPO), readable top to bottom. Plain PPO = ``influence.enabled=false``.

Each iteration:
  1. rollout     B prompts x n sampled responses -> episodes (this rank's share of the prompts)
  2. reward      rule reward per episode (binary correctness)
  3. log-probs   reference log-probs and critic values (no grad; with ppo.critic=shared the values
                 were read off generate's own forwards by a head on the policy's final hidden state)
  4. advantages  GAE (gamma, lambda; whitened over the global batch) or GRPO
  5. I-PPO       validation gradient (SFT loss on n_val gold solutions, one backward), then the
                 old-log-prob forward *with grad inside engine.recording()*: the same forward gives
                 the old log-probs and each episode's scoring loss, whose activation-only backward
                 scores every episode; scores are all-gathered, so every rank keeps the same episodes
  6. filter      drop score <= 0 episodes, weight kept ones by score / mean(kept score)
  7. update      PPO epochs on the kept buffer (weighted clipped surrogate + KL + value loss); a step whose
                 loss or gradient norm is NaN/Inf is skipped, ppo.max_nonfinite_steps of them in a row stop

With ``influence.timing=in_update`` steps 5-6 move inside step 7: in the first PPO epoch each
micro-batch's backward scores its episodes at the current parameters, selects and reweights them,
and forms the weighted gradient in the same pass (``engine.weighted_backward``); the terms that
``influence.episode_loss`` leaves out of the episode's loss (KL, entropy, value) stay unweighted
through a second gradient stream (episode_loss=all with a shared critic leaves none out: one backward). Later epochs reuse that selection with
a plain backward (as before_update reuses its own), so scoring costs one deferred backward per
episode per iteration. With several processes each rank's micro-batches select on their own (as
micro-batches do in one process) and the selections are summed over ranks after epoch 0.
``dist.strategy=fsdp`` shards policy, critic and reference with FSDP2 (``ippo/fsdp.py``): the loop is
the same, plus the rollout gathered once, zero-weighted stand-in passes where ranks have fewer
micro-batches than others (forwards of sharded models are collectives), and sharded checkpoints.
  8. log, eval, checkpoint

Reproducibility: everything random is derived from (seed, iteration, ...) -- the prompts, the
validation draw, the sampling seed of each generate() call, the mini-batch order -- so a run
resumed from a checkpoint retraces an uninterrupted run exactly (same weights, CPU, same seed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ippo.errors import NonFiniteError
from ippo.influence import InfluenceEngine, Selection, select_episodes
from ippo.rl import controls
from ippo.rl.checkpoint import restore_checkpoint, save_checkpoint, save_sharded_checkpoint, warn
from ippo.rl.config import ConfigError, TrainConfig, to_dict
from ippo.rl.data import (
    PromptFormatter,
    check_prompt_lengths,
    derive_seed,
    iteration_prompts,
    iteration_val_indices,
    load_split,
    pad_batch,
)
from ippo.rl.evaluate import evaluate
from ippo.rl.losses import (
    aggregate,
    aggregate_per_episode,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_estimate,
    logprobs_from_logits,
    masked_whiten,
    policy_loss_per_token,
    scoring_loss_per_episode,
    sft_loss_sum,
    token_rewards,
    value_loss_per_token,
)
from ippo.rl.models import (
    SharedValueHead,
    causal_lm_logits,
    load_policy,
    load_reference,
    load_tokenizer,
    load_value_model,
    resolve_path,
    trainable_parameters,
)
from ippo.rl.parallel import distributed as dist
from ippo.rl.parallel import fsdp
from ippo.rl.rewards import make_reward_fn
from ippo.rl.rollout import Episodes, Sampler, collate, logprob_mismatch, make_sampler
from ippo.rl.run_log import RunLogger

# ---------------------------------------------------------------------------------------------
# small helpers (the loop itself is `train` below)


class PhaseTimer:
    """Wall time per phase, summed within an iteration (CUDA synchronised so times are real)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times[name] += time.perf_counter() - t0


def minibatch_order(kept_ids: torch.Tensor, seed: int, it: int, epoch: int) -> list[int]:
    """The seeded order in which one PPO epoch visits the kept episodes (global ids)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "minibatch", it, epoch))
    return kept_ids[torch.randperm(len(kept_ids), generator=g)].tolist()


def chunks(xs: list, size: int) -> list[list]:
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def episode_batch(ep: Episodes, idx: list[int], pad: int, device: torch.device):
    """Collated tensors of episodes ``idx``: ids, attention mask, response mask [b, T], P."""
    ids, attn, rmask, P = collate([ep.prompt_tokens[i] for i in idx], [ep.response_tokens[i] for i in idx], pad)
    return ids.to(device), attn.to(device), rmask.to(device), P


def response_logits(model, ids: torch.Tensor, attn: torch.Tensor, P: int, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict the response tokens: positions P-1 .. P+T-2 -> [b, T, V].

    Divided by the sampling temperature: the responses were drawn from softmax(logits / T), so the
    log-probs of the PPO ratio, the KL and the influence scores must be those of that policy
    (top-p truncation is not modelled, as in common PPO implementations).
    """
    logits = causal_lm_logits(model, ids, attn)[:, P - 1:-1]
    return logits / temperature if temperature != 1.0 else logits


def response_values(value_model, ids: torch.Tensor, attn: torch.Tensor, P: int) -> torch.Tensor:
    """V(s_t) for every response token t: the critic at the position that predicts token t."""
    return value_model(ids, attn)[:, P - 1:-1]


def rollout(sampler: Sampler, tok, fmt: PromptFormatter, rows, positions: list[int], row_ids: list[int],
            cfg: TrainConfig, it: int) -> Episodes:
    """Sample n responses for each of this rank's prompts with the rollout engine (``rollout.engine``).

    Prompt j's seed depends on (seed, iteration, its position in the iteration) only; the HF engine
    seeds each generate() call with its first prompt's, vLLM each episode with (prompt seed, sample).
    """
    n = cfg.rollout.samples_per_prompt
    prompts = [fmt.prompt_ids(rows[r].question) for r in row_ids]
    out = sampler.sample(prompts, [derive_seed(cfg.seed, "rollout", it, p) for p in positions])
    of = [j for j in range(len(prompts)) for _ in range(n)]  # episode -> its prompt
    return Episodes(prompt_tokens=[prompts[j] for j in of], response_tokens=out.responses, truncated=out.truncated,
                    prompt_rows=[row_ids[j] for j in of], group=[positions[j] for j in of],
                    texts=[tok.decode(r, skip_special_tokens=True) for r in out.responses], values=out.values,
                    engine_logprobs=out.logprobs, rollout_stats=out.stats)


def validation_target(engine, policy, tok, fmt: PromptFormatter, val_rows, indices: list[int], val_batch: int,
                      device: torch.device, factor_rank: int = 0, lockstep: bool = False):
    """Gradient of the SFT loss (token mean over the *global* validation draw) on the hooked layers.

    This rank handles indices[rank::world]; the per-rank gradients are summed with an all-reduce,
    so every rank ends with the same global target. ``factor_rank=q`` (target mode): the target
    keeps the validation factors instead of the dense gradient, builds its rank-q basis from them
    (summed over the ranks, stage by stage) and frees them. ``lockstep`` (sharded policy): every rank
    runs as many chunks as the rank with the most, a zero-weighted stand-in where it has none left.
    """
    mine = indices[dist.rank()::dist.world_size()]
    seqs = [fmt.sft_ids(val_rows[i].question, val_rows[i].solution) for i in mine]
    count = torch.tensor([float(sum(sum(1 for x in lab[1:] if x != -100) for _, lab in seqs))], dtype=torch.float64)
    dist.all_reduce_sum(count)
    total_tokens = max(count.item(), 1.0)
    target = None
    for part in fsdp.pad_to_max(chunks(seqs, val_batch or max(1, len(seqs))), lockstep):
        weight = 1.0 if part is not None else 0.0  # 0: a stand-in (see fsdp.pad_to_max)
        part = part if part is not None else seqs[:1]
        ids = pad_batch([s for s, _ in part], tok.pad_token_id).to(device)
        labels = pad_batch([lab for _, lab in part], -100).to(device)
        attn = torch.zeros_like(ids)
        for i, (s, _) in enumerate(part):
            attn[i, :len(s)] = 1
        with engine.recording():
            loss_sum, _ = sft_loss_sum(causal_lm_logits(policy, ids, attn), labels)
            t = engine.target(loss_sum * (weight / total_tokens), basis="factor" if factor_rank else "dense")
        target = t if target is None else target.add_(t)  # targets of disjoint chunks add up
    if target is None:  # this rank drew no validation example: contribute zeros
        raise RuntimeError("influence.n_val is smaller than the number of ranks")
    if dist.is_dist():
        target.all_reduce()
    if factor_rank:  # collective on several ranks: every rank builds the basis here, at the same point
        target.basis(factor_rank)
        target.drop_factors()
    return target


@dataclass(frozen=True)
class IterationSelection(Selection):
    """Selection plus whether the reweighting fell back to uniform weights."""

    reweight_fallback: bool = False


def select_and_weight(scores: torch.Tensor, ic) -> Selection:
    """The I-PPO filter with this run's rule; weights = score / mean(kept) or, without reweighting or
    when that mean is not positive (possible with the fraction rules), 1 for every kept episode."""
    sel = select_episodes(scores, rule=ic.filter, value=ic.threshold if ic.filter == "threshold" else ic.fraction)
    fallback = bool(ic.reweight and sel.num_kept and not sel.mean_kept_score > 0)
    weights = sel.weights if ic.reweight and not fallback else sel.keep.to(scores.dtype)
    return IterationSelection(sel.keep, weights, sel.num_kept, sel.num_dropped, sel.mean_kept_score,
                              reweight_fallback=fallback)


def control_selection(cfg: TrainConfig, rewards: torch.Tensor, informative: torch.Tensor,
                      matched: controls.MatchedSchedule | None, it: int
                      ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """A control filter's (keep, weights) over all E episodes, and why nothing is kept (or None).

    ``rewards`` and ``informative`` (non-zero advantage) are the global [E] tensors, so every rank
    computes the same selection.
    """
    cc, E = cfg.control, rewards.shape[0]
    if cc.filter == "zero_variance":
        keep = controls.zero_variance(rewards, cfg.rollout.samples_per_prompt)
        return keep, keep.float(), None if keep.any() else (
            f"iteration {it}: control.filter=zero_variance kept nothing (every prompt's samples got the same reward)")
    if it not in matched.kept:
        return (torch.zeros(E, dtype=torch.bool), torch.zeros(E),
                f"iteration {it}: the matched run {matched.run_dir} has no iteration {it} (it stopped earlier)")
    if matched.episodes[it] != E:
        raise ConfigError(f"control.match_run={matched.run_dir} had {matched.episodes[it]} episodes in iteration {it}, "
                          f"this run has {E}: match a run with the same rollout settings")
    pool = informative if cc.pool == "informative" else torch.ones(E, dtype=torch.bool)
    weights = matched.weights[it] if cc.weights == "matched" else None
    keep, w = controls.random_matched(matched.kept[it], pool, weights, cfg.seed, it)
    return keep, w, None if keep.any() else f"iteration {it}: the matched run kept no episode"


def in_backward_selector(ic, episode_norms: torch.Tensor):
    """The selection callback of one in_update micro-batch, renormalised over its kept episodes.

    before_update aggregates the policy loss over the kept episodes only (dropped ones are not in
    the mini-batch); inside the backward the forward already covered every episode, so the kept
    episodes' weights are scaled by norm(all) / norm(kept), ``episode_norms`` being each episode's
    token count (token_mean) or 1 (seq_mean). Exact when a mini-batch is one micro-batch; otherwise
    each micro-batch is renormalised on its own. Returns (select, unscaled) where ``unscaled[0]``
    is the selection before scaling (what the logs report and later epochs reuse).
    """
    unscaled: list[Selection] = []

    def select(scores: torch.Tensor) -> Selection:
        sel = select_and_weight(scores, ic)
        unscaled[:] = [sel]
        kept_norm = float((episode_norms.to(sel.keep.device) * sel.keep).sum())
        factor = float(episode_norms.sum()) / kept_norm if kept_norm > 0 else 1.0
        return dataclasses.replace(sel, weights=sel.weights * factor)

    return select, unscaled


def policy_terms_per_token(logp: torch.Tensor, logits: torch.Tensor, ref_logp: torch.Tensor | None,
                           cfg: TrainConfig) -> torch.Tensor | None:
    """The KL-penalty and entropy-bonus terms of the policy loss, per token (None when there are none).

    They join the influence-weighted episode loss with ``influence.episode_loss=policy`` (or ``all``).
    """
    terms = []
    if ref_logp is not None and not cfg.ppo.kl_in_reward:
        terms.append(cfg.ppo.kl_coef * kl_estimate(logp, ref_logp, cfg.ppo.kl_estimator))
    if cfg.ppo.entropy_coef:
        terms.append(-cfg.ppo.entropy_coef * entropy_from_logits(logits))
    return sum(terms) if terms else None


def gather_selection(scores: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine the in_update selections of all ranks; each rank filled its own episodes and left zeros."""
    if not dist.is_dist():
        return scores, keep, weights
    packed = torch.stack([scores, keep.double(), weights.double()]).to(device)
    dist.all_reduce_sum(packed)
    packed = packed.cpu()
    return packed[0], packed[1] > 0.5, packed[2].float()


def agree_on_step(finite: bool, kept: int, device: torch.device) -> tuple[bool, int]:
    """Whether every rank's losses and gradient norm of this mini-batch were finite, and how many episodes
    their in_update selections kept in all (one all-reduce), so that every rank steps or skips alike."""
    if not dist.is_dist():
        return finite, kept
    t = dist.all_reduce_sum(torch.tensor([float(not finite), float(kept)], dtype=torch.float64, device=device))
    return t[0].item() == 0, int(t[1].item())


def all_finite(*losses: torch.Tensor | None) -> bool:
    return all(x is None or bool(torch.isfinite(x.detach()).all()) for x in losses)


def score_episodes(engine, policy, ep: Episodes, adv: torch.Tensor, old_logp: torch.Tensor, ref_logp, target,
                   pad: int, device: torch.device, cfg: TrainConfig, token_norm: float, seq_norm: float,
                   critic: tuple[SharedValueHead, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """I-PPO scores of this rank's episodes, [E_local] float64; fills ``old_logp`` as a by-product.

    One forward with grad inside ``engine.recording()`` per chunk: its log-probs are the old
    log-probs (theta = theta_old) and also build the scoring loss sum_e L_e, where L_e is the
    episode's share of the PPO policy loss at ratio 1 (-A log pi, aggregated like the policy
    loss; plus its KL and entropy terms with ``influence.episode_loss=policy`` or ``all``). With
    ``episode_loss=all`` and ``critic = (shared value head, old values, returns)`` L_e also holds
    the episode's share of ``vf_coef *`` the value loss, read off the same forward. The engine's
    activation-only backward turns it into <grad L_e, G_val> per episode.
    """
    parts = []
    policy_terms = cfg.influence.episode_loss in ("policy", "all")
    value_term = critic is not None and cfg.influence.episode_loss == "all"
    for idx in chunks(list(range(len(ep))), cfg.rollout.forward_batch):
        ids, attn, rmask, P = episode_batch(ep, idx, pad, device)
        t = rmask.shape[1]
        per_episode = functools.partial(aggregate_per_episode, mask=rmask, agg=cfg.ppo.loss_agg,
                                        token_norm=token_norm, seq_norm=seq_norm)
        with engine.recording(), critic[0].reading(policy) if value_term else contextlib.nullcontext() as read:
            logits = response_logits(policy, ids, attn, P, cfg.rollout.temperature)
            logp = logprobs_from_logits(logits, ids[:, P:])
            old_logp[idx, :t] = logp.detach() * rmask
            loss_e = scoring_loss_per_episode(logp, adv[idx, :t], rmask, cfg.ppo.loss_agg, token_norm, seq_norm)
            extra = (policy_terms_per_token(logp, logits, None if ref_logp is None else ref_logp[idx, :t], cfg)
                     if policy_terms else None)
            if extra is not None:
                loss_e = loss_e + per_episode(extra)
            if value_term:
                _, old_values, returns = critic
                vf_tok = value_loss_per_token(read[0][:, P - 1:-1], old_values[idx, :t], returns[idx, :t],
                                              cfg.ppo.value_clip)
                loss_e = loss_e + cfg.ppo.vf_coef * per_episode(vf_tok)
            s = engine.scores(loss_e.sum(), torch.arange(len(idx), device=device), target,
                              mode=cfg.influence.mode, num_episodes=len(idx))
        parts.append(s.double())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Run I-PPO (or PPO) as configured; returns a summary (iterations done, why it stopped)."""
    # ---------------- setup: data, reward and config errors surface here, before any model loads
    device = dist.init_from_env(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world, main = dist.world_size(), dist.is_main()
    B, n = cfg.rollout.prompts_per_iter, cfg.rollout.samples_per_prompt
    if B % world:
        raise ConfigError(f"rollout.prompts_per_iter={B} must be divisible by the number of processes ({world})")
    if cfg.influence.enabled and cfg.influence.n_val < world:
        raise ConfigError(f"influence.n_val={cfg.influence.n_val} must be >= the number of processes ({world})")
    in_update = cfg.influence.enabled and cfg.influence.timing == "in_update"
    sharded = cfg.dist.strategy == "fsdp" and world > 1  # one process: nothing to shard
    run_dir = Path(cfg.run_dir)
    train_rows = load_split(cfg.data, "train", cfg.data.max_train_rows)
    val_rows = []
    if cfg.data.val_path:
        val_rows = load_split(cfg.data, "val")
    elif cfg.data.val_holdout:
        if cfg.data.val_holdout >= len(train_rows):
            raise ConfigError(f"data.val_holdout={cfg.data.val_holdout} leaves no training rows")
        val_rows, train_rows = train_rows[-cfg.data.val_holdout:], train_rows[:-cfg.data.val_holdout]
    test_rows = []
    if cfg.data.test_path and cfg.eval.every > 0:
        test_rows = load_split(cfg.data, "test", cfg.data.max_test_rows)
    reward_fn = make_reward_fn(cfg.reward.fn)
    matched = controls.load_matched_schedule(cfg.control.match_run) if cfg.control.filter == "random" else None
    if main:
        resolve_path(cfg.model, run_dir)  # materialises builtin:tiny-llama once
    dist.barrier()
    model_path = resolve_path(cfg.model, run_dir)
    tok = load_tokenizer(cfg.model, model_path)
    fmt = PromptFormatter(tok, cfg.data.prompt_template, cfg.data.chat_template)
    for rows, split in ((train_rows, "train"), (val_rows, "validation"), (test_rows, "test")):
        check_prompt_lengths(rows, fmt, cfg.data.max_prompt_tokens, split)

    use_critic = cfg.ppo.advantage == "gae"
    shared_critic = use_critic and cfg.ppo.critic == "shared"
    use_ref = cfg.ppo.kl_coef > 0
    # LoRA's adapters (and any weight a checkpoint lacks) are drawn while loading: the same draw on every
    # rank and in every run (torch's default generator starts from a random seed in each process)
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    policy = load_policy(cfg.model, model_path, device).train()
    value_model = None  # the critic: a separate model, or a head on the policy (its values ride the policy's forwards)
    if shared_critic:
        value_model = SharedValueHead(policy.config.hidden_size).to(device).train()
    elif use_critic:
        value_model = load_value_model(cfg.model, model_path, device).train()
    value_head = value_model if shared_critic else None
    ref = load_reference(cfg.model, model_path, device) if use_ref else None
    if sharded:  # before the engine hooks the layers and the optimizer takes the parameters
        shard = functools.partial(fsdp.shard_model, reshard_after_forward=cfg.dist.fsdp_reshard_after_forward,
                                  param_dtype=cfg.dist.fsdp_param_dtype)
        shard(policy)
        if use_critic and not shared_critic:
            shard(value_model, own_dtype_units=(value_model.head,))  # its float32 head: a unit of its own
        if ref is not None:
            shard(ref)
    sampler = make_sampler(cfg, policy, tok, model_path, device, value_head)  # rollout.engine: hf | vllm
    engine = None
    if cfg.influence.enabled:
        engine = InfluenceEngine(policy, rank=cfg.influence.rank, seed=cfg.seed, backend=cfg.influence.backend)
    factor_rank = cfg.influence.rank if cfg.influence.mode == "target" and cfg.influence.target_basis == "factor" else 0
    pol_params = trainable_parameters(policy)
    val_params = trainable_parameters(value_model) if use_critic else []
    params = pol_params + val_params
    groups = [{"params": pol_params, "lr": cfg.ppo.lr}]
    if val_params:
        groups.append({"params": val_params, "lr": cfg.ppo.value_lr or cfg.ppo.lr})
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.ppo.adam_betas), weight_decay=cfg.ppo.weight_decay)
    warm = cfg.ppo.warmup_iters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)

    start_it, stopped = 0, None
    nonfinite_streak, nonfinite_reason = 0, None  # skipped optimizer steps in a row; why they stopped the run
    # the newest checkpoint that verifies: damaged ones are reported and skipped (CheckpointError if none loads);
    # sharded: every rank verifies and reads its own shards, and all ranks fall back together
    state = restore_checkpoint(run_dir, policy=policy, value=value_model, optimizer=optimizer, scheduler=scheduler,
                               trainable_only=cfg.model.lora, device=device, sharded=sharded,
                               report=warn if main else lambda _: None) if cfg.resume else None
    if state is not None:
        start_it, stopped = state["iteration"], state.get("stopped")
        nonfinite_streak = state.get("nonfinite_streak", 0)
    logger = RunLogger(run_dir, to_dict(cfg), enabled=main, start_iteration=start_it,
                       tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                       influence_log=cfg.log.influence_log)

    def checkpoint(done: int) -> None:
        # a non-finite stop also keeps the checkpoint before it: the last one from before the failing iteration
        kw = {"policy": policy, "value": value_model, "optimizer": optimizer, "scheduler": scheduler,
              "trainable_only": cfg.model.lora, "keep_last": cfg.checkpoint.keep_last + (nonfinite_reason is not None),
              "state": {"stopped": stopped, "seed": cfg.seed, "data_order": "seeded permutation per epoch",
                        "prompts_consumed": done * B, "nonfinite_streak": nonfinite_streak}}
        if sharded:  # every rank writes its own shards
            save_sharded_checkpoint(run_dir, done, **kw)
        elif main:
            save_checkpoint(run_dir, done, **kw)
        dist.barrier()

    pad = tok.pad_token_id
    lo, hi = dist.shard(B)  # this rank's prompt positions within the iteration
    E_local, E = (hi - lo) * n, B * n
    e0 = lo * n  # global index of this rank's first episode
    done = start_it
    pbar = tqdm(range(start_it, cfg.iterations), disable=not (main and cfg.log.progress), desc="ippo")
    for it in pbar:
        if stopped:
            break
        timer = PhaseTimer(device)
        t_iter = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, "iteration", it))  # any stray RNG use is a function of it

        # ---- 1. rollout: this rank's B/world prompts, n samples each
        row_ids = iteration_prompts(len(train_rows), B, cfg.seed, it)
        with timer("generate"):  # hf + sharded policy: gathered once for the whole rollout (HFSampler)
            ep = rollout(sampler, tok, fmt, train_rows, list(range(lo, hi)), row_ids[lo:hi], cfg, it)

        # ---- 2. reward
        rewards = torch.tensor([reward_fn(ep.texts[i], train_rows[ep.prompt_rows[i]].gold) for i in range(E_local)],
                               dtype=torch.float32)
        if cfg.reward.truncated_reward is not None:
            rewards[torch.tensor(ep.truncated)] = cfg.reward.truncated_reward
        lengths = torch.tensor([len(r) for r in ep.response_tokens])
        T = int(lengths.max())
        mask = (torch.arange(T)[None] < lengths[:, None]).float().to(device)

        # ---- 3. reference log-probs and values (no grad; a shared critic's came with the rollout);
        #         old log-probs here only if KL is in the reward
        ref_logp = torch.zeros(E_local, T, device=device)
        values = torch.zeros(E_local, T, device=device)
        old_logp = torch.zeros(E_local, T, device=device)
        fuse_old_logp = engine is not None and not cfg.ppo.kl_in_reward and not in_update
        # Epoch 0's first mini-batch is updated at theta_old: its own forward gives its old log-probs
        # (ratio exactly 1), so the separate old-log-prob forward skips those episodes (all of them when
        # one epoch runs on one mini-batch). Not when the KL penalty is in the reward (it needs them now).
        from_update: set[int] = set()
        if not fuse_old_logp and not cfg.ppo.kl_in_reward:
            first_mb = minibatch_order(torch.arange(E), cfg.seed, it, 0)[:cfg.ppo.mini_batch_size]
            from_update = {i - e0 for i in first_mb if e0 <= i < e0 + E_local}
        weight_policy_terms = engine is not None and cfg.influence.episode_loss in ("policy", "all")
        weight_value_loss = engine is not None and shared_critic and cfg.influence.episode_loss == "all"
        temp = cfg.rollout.temperature  # log-probs of the policy the responses were sampled from
        with timer("ref_old_logprobs"), torch.no_grad():
            for i, v in enumerate(ep.values):  # shared critic
                values[i, :len(v)] = v.to(device)
            if ref is not None and cfg.model.ref_offload:
                ref.to(device)
            critic_forward = use_critic and not shared_critic
            for idx in chunks(list(range(E_local)) if ref is not None or critic_forward else [],
                              cfg.rollout.forward_batch):
                ids, attn, rmask, P = episode_batch(ep, idx, pad, device)
                t = rmask.shape[1]
                if ref is not None:
                    ref_logp[idx, :t] = logprobs_from_logits(response_logits(ref, ids, attn, P, temp), ids[:, P:]) * rmask
                if critic_forward:
                    values[idx, :t] = response_values(value_model, ids, attn, P) * rmask
            need_old = [] if fuse_old_logp else [i for i in range(E_local) if i not in from_update]
            for idx in fsdp.pad_to_max(chunks(need_old, cfg.rollout.forward_batch), sharded):
                ids, attn, rmask, P = episode_batch(ep, idx or [0], pad, device)  # None: a stand-in forward
                lp = logprobs_from_logits(response_logits(policy, ids, attn, P, temp), ids[:, P:]) * rmask
                if idx is not None:
                    old_logp[idx, :rmask.shape[1]] = lp
            if ref is not None and cfg.model.ref_offload:
                ref.to("cpu")

        # ---- 4. advantages
        if use_critic:
            kl_pen = None  # KL as a per-token reward penalty needs the old log-probs, computed in step 3 then
            if cfg.ppo.kl_in_reward and ref is not None:
                kl_pen = kl_estimate(old_logp, ref_logp, cfg.ppo.kl_estimator) * mask
            tok_rewards = token_rewards(rewards.to(device), mask, kl_pen, cfg.ppo.kl_coef)
            adv, returns = gae(tok_rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
            if cfg.ppo.whiten_advantages:
                adv = masked_whiten(adv, mask)
        else:
            adv, returns = grpo_advantages(rewards.to(device), n, mask, cfg.ppo.grpo_eps), None
        global_lengths = dist.all_gather_cat(lengths.to(device)).cpu()

        # ---- 5. I-PPO scores: validation gradient, then the old-log-prob forward doubles as the scoring pass
        scores_local = None
        if engine is not None:
            try:
                with timer("val_grad"):
                    val_idx = iteration_val_indices(len(val_rows), cfg.influence.n_val, cfg.seed, it)
                    target = validation_target(engine, policy, tok, fmt, val_rows, val_idx, cfg.influence.val_batch,
                                               device, factor_rank=factor_rank, lockstep=sharded)
                if not in_update:
                    with timer("scoring"):
                        scores_local = score_episodes(engine, policy, ep, adv, old_logp,
                                                      ref_logp if use_ref else None, target, pad, device, cfg,
                                                      token_norm=float(global_lengths.sum()), seq_norm=float(E),
                                                      critic=(value_head, values, returns) if weight_value_loss
                                                      else None)
            except NonFiniteError as e:  # the policy at theta_old gives NaN/Inf: nothing to score or update
                nonfinite_reason = f"iteration {it}: non-finite influence scoring ({e}): the run diverged"

        # ---- 6. filter and weights (identical on every rank: computed from the all-gathered scores)
        empty_reason = None  # why nothing was kept, when nothing is
        scores, keep, weights, reweight_fallback = None, torch.ones(E, dtype=torch.bool), torch.ones(E), False
        if engine is not None and not in_update and nonfinite_reason is None:
            scores = dist.all_gather_cat(scores_local.to(device)).cpu()
            try:
                sel = select_and_weight(scores, cfg.influence)
                keep, weights = sel.keep.cpu(), sel.weights.cpu().float()
                reweight_fallback = sel.reweight_fallback
                empty_reason = (f"iteration {it}: no episode kept by influence.filter={cfg.influence.filter} "
                                f"(all {E} scores rejected; max score {float(scores.max()):.3e})")
            except NonFiniteError as e:
                nonfinite_reason = f"iteration {it}: non-finite influence scores ({e}): the run diverged"
        elif cfg.control.filter != "none" and nonfinite_reason is None:  # a control for the influence filter
            informative = ((adv * mask).abs().sum(1) > 0).float()   # (ippo/controls.py)
            keep, weights, empty_reason = control_selection(
                cfg, dist.all_gather_cat(rewards.to(device)).cpu(),
                dist.all_gather_cat(informative.to(device)).cpu() > 0.5, matched, it)
        # (else plain PPO, or in_update: the filter runs inside each micro-batch's backward)
        if nonfinite_reason is not None:
            keep, weights = torch.zeros(E, dtype=torch.bool), torch.zeros(E)
        num_kept = int(keep.sum())

        # ---- 7. PPO epochs on the kept buffer
        stats = defaultdict(float)
        n_updates = n_minibatches = n_nonfinite = 0  # steps taken; mini-batches run; steps skipped as NaN/Inf
        if nonfinite_reason is not None:
            reason = None
        elif num_kept == 0:
            reason = empty_reason
            if cfg.influence.on_empty == "stop":
                stopped = reason
        else:
            reason = None
            kept_ids = keep.nonzero().flatten()
            w_local = weights[e0:e0 + E_local].to(device)
            if in_update:
                # each rank fills its own episodes in epoch 0; the sum over ranks then gives every rank all of them
                iu_scores, iu_keep, iu_weights = (torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.bool),
                                                  torch.zeros(E))
            with timer("update"):
                for epoch in range(cfg.ppo.epochs):
                    score_now = in_update and epoch == 0  # in_update selects once, in the first epoch
                    if in_update and epoch == 1:  # later epochs: the epoch-0 selection, plain backward
                        keep, weights = iu_keep, iu_weights
                        kept_ids = keep.nonzero().flatten()
                        num_kept = len(kept_ids)
                        w_local = weights[e0:e0 + E_local].to(device)
                        if num_kept == 0:
                            break
                    order = minibatch_order(kept_ids, cfg.seed, it, epoch)
                    for mb_index, mb in enumerate(chunks(order, cfg.ppo.mini_batch_size)):
                        token_norm = float(global_lengths[mb].sum())
                        seq_norm = float(len(mb))
                        local = [i - e0 for i in mb if e0 <= i < e0 + E_local]
                        optimizer.zero_grad(set_to_none=True)
                        finite, mb_kept = True, 0  # this mini-batch's losses were finite; in_update: episodes kept
                        for idx in fsdp.pad_to_max(chunks(local, cfg.ppo.micro_batch_size), sharded):
                            # None (sharded models): this rank has no episode left in the mini-batch but another
                            # has; a stand-in forward+backward with every loss times 0 keeps FSDP's collectives
                            # in step (live = 0 also keeps it out of the stats and the selection)
                            live = 1.0 if idx is not None else 0.0
                            idx = idx if idx is not None else [0]
                            ids, attn, rmask, P = episode_batch(ep, idx, pad, device)
                            t = rmask.shape[1]
                            with (engine.recording(weighted=True) if score_now else contextlib.nullcontext(),
                                  value_head.reading(policy) if value_head else contextlib.nullcontext() as read):
                                logits = response_logits(policy, ids, attn, P, temp)
                            logp = logprobs_from_logits(logits, ids[:, P:])
                            if epoch == 0 and mb_index == 0 and from_update and live:  # at theta_old: see step 3
                                old_logp[idx, :t] = logp.detach() * rmask
                            pg_tok, clipped = policy_loss_per_token(logp, old_logp[idx, :t], adv[idx, :t],
                                                                    cfg.ppo.clip)
                            agg = functools.partial(aggregate, mask=rmask, agg=cfg.ppo.loss_agg, token_norm=token_norm,
                                                    seq_norm=seq_norm)
                            w_tok = w_local[idx, None] * live
                            extra = policy_terms_per_token(logp, logits, ref_logp[idx, :t] if use_ref else None, cfg)
                            vf_tok = None
                            if use_critic:
                                v = read[0][:, P - 1:-1] if value_head else response_values(value_model, ids, attn, P)
                                vf_tok = value_loss_per_token(v, values[idx, :t], returns[idx, :t], cfg.ppo.value_clip)
                                stats["vf_loss"] += live * agg(vf_tok.detach()).item()
                            # The I-PPO weight multiplies the episode's loss as influence.episode_loss defines
                            # it (one backward stream); the other terms form a second, unweighted one.
                            weighted, unweighted = pg_tok, []
                            if extra is not None:
                                if weight_policy_terms:
                                    weighted = weighted + extra
                                else:
                                    unweighted.append(agg(extra))
                            if vf_tok is not None:
                                if weight_value_loss:
                                    weighted = weighted + cfg.ppo.vf_coef * vf_tok
                                else:
                                    unweighted.append(cfg.ppo.vf_coef * agg(vf_tok))
                            pg = agg(weighted * w_tok)
                            with torch.no_grad():
                                ent = agg(entropy_from_logits(logits))
                                if ref is not None and not cfg.ppo.kl_in_reward:
                                    stats["kl_loss"] += live * agg(kl_estimate(logp, ref_logp[idx, :t],
                                                                               cfg.ppo.kl_estimator)).item()
                            rest = sum(unweighted) * live if unweighted else None
                            gidx = [e0 + i for i in idx] if live else []  # a stand-in writes no episode's results
                            ok = all_finite(pg, rest)
                            if sharded:  # a sharded backward is a collective: every rank runs it, or none does
                                ok = agree_on_step(ok, 0, device)[0]
                            if not ok:  # no backward: the step is skipped below
                                finite = False
                                if score_now:
                                    iu_scores[gidx] = float("nan")  # not kept (iu_keep stays False)
                            elif score_now:  # score, select and reweight inside this backward (pg is unweighted here)
                                norms = (lengths[idx].float() if cfg.ppo.loss_agg == "token_mean"
                                         else torch.ones(len(idx)))
                                select, unscaled = in_backward_selector(cfg.influence, norms)
                                try:
                                    out = engine.weighted_backward(
                                        pg, torch.arange(len(idx), device=device), target, mode=cfg.influence.mode,
                                        rank=cfg.influence.rank, select=select,
                                        retain_graph=rest is not None or weight_value_loss)
                                except NonFiniteError:  # NaN/Inf scores (selection runs before any .grad)
                                    finite = False
                                    iu_scores[gidx] = float("nan")
                                    continue
                                if weight_value_loss:
                                    # the engine weights the policy's parameters; the head is not a submodule
                                    # of the policy, so its weighted gradient comes from a backward that stops
                                    # at the head (its input, the final hidden state, is saved)
                                    w_head = out.selection.weights.to(device, vf_tok.dtype)[:, None] * live
                                    (cfg.ppo.vf_coef * agg(vf_tok * w_head)).backward(
                                        inputs=list(value_head.parameters()), retain_graph=rest is not None)
                                iu_scores[gidx] = out.scores.double().cpu()
                                iu_keep[gidx] = unscaled[0].keep.cpu()
                                iu_weights[gidx] = unscaled[0].weights.float().cpu()
                                mb_kept += unscaled[0].num_kept if live else 0
                                if rest is not None:
                                    rest.backward()
                            else:
                                (pg if rest is None else pg + rest).backward()
                            with torch.no_grad():
                                stats["pg_loss"] += agg(pg_tok * w_tok).item()
                                stats["entropy"] += live * ent.item()
                                stats["clipfrac"] += live * agg(clipped).item()
                                stats["approx_kl"] += live * agg(0.5 * (logp - old_logp[idx, :t]) ** 2).item()
                        dist.all_reduce_grads(params)  # sum over ranks == the global mini-batch gradient
                        grad_norm = fsdp.clip_grad_norm_(params, cfg.ppo.max_grad_norm)  # DTensor shards too
                        finite, mb_kept = agree_on_step(finite and bool(torch.isfinite(grad_norm)), mb_kept, device)
                        n_minibatches += 1
                        if not finite:  # NaN/Inf loss or gradient: skip the step (weights, optimizer, LR untouched)
                            n_nonfinite += 1
                            nonfinite_streak += 1
                            if nonfinite_streak >= cfg.ppo.max_nonfinite_steps:
                                nonfinite_reason = (
                                    f"iteration {it}: {nonfinite_streak} optimizer steps in a row had a non-finite "
                                    f"loss or gradient norm (ppo.max_nonfinite_steps={cfg.ppo.max_nonfinite_steps})"
                                    ": skipped, the run diverged; the weights are those of the last finite step")
                                break
                            continue
                        if score_now and mb_kept == 0:  # nothing kept: no step, as before_update would take none
                            continue
                        nonfinite_streak = 0
                        stats["grad_norm"] += float(grad_norm) / max(1, world)  # summed over ranks below
                        optimizer.step()
                        scheduler.step()
                        n_updates += 1
                    if in_update and epoch == 0:  # every rank needs every episode's selection from here on
                        iu_scores, iu_keep, iu_weights = gather_selection(iu_scores, iu_keep, iu_weights, device)
                    if nonfinite_reason is not None:
                        break
            if in_update:  # what the first epoch's in-backward selections kept
                scores, keep, weights = iu_scores, iu_keep, iu_weights
                reweight_fallback = False
                num_kept = int(keep.sum())
                if num_kept == 0 and nonfinite_reason is None and not bool(torch.isfinite(scores).all()):
                    nonfinite_reason = (f"iteration {it}: no episode kept inside the update, and "
                                        f"{int((~torch.isfinite(scores)).sum())} of {E} could not be scored (non-finite "
                                        "loss or scores): the run diverged")
                elif num_kept == 0 and nonfinite_reason is None:
                    reason = (f"iteration {it}: no episode kept inside the update by influence.filter="
                              f"{cfg.influence.filter} (max score {float(scores.max()):.3e})")
                    if cfg.influence.on_empty == "stop":
                        stopped = reason

        # ---- 8. log, influence log, eval, checkpoint
        # (KL to the reference at theta_old: some old log-probs are only known after the update's first forward)
        kl_tok = kl_estimate(old_logp, ref_logp, cfg.ppo.kl_estimator) * mask if ref is not None else None
        sums = torch.tensor([rewards.sum().item(), float(E_local), float(lengths.sum()),
                             float(sum(ep.truncated)),
                             float(kl_tok.sum() if kl_tok is not None else 0.0), float(mask.sum())]
                            + [stats[k] for k in ("pg_loss", "vf_loss", "kl_loss", "entropy", "clipfrac", "approx_kl",
                                                  "grad_norm")] + [float(fsdp.take_stand_in_count())],
                            dtype=torch.float64, device=device)
        dist.all_reduce_sum(sums)
        s = sums.tolist()
        nu, nm = max(n_updates, 1), max(n_minibatches, 1)
        record = {
            "reward": s[0] / s[1], "response_len": s[2] / s[1], "truncated_frac": s[3] / s[1],
            "kl_ref": s[4] / max(s[5], 1.0),
            "pg_loss": s[6] / nm, "vf_loss": s[7] / nm, "kl_loss": s[8] / nm, "entropy": s[9] / nm,
            "clipfrac": s[10] / nm, "approx_kl": s[11] / nm, "grad_norm": s[12] / nu,
            "updates": n_updates, "nonfinite_steps": n_nonfinite, "episodes": E, "kept": num_kept,
            "kept_frac": num_kept / E, "lr": scheduler.get_last_lr()[0],
        }
        if sharded:  # zero-weighted passes that kept the ranks in lock-step (fsdp.pad_to_max), all ranks
            record["fsdp_stand_ins"] = int(s[13])
        if scores is not None:
            record.update(score_mean=float(scores.mean()), score_std=float(scores.std()) if E > 1 else 0.0,
                          score_min=float(scores.min()), score_max=float(scores.max()),
                          reweight_fallback=reweight_fallback)
        if reason:
            record["empty_action"] = cfg.influence.on_empty
            record["stop_reason"] = reason
        if ep.engine_logprobs:  # rollout.engine=vllm: its own log-probs of the sampled tokens vs the trainer's
            record.update(logprob_mismatch(ep.engine_logprobs, old_logp, mask), **ep.rollout_stats)
        if nonfinite_reason is not None:
            stopped = record["stop_reason"] = nonfinite_reason
        record.update({f"time_{k}": v for k, v in timer.times.items()})
        record["time_iteration"] = time.perf_counter() - t_iter
        logger.metrics(it, record)

        if cfg.log.influence_log:
            adv_sum = (adv * mask).sum(1).cpu().tolist()
            mine = [{"episode": e0 + i, "prompt_id": ep.prompt_rows[i], "sample": (e0 + i) % n,
                     "response": ep.texts[i], "reward": rewards[i].item(), "adv_sum": adv_sum[i],
                     "truncated": ep.truncated[i],
                     "score": float(scores[e0 + i]) if scores is not None else None,
                     "kept": bool(keep[e0 + i]), "weight": float(weights[e0 + i])} for i in range(E_local)]
            everything = dist.all_gather_object(mine)
            logger.influence(it, [r for part in everything for r in part], cfg.influence.top_k_log)

        done = it + 1
        last = done == cfg.iterations or stopped is not None
        if test_rows and (done % cfg.eval.every == 0 or last):
            with timer("eval"), fsdp.unsharded(policy):
                res = evaluate(policy, tok, fmt, test_rows, cfg.eval, cfg.reward.fn, reward_fn, cfg.seed, done)
            logger.metrics(it, res, name="eval.jsonl")
        if last or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            checkpoint(done)
        if main:
            pbar.set_postfix(reward=f"{record['reward']:.3f}", kept=f"{record['kept_frac']:.2f}")
        if stopped:
            break

    logger.close()
    summary = {"iterations_done": done, "stopped": stopped, "run_dir": str(run_dir)}
    if stopped is not None and main:
        print(f"ippo: training stopped: {stopped}")
    return summary
