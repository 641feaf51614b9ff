"""The PPO epochs on the kept, reweighted buffer.

Each epoch visits the kept episodes in a seeded order, ``ppo.mini_batch_size`` per optimizer step, each
mini-batch in micro-batches of ``ppo.micro_batch_size`` whose gradients add up. A micro-batch's loss is the
clipped surrogate times the episode's I-PPO weight (plus the KL / entropy / value terms, weighted with the
episode or not as ``influence.episode_loss`` says), aggregated over the mini-batch (``ppo.loss_agg``).

The two I-PPO timings are two backward strategies:

* ``PlainBackward`` -- PPO, and I-PPO with ``influence.timing=before_update`` (whose weights were fixed
  before the update): one ``.backward()`` of the micro-batch's loss;
* ``InUpdateSelection`` -- ``influence.timing=in_update``, first epoch: the micro-batch's backward scores its
  episodes at the current parameters, selects and reweights them, and forms the weighted gradient in the
  same pass; later epochs reuse that selection with a ``PlainBackward``.

A step whose loss or gradient norm is NaN/Inf is skipped (weights, optimizer and LR schedule untouched);
``ppo.max_nonfinite_steps`` of them in a row stop the run. Under FSDP2 every rank runs the same number of
micro-batches (zero-weighted stand-ins where it has none left) and the ranks agree on finiteness before a
backward, because a sharded forward/backward is a collective.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from ippo.errors import NonFiniteError
from ippo.influence import Target
from ippo.rl.batches import chunks, episode_batch, minibatch_order, response_logits, response_values
from ippo.rl.components import Components, RunState
from ippo.rl.filters import Filtered
from ippo.rl.losses import (
    aggregate,
    correction_weights,
    entropy_from_logits,
    episode_norms,
    kl_estimate,
    logprobs_from_logits,
    loss_norm_len,
    policy_terms_per_token,
    ppo_policy_loss,
    value_loss_per_token,
)
from ippo.rl.metrics import Sums
from ippo.rl.parallel import distributed as dist
from ippo.rl.parallel import fsdp
from ippo.rl.rollout import Episodes
from ippo.rl.scoring import in_backward_selector
from ippo.rl.step_guard import guarded_step


@dataclass
class Buffer:
    """What the update reads: this rank's episodes and their per-token tensors [E_local, T]."""

    episodes: Episodes
    lengths: torch.Tensor  # [E_local] response lengths (cpu)
    global_lengths: torch.Tensor  # [E] response lengths over all ranks (cpu)
    adv: torch.Tensor
    returns: torch.Tensor | None
    values: torch.Tensor
    old_logp: torch.Tensor  # filled here for the episodes of `from_update`
    ref_logp: torch.Tensor | None
    from_update: set[int]  # local episodes whose old log-probs the first (theta_old) forward provides
    sampler_logp: torch.Tensor | None = None  # ppo.is_correction: the rollout engine's log-probs [E_local, T]


@dataclass
class UpdateResult:
    sums: Sums = field(default_factory=Sums)  # pg_loss, vf_loss, kl_loss, entropy, clipfrac, approx_kl, grad_norm
    updates: int = 0  # optimizer steps taken
    minibatches: int = 0  # mini-batches run
    nonfinite: int = 0  # steps skipped as NaN/Inf
    selection: Filtered | None = None  # in_update: what the first epoch's in-backward selections kept
    scored_at: list[dict | None] | None = None  # in_update: InUpdateSelection.scored_at (the influence log's)


@dataclass
class MicroLosses:
    """One micro-batch's losses; ``pg`` carries the I-PPO weights, ``rest`` the terms that stay unweighted."""

    pg: torch.Tensor
    rest: torch.Tensor | None
    vf_tok: torch.Tensor | None
    agg: functools.partial
    attn: torch.Tensor | None = None  # the micro-batch's attention mask [b, L] (which tokens are padding)
    norms: tuple[float, float] = (1.0, 1.0)  # the mini-batch's loss normalisers (token_norm, seq_norm)


class PlainBackward:
    """PPO's backward (and before_update I-PPO's: its weights are already in the loss)."""

    selects = False

    def recording(self):
        return contextlib.nullcontext()

    def backward(self, losses: MicroLosses, idx: list[int], gidx: list[int], live: float) -> int:
        (losses.pg if losses.rest is None else losses.pg + losses.rest).backward()
        return 0

    def mark_unscored(self, gidx: list[int]) -> None:
        pass


