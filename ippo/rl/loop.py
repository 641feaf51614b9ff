"""THE loop: Influence-Guided PPO (I-PPO), read top to bottom. Plain PPO = ``influence.enabled=false``.

Each iteration, one phase per function below:
  1. rollout      B prompts x n sampled responses (this rank's share of the prompts) and their rule rewards;
                  with ``rollout.dynamic_sampling`` further rounds until B groups have reward variance
                  (``ippo.rl.dynamic_sampling``)
  2. no-grad pass reference log-probs and critic values (a shared critic's came with the rollout); the old
                  log-probs unless a later forward at theta_old provides them anyway
  3. advantages   by the estimator ``ppo.advantage`` names (``ippo.rl.advantages``: gae, grpo, rloo, ...)
  4. scoring      I-PPO: the validation gradient (SFT loss on n_val gold solutions, one backward), then, with
                  ``influence.timing=before_update``, the old-log-prob forward *with grad inside the engine's
                  recording* scores every episode (``ippo.rl.scoring``, the only door to the engine)
  5. filter       by the filter the run names (``ippo.rl.filters``): influence (score > 0, weights score /
                  mean(kept)), none, or a control; identical on every rank (all-gathered inputs)
  6. update       PPO epochs on the kept buffer (``ippo.rl.update``); with ``influence.timing=in_update`` the
                  first epoch's micro-batch backwards score, select and reweight their own episodes
  7. log          metrics.jsonl, influence.jsonl; then evaluation and checkpoint when due

Reproducibility: everything random is derived from (seed, iteration, ...) -- the prompts, the validation
draw, the sampling seed of each generate() call, the mini-batch order -- so a run resumed from a checkpoint
retraces an uninterrupted run exactly (same weights, CPU, same seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ippo.errors import NonFiniteError
from ippo.influence import Target
from ippo.rl.advantages import AdvantageInputs, estimate
from ippo.rl.batches import chunks, episode_batch, minibatch_order, response_logits, response_values
from ippo.rl.components import Components, RunState, build, restore, save
from ippo.rl.config import TrainConfig, to_dict
from ippo.rl.data import derive_seed, iteration_val_indices
from ippo.rl.dynamic_sampling import dynamic_rollout, round_prompts
from ippo.rl.evaluate import evaluate
from ippo.rl.filters import EPISODE_FILTERS, Filtered, FilterInputs, filter_name
from ippo.rl.losses import correction_stats, kl_estimate, logprobs_from_logits
from ippo.rl.metrics import PhaseTimer, Sums
from ippo.rl.parallel import distributed as dist
from ippo.rl.parallel import fsdp
from ippo.rl.rollout import Episodes, logprob_mismatch, pad_right, sample_episodes
from ippo.rl.run_dir import holds_run_dir
from ippo.rl.run_log import RunLogger
from ippo.rl.update import Buffer, UpdateResult, ppo_epochs


@holds_run_dir  # locked for the whole run; fresh / overwrite / resume checked before anything loads
def train(cfg: TrainConfig) -> dict:
    """Run I-PPO (or PPO) as configured; returns a summary (iterations done, why it stopped)."""
    c = build(cfg)  # data, reward and config errors surface here, before any model loads
    state = restore(c)  # the newest checkpoint that verifies, or iteration 0
    logger = RunLogger(c.run_dir, to_dict(cfg), enabled=dist.is_main(), start_iteration=state.iteration,
                       tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                       influence_log=cfg.log.influence_log)
    pbar = tqdm(range(state.iteration, cfg.iterations), disable=not (dist.is_main() and cfg.log.progress),
                desc="ippo")
    for it in pbar:
        if state.stopped:
            break
        timer = PhaseTimer(c.device)
        t_iter = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, "iteration", it))  # any stray RNG use is a function of it

        with timer("generate"):  # 1. rollout + rewards (hf + sharded policy: gathered once for the whole rollout)
            batch = rollout(c, it)
        with timer("ref_old_logprobs"), torch.no_grad():  # 2. no-grad pass
            buf = no_grad_pass(c, batch, it)
        advantages(c, batch, buf)  # 3.
        target, scores_local = scoring(c, batch, buf, state, it, timer)  # 4.
        sel = episode_filter(c, batch, buf, scores_local, state, it)  # 5.
        with timer("ref_old_logprobs"), torch.no_grad():
            old_logprobs(c, buf, sel, it)
        res, empty_reason = UpdateResult(), None
        if state.nonfinite_reason is None and sel.num_kept == 0:  # nothing to train on
            empty_reason = sel.empty_reason
            if cfg.influence.on_empty == "stop":
                state.stopped = empty_reason
        elif state.nonfinite_reason is None:
            with timer("update"):  # 6.
                res = ppo_epochs(c, buf, sel, target, state, it)
            sel, empty_reason = in_update_outcome(c, sel, res, state, it)

        record = iteration_record(c, batch, buf, sel, res, empty_reason)  # 7. log
        early_stop(c, state, record, it)
        if state.nonfinite_reason is not None:
            state.stopped = record["stop_reason"] = state.nonfinite_reason
        record.update({f"time_{k}": v for k, v in timer.times.items()})
        record["time_iteration"] = time.perf_counter() - t_iter
        state.train_seconds += record["time_iteration"]
        record["time_cumulative"] = state.train_seconds  # training wall time so far (evaluation excluded)
        logger.metrics(it, record)
        if cfg.log.influence_log:
            logger.influence(it, episode_rows(c, batch, buf, sel, res), cfg.influence.top_k_log)

        state.iteration = done = it + 1
        last = done == cfg.iterations or state.stopped is not None
        if c.data.test and (done % cfg.eval.every == 0 or last):
            with timer("eval"), fsdp.unsharded(c.policy):
                res_eval = evaluate(c.policy, c.data.tok, c.data.fmt, c.data.test, cfg.eval, cfg.reward.fn,
                                    c.data.reward_fn, cfg.seed, done)
            logger.metrics(it, res_eval, name="eval.jsonl")
        if last or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            save(c, state)
        if dist.is_main():
            pbar.set_postfix(reward=f"{record['reward']:.3f}", kept=f"{record['kept_frac']:.2f}")
        if state.stopped:
            break

    logger.close()
    if state.stopped is not None and dist.is_main():
        print(f"ippo: training stopped: {state.stopped}")
    return {"iterations_done": state.iteration, "stopped": state.stopped, "run_dir": str(c.run_dir)}


# ---------------------------------------------------------------------------------------------
# the phases, in the order the loop runs them


@dataclass
class Batch:
    """This rank's episodes of one iteration with their rewards."""

    episodes: Episodes
    rewards: torch.Tensor  # [E_local] float32
    lengths: torch.Tensor  # [E_local] response lengths
    mask: torch.Tensor  # [E_local, T] on the run's device
    stats: dict[str, float] = field(default_factory=dict)  # rollout.dynamic_sampling: rounds, discarded groups