class InUpdateSelection:
    """in_update, first epoch: each micro-batch is scored, selected and reweighted inside its own backward.

    Each rank fills the selection of its own episodes; ``gather`` sums them over the ranks after the epoch.
    For ``ippo inspect`` it also records what each score was taken with: the loss normalisers of the episode's
    mini-batch and the optimizer steps the iteration had taken before (0: at theta_old), in ``scored_with``.
    """

    selects = True

    def __init__(self, c: Components, buf: Buffer, target: Target, res: UpdateResult) -> None:
        self.c, self.buf, self.target, self.res = c, buf, target, res
        E = c.layout.E
        self.scores = torch.zeros(E, dtype=torch.float64)
        self.keep = torch.zeros(E, dtype=torch.bool)
        self.weights = torch.zeros(E)
        self.scored_with = torch.zeros(3, E, dtype=torch.float64)  # token_norm, seq_norm, steps before + 1

    def recording(self):
        return self.c.scorer.recording(weighted=True)

    def backward(self, losses: MicroLosses, idx: list[int], gidx: list[int], live: float) -> int:
        """Raises NonFiniteError (before any .grad is written) when the scores are NaN/Inf."""
        c, cfg = self.c, self.c.cfg
        weight_value_loss = c.value_head is not None and cfg.influence.episode_loss == "all"
        norms = episode_norms(self.buf.lengths[idx], cfg.ppo.loss_agg)
        select, unscaled = in_backward_selector(cfg.influence, norms)
        out = c.scorer.weighted_backward(losses.pg, losses.attn, self.target, select,
                                         retain_graph=losses.rest is not None or weight_value_loss)
        if weight_value_loss:
            # the engine weights the policy's parameters; the head is not a submodule of the policy, so its
            # weighted gradient comes from a backward that stops at the head (its input, the final hidden
            # state, is saved)
            w_head = out.selection.weights.to(c.device, losses.vf_tok.dtype)[:, None] * live
            (cfg.ppo.vf_coef * losses.agg(losses.vf_tok * w_head)).backward(
                inputs=list(c.value_head.parameters()), retain_graph=losses.rest is not None)
        self.scores[gidx] = out.scores.double().cpu()
        self.keep[gidx] = unscaled[0].keep.cpu()
        self.weights[gidx] = unscaled[0].weights.float().cpu()
        self.scored_with[:, gidx] = torch.tensor([*losses.norms, self.res.updates + 1.0], dtype=torch.float64)[:, None]
        if losses.rest is not None:
            losses.rest.backward()
        return unscaled[0].num_kept if live else 0

    def mark_unscored(self, gidx: list[int]) -> None:
        self.scores[gidx] = float("nan")  # not kept (keep stays False)

    def gather(self) -> None:
        """Every rank needs every episode's selection from here on: sum what the ranks filled."""
        if not dist.is_dist():
            return
        packed = torch.cat([torch.stack([self.scores, self.keep.double(), self.weights.double()]),
                            self.scored_with]).to(self.c.device)
        dist.all_reduce_sum(packed)
        packed = packed.cpu()
        self.scores, self.keep, self.weights = packed[0], packed[1] > 0.5, packed[2].float()
        self.scored_with = packed[3:]

    def selection(self) -> Filtered:
        return Filtered(self.keep, self.weights, scores=self.scores)

    def scored_at(self) -> list[dict | None]:
        """Per episode: the loss normalisers and optimizer steps before its in-backward score (None: unscored)."""
        return [None if steps == 0 else {"token_norm": tok, "seq_norm": seq, "scored_after_steps": int(steps) - 1}
                for tok, seq, steps in self.scored_with.t().tolist()]


def agree_on_step(finite: bool, kept: int, device: torch.device) -> tuple[bool, int]:
    """Whether every rank's losses and gradient norm of this mini-batch were finite, and how many episodes
    their in_update selections kept in all (one all-reduce), so that every rank steps or skips alike."""
    if not dist.is_dist():
        return finite, kept
    t = dist.all_reduce_sum(torch.tensor([float(not finite), float(kept)], dtype=torch.float64, device=device))
    return t[0].item() == 0, int(t[1].item())


def all_finite(*losses: torch.Tensor | None) -> bool:
    return all(x is None or bool(torch.isfinite(x.detach()).all()) for x in losses)