def rollout(c: Components, it: int) -> Batch:
    """This rank's prompts of iteration ``it``, n samples each, from the rollout engine (``rollout.engine``), with
    their rewards; with ``rollout.dynamic_sampling`` further rounds until the batch's groups have reward variance."""
    ro, lay = c.cfg.rollout, c.layout
    if not ro.dynamic_sampling:
        ep = sample_round(c, it, 0)
        return make_batch(c, ep, episode_rewards(c, ep))

    def one_round(rnd: int) -> tuple[Episodes, torch.Tensor]:
        ep = sample_round(c, it, rnd)
        return ep, episode_rewards(c, ep)

    ep, rewards, stats = dynamic_rollout(one_round, lay.B, lay.n, lay.lo, lay.hi, ro.max_sample_rounds, c.device)
    return make_batch(c, ep, rewards, stats)


def sample_round(c: Components, it: int, rnd: int) -> Episodes:
    """This rank's episodes of round ``rnd`` of iteration ``it`` (round 0: the iteration's prompts; later rounds:
    dynamic sampling's, at positions ``rnd * B + p`` so that every round samples with its own seeds)."""
    cfg, lay, data = c.cfg, c.layout, c.data
    row_ids = round_prompts(len(data.train), lay.B, cfg.seed, it, rnd)[lay.lo:lay.hi]
    return sample_episodes(c.sampler, data.tok, data.fmt, data.train, [rnd * lay.B + p for p in range(lay.lo, lay.hi)],
                           row_ids, lay.n, cfg.seed, it)