def ppo_epochs(c: Components, buf: Buffer, sel: Filtered, target: Target | None, state: RunState,
               it: int) -> UpdateResult:
    """``ppo.epochs`` passes over the kept episodes; in_update selects in the first and reuses it after."""
    res = UpdateResult()
    scoring = InUpdateSelection(c, buf, target, res) if c.in_update else None
    for epoch in range(c.cfg.ppo.epochs):
        if scoring is not None and epoch == 1:  # later epochs: the epoch-0 selection, plain backward
            sel = scoring.selection()
            if sel.num_kept == 0:
                break
        strategy = scoring if scoring is not None and epoch == 0 else PlainBackward()
        w_local = sel.weights[c.layout.e0:c.layout.e0 + c.layout.E_local].to(c.device)
        order = minibatch_order(sel.keep.nonzero().flatten(), c.cfg.seed, it, epoch)
        for mb_index, mb in enumerate(chunks(order, c.cfg.ppo.mini_batch_size)):
            at_theta_old = epoch == 0 and mb_index == 0
            if not minibatch_step(c, buf, mb, w_local, at_theta_old, strategy, res, state, it):
                break
        if scoring is not None and epoch == 0:
            scoring.gather()
        if state.nonfinite_reason is not None:
            break
    if scoring is not None:
        res.selection, res.scored_at = scoring.selection(), scoring.scored_at()
    return res


def minibatch_step(c: Components, buf: Buffer, mb: list[int], w_local: torch.Tensor, at_theta_old: bool,
                   strategy, res: UpdateResult, state: RunState, it: int) -> bool:
    """One optimizer step on mini-batch ``mb`` (global episode ids); False when the run must stop."""
    cfg, lay = c.cfg, c.layout
    norms = (float(buf.global_lengths[mb].sum()), float(len(mb)))  # token_norm, seq_norm
    local = [i - lay.e0 for i in mb if lay.owns(i)]
    c.optimizer.zero_grad(set_to_none=True)
    finite, kept = True, 0  # this mini-batch's losses were finite; in_update: episodes kept
    for idx in fsdp.pad_to_max(chunks(local, cfg.ppo.micro_batch_size), c.sharded):
        ok, k = micro_step(c, buf, idx, w_local, norms, at_theta_old, strategy, res.sums)
        finite, kept = finite and ok, kept + k
    if c.gold_sft is not None:  # control.sft_coef: + λ x SFT on the iteration's gold validation draw
        agree = (lambda ok: agree_on_step(ok, 0, c.device)[0]) if c.sharded else bool
        sft_loss, ok = c.gold_sft.backward(it, agree)
        res.sums.add("sft_loss", sft_loss)
        finite = finite and ok
    dist.all_reduce_grads(c.params)  # sum over ranks == the global mini-batch gradient
    grad_norm = fsdp.clip_grad_norm_(c.params, cfg.ppo.max_grad_norm)  # DTensor shards too
    finite, kept = agree_on_step(finite and bool(torch.isfinite(grad_norm)), kept, c.device)
    res.minibatches += 1
    if not finite:  # NaN/Inf loss or gradient: skip the step (weights, optimizer, LR untouched)
        return skip_step(c, res, state, it)
    if strategy.selects and kept == 0:  # nothing kept: no step, as before_update would take none
        return True
    if not guarded_step(c.optimizer, c.params, c.step_guard, cfg.ppo.max_grad_norm):
        return skip_step(c, res, state, it)  # the step made a weight NaN/Inf: undone (ippo.rl.step_guard)
    state.nonfinite_streak = 0
    res.sums.add("grad_norm", float(grad_norm) / max(1, dist.world_size()))  # summed over ranks later
    c.scheduler.step()
    res.updates += 1
    return True


def skip_step(c: Components, res: UpdateResult, state: RunState, it: int) -> bool:
    """Count a skipped optimizer step; False (stop the run) once ``ppo.max_nonfinite_steps`` came in a row."""
    res.nonfinite += 1
    state.nonfinite_streak += 1
    if state.nonfinite_streak < c.cfg.ppo.max_nonfinite_steps:
        return True
    state.nonfinite_reason = (
        f"iteration {it}: {state.nonfinite_streak} optimizer steps in a row had a non-finite loss or "
        f"gradient norm, or made the weights non-finite (ppo.max_nonfinite_steps={c.cfg.ppo.max_nonfinite_steps}): "
        "skipped, the run diverged; the weights are those of the last finite step")
    return False