def episode_rewards(c: Components, ep: Episodes) -> torch.Tensor:
    """The rule reward of every episode (``reward.fn``; ``reward.truncated_reward`` for responses with no EOS)."""
    rows = c.data.train
    rewards = torch.tensor([c.data.reward_fn(ep.texts[i], rows[ep.prompt_rows[i]].gold) for i in range(len(ep))],
                           dtype=torch.float32)
    if c.cfg.reward.truncated_reward is not None:
        rewards[torch.tensor(ep.truncated)] = c.cfg.reward.truncated_reward
    return rewards


def make_batch(c: Components, ep: Episodes, rewards: torch.Tensor, stats: dict[str, float] | None = None) -> Batch:
    lengths = torch.tensor([len(r) for r in ep.response_tokens])
    T = int(lengths.max())
    mask = (torch.arange(T)[None] < lengths[:, None]).float().to(c.device)
    return Batch(ep, rewards, lengths, mask, stats or {})


def no_grad_pass(c: Components, batch: Batch, it: int) -> Buffer:
    """Reference log-probs and critic values; the old log-probs only when the KL is in the reward (the advantages
    need them first; otherwise ``old_logprobs`` after the filter)."""
    cfg, lay, ep, device = c.cfg, c.layout, batch.episodes, c.device
    E_local, T = lay.E_local, batch.mask.shape[1]
    buf = Buffer(ep, batch.lengths, batch.lengths, adv=None, returns=None, values=torch.zeros(E_local, T, device=device),
                 old_logp=torch.zeros(E_local, T, device=device),
                 ref_logp=torch.zeros(E_local, T, device=device) if c.ref is not None else None, from_update=set(),
                 sampler_logp=sampler_logprobs(c, batch))
    temp, pad = cfg.rollout.temperature, c.data.pad  # log-probs of the policy the responses were sampled from
    for i, v in enumerate(ep.values):  # shared critic
        buf.values[i, :len(v)] = v.to(device)
    if c.ref is not None and cfg.model.ref_offload:
        c.ref.to(device)
    critic_forward = c.critic is not None and c.value_head is None
    for idx in chunks(list(range(E_local)) if c.ref is not None or critic_forward else [], cfg.rollout.forward_batch):
        ids, attn, rmask, P = episode_batch(ep, idx, pad, device)
        t = rmask.shape[1]
        if c.ref is not None:
            buf.ref_logp[idx, :t] = logprobs_from_logits(response_logits(c.ref, ids, attn, P, temp), ids[:, P:]) * rmask
        if critic_forward:
            buf.values[idx, :t] = response_values(c.critic, ids, attn, P) * rmask
    if cfg.ppo.kl_in_reward:
        policy_logprobs(c, buf, list(range(E_local)))
    if c.ref is not None and cfg.model.ref_offload:
        c.ref.to("cpu")
    return buf


def policy_logprobs(c: Components, buf: Buffer, episodes: list[int]) -> None:
    """``buf.old_logp`` of the local ``episodes``: the policy's log-probs at theta_old, no grad."""
    cfg = c.cfg
    for idx in fsdp.pad_to_max(chunks(episodes, cfg.rollout.forward_batch), c.sharded):
        ids, attn, rmask, P = episode_batch(buf.episodes, idx or [0], c.data.pad, c.device)  # None: a stand-in
        lp = logprobs_from_logits(response_logits(c.policy, ids, attn, P, cfg.rollout.temperature), ids[:, P:]) * rmask
        if idx is not None:
            buf.old_logp[idx, :rmask.shape[1]] = lp


def old_logprobs(c: Components, buf: Buffer, sel: Filtered, it: int) -> None:
    """The old log-probs that no forward at theta_old provides anyway.

    The before_update scoring forward runs at theta_old and gave every episode's (the no-grad pass did, when
    the KL is in the reward). Otherwise epoch 0's first mini-batch -- of the episodes the filter *kept*, in the
    update's own seeded order -- is updated at theta_old, so its own forward gives its old log-probs (ratio
    exactly 1) and this pass skips them (all of them when one epoch runs on one mini-batch). Every other
    episode, dropped ones included (the KL-to-reference metric reads them), is forwarded here.
    """
    cfg, lay = c.cfg, c.layout
    if cfg.ppo.kl_in_reward or (c.scorer is not None and not c.in_update):
        return
    first_mb = minibatch_order(sel.keep.nonzero().flatten(), cfg.seed, it, 0)[:cfg.ppo.mini_batch_size]
    buf.from_update = {i - lay.e0 for i in first_mb if lay.owns(i)}
    policy_logprobs(c, buf, [i for i in range(lay.E_local) if i not in buf.from_update])


def sampler_logprobs(c: Components, batch: Batch) -> torch.Tensor | None:
    """[E_local, T]: the rollout engine's log-probs of the sampled tokens, for ``ppo.is_correction`` (else None)."""
    if c.cfg.ppo.is_correction == "none":
        return None
    return pad_right(batch.episodes.engine_logprobs, batch.mask.shape[1]).to(c.device, torch.float32) * batch.mask


def advantages(c: Components, batch: Batch, buf: Buffer) -> None:
    """Fills ``buf.adv`` / ``buf.returns`` by the registered estimator, and the global response lengths."""
    inp = AdvantageInputs(batch.rewards, batch.mask, buf.values, buf.old_logp, buf.ref_logp,
                          c.layout.n, c.cfg.ppo)
    buf.adv, buf.returns = estimate(c.cfg.ppo.advantage, inp)
    buf.global_lengths = dist.all_gather_cat(batch.lengths.to(c.device)).cpu()


def scoring(c: Components, batch: Batch, buf: Buffer, state: RunState, it: int, timer: PhaseTimer
            ) -> tuple[Target | None, torch.Tensor | None]:
    """I-PPO: the validation target, and (before_update) this rank's episode scores [E_local]."""
    if c.scorer is None:
        return None, None
    cfg, data = c.cfg, c.data
    try:
        with timer("val_grad"):
            val_idx = iteration_val_indices(len(data.val), cfg.influence.n_val, cfg.seed, it)
            target = c.scorer.validation_target(c.policy, data.tok, data.fmt, data.val, val_idx, c.device,
                                                lockstep=c.sharded)
        if c.in_update:
            return target, None
        with timer("scoring"):
            critic = (c.value_head, buf.values, buf.returns) if (
                c.value_head is not None and cfg.influence.episode_loss == "all") else None
            scores = c.scorer.score_episodes(c.policy, batch.episodes, buf.adv, buf.old_logp, buf.ref_logp, target,
                                             data.pad, c.device, token_norm=float(buf.global_lengths.sum()),
                                             seq_norm=float(c.layout.E), critic=critic, sampler_logp=buf.sampler_logp)
        return target, scores
    except NonFiniteError as e:  # the policy at theta_old gives NaN/Inf: nothing to score or update
        state.nonfinite_reason = f"iteration {it}: non-finite influence scoring ({e}): the run diverged"
        return None, None


def episode_filter(c: Components, batch: Batch, buf: Buffer, scores_local: torch.Tensor | None,
                   state: RunState, it: int) -> Filtered:
    """The run's episode filter over all E episodes (nothing kept once the run has diverged)."""
    if state.nonfinite_reason is not None:
        return Filtered.nothing(c.layout.E)
    informative = ((buf.adv * batch.mask).abs().sum(1) > 0).float()
    inp = FilterInputs(c.cfg, it, c.layout.E, batch.rewards, informative, scores_local, c.data.matched, c.device)
    sel = EPISODE_FILTERS[filter_name(c.cfg)](inp)
    if sel.nonfinite_reason is not None:
        state.nonfinite_reason = sel.nonfinite_reason
    return sel