def micro_step(c: Components, buf: Buffer, idx: list[int] | None, w_local: torch.Tensor,
               norms: tuple[float, float], at_theta_old: bool, strategy, sums: Sums) -> tuple[bool, int]:
    """Forward, loss and backward of one micro-batch (local episode ids ``idx``); -> (finite, episodes kept).

    ``idx=None`` (sharded models): this rank has no episode left in the mini-batch but another has; a
    stand-in forward+backward with every loss times 0 keeps FSDP's collectives in step (``live = 0`` also
    keeps it out of the stats and the selection).
    """
    cfg = c.cfg
    live = 1.0 if idx is not None else 0.0
    idx = idx if idx is not None else [0]
    ids, attn, rmask, P = episode_batch(buf.episodes, idx, c.data.pad, c.device)
    t = rmask.shape[1]
    reading = c.value_head.reading(c.policy) if c.value_head else contextlib.nullcontext()
    with strategy.recording(), reading as read:
        logits = response_logits(c.policy, ids, attn, P, cfg.rollout.temperature)
    logp = logprobs_from_logits(logits, ids[:, P:])
    if at_theta_old and buf.from_update and live:  # the update's first forward gives these old log-probs
        buf.old_logp[idx, :t] = logp.detach() * rmask
    old_logp = buf.old_logp[idx, :t]
    sampler_logp = buf.sampler_logp[idx, :t] if buf.sampler_logp is not None else None
    pg_tok, clipped = ppo_policy_loss(logp, old_logp, buf.adv[idx, :t], cfg.ppo,
                                      correction_weights(old_logp, sampler_logp, rmask, cfg.ppo))
    agg = functools.partial(aggregate, mask=rmask, agg=cfg.ppo.loss_agg, token_norm=norms[0], seq_norm=norms[1],
                            norm_len=loss_norm_len(cfg))
    w_tok = w_local[idx, None] * live
    ref_logp = buf.ref_logp[idx, :t] if buf.ref_logp is not None else None
    vf_tok = None
    if c.critic is not None:
        v = read[0][:, P - 1:-1] if c.value_head else response_values(c.critic, ids, attn, P)
        vf_tok = value_loss_per_token(v, buf.values[idx, :t], buf.returns[idx, :t], cfg.ppo.value_clip)
        sums.add("vf_loss", live * agg(vf_tok.detach()).item())
    losses = weighted_losses(c, pg_tok, policy_terms_per_token(logp, logits, ref_logp, cfg.ppo), vf_tok, w_tok,
                             agg, live)
    losses.attn, losses.norms = attn, norms
    with torch.no_grad():
        ent = agg(entropy_from_logits(logits))
        if ref_logp is not None and not cfg.ppo.kl_in_reward:
            sums.add("kl_loss", live * agg(kl_estimate(logp, ref_logp, cfg.ppo.kl_estimator)).item())
    gidx = [c.layout.e0 + i for i in idx] if live else []  # a stand-in writes no episode's results
    ok = all_finite(losses.pg, losses.rest)
    if c.sharded:  # a sharded backward is a collective: every rank runs it, or none does
        ok = agree_on_step(ok, 0, c.device)[0]
    kept = 0
    if not ok:  # no backward: the step is skipped
        strategy.mark_unscored(gidx)
    else:
        try:
            kept = strategy.backward(losses, idx, gidx, live)
        except NonFiniteError:  # NaN/Inf scores (selection runs before any .grad)
            strategy.mark_unscored(gidx)
            return False, 0
    with torch.no_grad():
        sums.add("pg_loss", agg(pg_tok * w_tok).item())
        sums.add("entropy", live * ent.item())
        sums.add("clipfrac", live * agg(clipped).item())
        sums.add("approx_kl", live * agg(0.5 * (logp - old_logp) ** 2).item())
    return ok, kept


def weighted_losses(c: Components, pg_tok: torch.Tensor, extra: torch.Tensor | None, vf_tok: torch.Tensor | None,
                    w_tok: torch.Tensor, agg: functools.partial, live: float) -> MicroLosses:
    """The I-PPO weight multiplies the episode's loss as ``influence.episode_loss`` defines it (one backward
    stream); the other terms form a second, unweighted one."""
    cfg = c.cfg
    weight_policy_terms = c.scorer is not None and cfg.influence.episode_loss in ("policy", "all")
    weight_value_loss = c.scorer is not None and c.value_head is not None and cfg.influence.episode_loss == "all"
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
    rest = sum(unweighted) * live if unweighted else None
    return MicroLosses(agg(weighted * w_tok), rest, vf_tok, agg)