def in_update_outcome(c: Components, sel: Filtered, res: UpdateResult, state: RunState, it: int
                      ) -> tuple[Filtered, str | None]:
    """in_update: what the first epoch's in-backward selections kept (the logs report it), and why nothing was."""
    if res.selection is None:
        return sel, None
    sel = res.selection
    if sel.num_kept > 0 or state.nonfinite_reason is not None:
        return sel, None
    if not bool(torch.isfinite(sel.scores).all()):
        state.nonfinite_reason = (f"iteration {it}: no episode kept inside the update, and "
                                  f"{int((~torch.isfinite(sel.scores)).sum())} of {c.layout.E} could not be scored "
                                  "(non-finite loss or scores): the run diverged")
        return sel, None
    reason = (f"iteration {it}: no episode kept inside the update by influence.filter={c.cfg.influence.filter} "
              f"(max score {float(sel.scores.max()):.3e})")
    if c.cfg.influence.on_empty == "stop":
        state.stopped = reason
    return sel, reason


def iteration_record(c: Components, batch: Batch, buf: Buffer, sel: Filtered, res: UpdateResult,
                     empty_reason: str | None) -> dict:
    """metrics.jsonl's row: reward, lengths, KL to the reference, losses, kept fraction, scores."""
    cfg, E = c.cfg, c.layout.E
    # KL to the reference at theta_old (some old log-probs are only known after the update's first forward)
    kl_tok = kl_estimate(buf.old_logp, buf.ref_logp, cfg.ppo.kl_estimator) * batch.mask if c.ref is not None else None
    sums = Sums(reward=batch.rewards.sum().item(), episodes=float(c.layout.E_local),
                response_len=float(batch.lengths.sum()), truncated=float(sum(batch.episodes.truncated)),
                kl_ref=float(kl_tok.sum() if kl_tok is not None else 0.0), tokens=float(batch.mask.sum()))
    sums.update(res.sums)
    sums.add("fsdp_stand_ins", float(fsdp.take_stand_in_count()))
    s = sums.all_reduce(["reward", "episodes", "response_len", "truncated", "kl_ref", "tokens", "pg_loss",
                         "vf_loss", "kl_loss", "entropy", "clipfrac", "approx_kl", "grad_norm", "fsdp_stand_ins"]
                        + (["sft_loss"] if c.gold_sft is not None else []), c.device)
    nu, nm, n_ep = max(res.updates, 1), max(res.minibatches, 1), s["episodes"]
    record = {
        "reward": s["reward"] / n_ep, "response_len": s["response_len"] / n_ep, "truncated_frac": s["truncated"] / n_ep,
        "kl_ref": s["kl_ref"] / max(s["tokens"], 1.0),
        **{k: s[k] / nm for k in ("pg_loss", "vf_loss", "kl_loss", "entropy", "clipfrac", "approx_kl")},
        "grad_norm": s["grad_norm"] / nu,
        "updates": res.updates, "nonfinite_steps": res.nonfinite, "episodes": E, "kept": sel.num_kept,
        "kept_frac": sel.num_kept / E, "lr": c.scheduler.get_last_lr()[0],
    }
    if c.sharded:  # zero-weighted passes that kept the ranks in lock-step (fsdp.pad_to_max), all ranks
        record["fsdp_stand_ins"] = int(s["fsdp_stand_ins"])
    if sel.scores is not None:
        scores = sel.scores
        record.update(score_mean=float(scores.mean()), score_std=float(scores.std()) if E > 1 else 0.0,
                      score_min=float(scores.min()), score_max=float(scores.max()),
                      reweight_fallback=sel.reweight_fallback)
    if empty_reason:
        record["empty_action"] = cfg.influence.on_empty
        record["stop_reason"] = empty_reason
    if c.gold_sft is not None:
        record["sft_loss"] = s["sft_loss"] / nm
    if batch.episodes.engine_logprobs:  # rollout.engine=vllm: its own log-probs of the sampled tokens vs ours
        record.update(logprob_mismatch(batch.episodes.engine_logprobs, buf.old_logp, batch.mask),
                      **batch.episodes.rollout_stats)
    if buf.sampler_logp is not None:  # ppo.is_correction: the weights the policy loss carried
        record.update(correction_stats(buf.old_logp, buf.sampler_logp, batch.mask, cfg.ppo))
    record.update(batch.stats)
    return record


def early_stop(c: Components, state: RunState, record: dict, it: int) -> None:
    """``influence.stop_kept_frac``: stop once the kept fraction has been below it for ``stop_patience``
    iterations in a row (the streak is carried through checkpoints, so a resumed run stops where an
    uninterrupted one does)."""
    ic = c.cfg.influence
    if not ic.stop_kept_frac:
        return
    state.low_kept_streak = state.low_kept_streak + 1 if record["kept_frac"] < ic.stop_kept_frac else 0
    record["low_kept_streak"] = state.low_kept_streak
    if state.low_kept_streak >= ic.stop_patience and state.stopped is None:
        state.stopped = record["stop_reason"] = (
            f"iteration {it}: kept fraction below influence.stop_kept_frac={ic.stop_kept_frac:g} for "
            f"{state.low_kept_streak} iterations in a row (influence.stop_patience={ic.stop_patience}): "
            "early stop")
        record["early_stop"] = True


def episode_rows(c: Components, batch: Batch, buf: Buffer, sel: Filtered, res: UpdateResult) -> list[dict]:
    """influence.jsonl's rows for the iteration: every episode of every rank, in global order.

    Besides what the episode was (response, reward, score, kept, weight) each row holds what ``ippo inspect``
    needs to rebuild its scoring loss exactly: the sampled ``response_tokens``, the per-token ``advantage``
    (one number when it is the same on every token) and, for scored episodes, the loss normalisers its score
    was taken with (``token_norm``, ``seq_norm``) and ``scored_after_steps``, the optimizer steps the iteration
    had taken before (0: at theta_old; in_update scores later mini-batches after the first steps)."""
    ep, lay = batch.episodes, c.layout
    adv_sum = (buf.adv * batch.mask).sum(1).cpu().tolist()
    adv = buf.adv.cpu()
    mine = [{"episode": lay.e0 + i, "prompt_id": ep.prompt_rows[i], "sample": (lay.e0 + i) % lay.n,
             "response": ep.texts[i], "reward": batch.rewards[i].item(), "adv_sum": adv_sum[i],
             "truncated": ep.truncated[i],
             "score": float(sel.scores[lay.e0 + i]) if sel.scores is not None else None,
             "kept": bool(sel.keep[lay.e0 + i]), "weight": float(sel.weights[lay.e0 + i]),
             "response_tokens": list(ep.response_tokens[i]), "advantage": token_values(adv[i, :int(batch.lengths[i])]),
             **scored_with(c, buf, sel, res, lay.e0 + i)} for i in range(lay.E_local)]
    return [r for part in dist.all_gather_object(mine) for r in part]


def token_values(x: torch.Tensor) -> float | list[float]:
    """A per-token row as the influence log stores it: one number when every token has the same value."""
    values = x.tolist()
    return values[0] if values and all(v == values[0] for v in values) else values


def scored_with(c: Components, buf: Buffer, sel: Filtered, res: UpdateResult, e: int) -> dict:
    """How episode ``e``'s logged score was taken: the loss normalisers and the optimizer steps before it."""
    if sel.scores is None:
        return {}
    if res.scored_at is not None:  # in_update: its mini-batch's normalisers, inside the update
        return res.scored_at[e] or {"token_norm": None, "seq_norm": None, "scored_after_steps": None}
    return {"token_norm": float(buf.global_lengths.sum()), "seq_norm": float(c.layout.E), "scored_after_steps": 0}
