"""Episode filters, by name: which episodes of an iteration the PPO update trains on, with what weights.

Every filter is one registered function of ``FilterInputs`` (the iteration's global tensors, gathered on
demand so that every rank selects the same episodes) returning a ``Filtered`` (keep mask, weights, and why
nothing was kept when nothing is). Adding one:

    @register_filter("my_filter")
    def my_filter(inp: FilterInputs) -> Filtered: ...

``influence`` is I-PPO's filter (``influence.filter``'s rule on the influence scores, weights score /
mean(kept)); ``none`` keeps everything (PPO; also I-PPO with ``influence.timing=in_update``, which selects
inside the update's backward instead). The others are *controls*: what the influence filter must beat
before its effect is credited to influence (``control.filter``). Dropping episodes changes a PPO update
in ways that have nothing to do with influence: fewer episodes per step, a different normalisation, no
zero-advantage episodes. Two plain-PPO runs isolate that:

* ``zero_variance`` (DAPO's dynamic-sampling filter, without re-sampling): drop every episode of a
  prompt whose samples all got the same reward. Under GRPO those episodes have zero advantage and
  carry no policy gradient, so I-PPO drops them too (their score is exactly 0): this control is
  "I-PPO without the influence".
* ``random``: in each iteration keep as many episodes as a given I-PPO run kept in that same
  iteration, drawn at random (seeded by (seed, iteration)), and optionally give them that run's
  weights in random order. By default the draw takes episodes with a non-zero advantage first, so the
  control keeps as much learning signal as it can at I-PPO's kept count: the difference that remains
  is which informative episodes were kept.
* ``max_variance`` (PODS, Xu et al. 2025): the same kept count, spread over the prompts (those whose samples'
  rewards differ first), and within each prompt the samples whose rewards have the largest variance: a
  gradient-free selector that keeps as much reward contrast as the budget allows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ippo.errors import ConfigError, NonFiniteError
from ippo.influence import Selection, select_episodes
from ippo.rl.data import derive_seed
from ippo.rl.parallel import distributed as dist

if TYPE_CHECKING:
    from ippo.rl.settings import InfluenceConfig, TrainConfig


@dataclass
class Filtered:
    """A filter's choice over the iteration's E episodes (the same on every rank)."""

    keep: torch.Tensor  # [E] bool
    weights: torch.Tensor  # [E] float32: the kept episodes' loss weights (0 for dropped ones)
    empty_reason: str | None = None  # why nothing is kept, when nothing is
    scores: torch.Tensor | None = None  # [E] float64 influence scores (influence filter)
    reweight_fallback: bool = False  # influence filter: the kept mean score was not positive, weights are 1
    nonfinite_reason: str | None = None  # the scores were NaN/Inf: the run diverged

    @property
    def num_kept(self) -> int:
        return int(self.keep.sum())

    @staticmethod
    def everything(E: int) -> Filtered:
        return Filtered(torch.ones(E, dtype=torch.bool), torch.ones(E))

    @staticmethod
    def nothing(E: int, **why) -> Filtered:
        return Filtered(torch.zeros(E, dtype=torch.bool), torch.zeros(E), **why)


@dataclass
class FilterInputs:
    """One iteration's episodes as a filter sees them: this rank's tensors, gathered over ranks on first use."""

    cfg: TrainConfig
    iteration: int
    E: int  # episodes in the iteration, over all ranks
    rewards_local: torch.Tensor  # [E_local] float32
    informative_local: torch.Tensor  # [E_local] float32: 1 where the episode has a non-zero advantage
    scores_local: torch.Tensor | None  # [E_local] float64 influence scores (before_update I-PPO)
    matched: MatchedSchedule | None  # control.filter=random | max_variance (MATCHED_FILTERS)
    device: torch.device

    @functools.cached_property
    def scores(self) -> torch.Tensor:
        return dist.all_gather_cat(self.scores_local.to(self.device)).cpu()

    @functools.cached_property
    def rewards(self) -> torch.Tensor:
        return dist.all_gather_cat(self.rewards_local.to(self.device)).cpu()

    @functools.cached_property
    def informative(self) -> torch.Tensor:
        return dist.all_gather_cat(self.informative_local.to(self.device)).cpu() > 0.5


FilterFn = Callable[[FilterInputs], Filtered]
EPISODE_FILTERS: dict[str, FilterFn] = {}
CONFIG_CHECKS: dict[str, Callable[[TrainConfig], None]] = {}  # a filter's own config requirements
MATCHED_FILTERS: set[str] = set()  # filters that read control.match_run's schedule (FilterInputs.matched)


def register_filter(name: str, check: Callable[[TrainConfig], None] | None = None,
                    matched: bool = False) -> Callable[[FilterFn], FilterFn]:
    """``check``: the filter's own config requirements; ``matched``: the trainer loads ``control.match_run``'s
    kept counts and weights for it (``FilterInputs.matched``)."""
    def register(fn: FilterFn) -> FilterFn:
        if name in EPISODE_FILTERS:
            raise ValueError(f"episode filter {name!r} is already registered")
        EPISODE_FILTERS[name] = fn
        if check is not None:
            CONFIG_CHECKS[name] = check
        if matched:
            MATCHED_FILTERS.add(name)
        return fn

    return register


def filter_name(cfg: TrainConfig) -> str:
    """The filter a run uses: I-PPO's (before the update), none (PPO, or I-PPO selecting inside the update's
    backward), or a control."""
    if cfg.influence.enabled:
        return "influence" if cfg.influence.timing == "before_update" else "none"
    return cfg.control.filter


def control_names() -> tuple[str, ...]:
    """The values ``control.filter`` accepts: every registered filter but the influence filter."""
    return tuple(n for n in EPISODE_FILTERS if n != "influence")


# ---------------------------------------------------------------------------------------------
# the filters


@register_filter("none")
def keep_everything(inp: FilterInputs) -> Filtered:
    return Filtered.everything(inp.E)


@dataclass(frozen=True)
class IterationSelection(Selection):
    """ippo.Selection plus whether the reweighting fell back to uniform weights."""

    reweight_fallback: bool = False


def select_and_weight(scores: torch.Tensor, ic: InfluenceConfig) -> IterationSelection:
    """The I-PPO filter with this run's rule; weights = score / mean(kept) or, without reweighting or
    when that mean is not positive (possible with the fraction rules), 1 for every kept episode."""
    sel = select_episodes(scores, rule=ic.filter, value=ic.threshold if ic.filter == "threshold" else ic.fraction)
    fallback = bool(ic.reweight and sel.num_kept and not sel.mean_kept_score > 0)
    weights = sel.weights if ic.reweight and not fallback else sel.keep.to(scores.dtype)
    return IterationSelection(sel.keep, weights, sel.num_kept, sel.num_dropped, sel.mean_kept_score,
                              reweight_fallback=fallback)


@register_filter("influence")
def influence_filter(inp: FilterInputs) -> Filtered:
    """I-PPO: ``influence.filter``'s rule on the all-gathered influence scores."""
    scores, E = inp.scores, inp.E
    try:
        sel = select_and_weight(scores, inp.cfg.influence)
    except NonFiniteError as e:
        return Filtered.nothing(E, scores=scores, nonfinite_reason=(
            f"iteration {inp.iteration}: non-finite influence scores ({e}): the run diverged"))
    return Filtered(sel.keep.cpu(), sel.weights.cpu().float(), scores=scores, reweight_fallback=sel.reweight_fallback,
                    empty_reason=(f"iteration {inp.iteration}: no episode kept by influence.filter="
                                  f"{inp.cfg.influence.filter} (all {E} scores rejected; max score "
                                  f"{float(scores.max()):.3e})"))


def _zero_variance_check(cfg: TrainConfig) -> None:
    if cfg.rollout.samples_per_prompt < 2:
        raise ConfigError("control.filter=zero_variance needs rollout.samples_per_prompt >= 2")


@register_filter("zero_variance", check=_zero_variance_check)
def zero_variance_filter(inp: FilterInputs) -> Filtered:
    """Drop every episode of a prompt whose samples all got the same reward (DAPO's filter, no re-sampling)."""
    keep = zero_variance(inp.rewards, inp.cfg.rollout.samples_per_prompt)
    return Filtered(keep, keep.float(), None if keep.any() else (
        f"iteration {inp.iteration}: control.filter=zero_variance kept nothing (every prompt's samples got the "
        "same reward)"))


def _random_check(cfg: TrainConfig) -> None:
    if not cfg.control.match_run:
        raise ConfigError("control.filter=random needs control.match_run (the I-PPO run whose kept counts it matches)")


def matched_iteration_missing(inp: FilterInputs) -> Filtered | None:
    """A matched control's iteration the matched run never reached (nothing to keep), None when it has it;
    ConfigError when that run's iteration had another number of episodes."""
    it, E, matched = inp.iteration, inp.E, inp.matched
    if it not in matched.kept:
        return Filtered.nothing(E, empty_reason=(
            f"iteration {it}: the matched run {matched.run_dir} has no iteration {it} (it stopped earlier)"))
    if matched.episodes[it] != E:
        raise ConfigError(f"control.match_run={matched.run_dir} had {matched.episodes[it]} episodes in iteration {it}, "
                          f"this run has {E}: match a run with the same rollout settings")
    return None


@register_filter("random", check=_random_check, matched=True)
def random_filter(inp: FilterInputs) -> Filtered:
    """Keep as many episodes as the matched I-PPO run kept in this iteration, at random (seeded)."""
    cc, it, E, matched = inp.cfg.control, inp.iteration, inp.E, inp.matched
    missing = matched_iteration_missing(inp)
    if missing is not None:
        return missing
    pool = inp.informative if cc.pool == "informative" else torch.ones(E, dtype=torch.bool)
    weights = matched.weights[it] if cc.weights == "matched" else None
    keep, w = random_matched(matched.kept[it], pool, weights, inp.cfg.seed, it)
    return Filtered(keep, w, None if keep.any() else f"iteration {it}: the matched run kept no episode")


def _max_variance_check(cfg: TrainConfig) -> None:
    if not cfg.control.match_run:
        raise ConfigError("control.filter=max_variance needs control.match_run (the I-PPO run whose kept counts it "
                          "matches)")
    if cfg.rollout.samples_per_prompt < 2:
        raise ConfigError("control.filter=max_variance needs rollout.samples_per_prompt >= 2")


@register_filter("max_variance", check=_max_variance_check, matched=True)
def max_variance_filter(inp: FilterInputs) -> Filtered:
    """PODS: as many episodes as the matched I-PPO run kept, the max-reward-variance samples of each prompt."""
    cc, it = inp.cfg.control, inp.iteration
    missing = matched_iteration_missing(inp)
    if missing is not None:
        return missing
    weights = inp.matched.weights[it] if cc.weights == "matched" else None
    keep, w = max_variance_matched(inp.matched.kept[it], inp.rewards, inp.cfg.rollout.samples_per_prompt, weights,
                                   inp.cfg.seed, it, varied_first=cc.pool == "informative")
    return Filtered(keep, w, None if keep.any() else f"iteration {it}: the matched run kept no episode")


# ---------------------------------------------------------------------------------------------
# the controls' building blocks


def zero_variance(rewards: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """Keep mask [E]: False for every episode of a group (consecutive ``samples_per_prompt`` episodes)
    whose rewards are all equal."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [E], got shape {tuple(rewards.shape)}")
    n = int(samples_per_prompt)
    if n < 2 or rewards.shape[0] % n:
        raise ValueError(f"zero_variance needs groups of >= 2 samples: {rewards.shape[0]} episodes are not groups "
                         f"of samples_per_prompt={n}")
    groups = rewards.view(-1, n)
    varies = (groups != groups[:, :1]).any(1)
    return varies.repeat_interleave(n)


@dataclass(frozen=True)
class MatchedSchedule:
    """What an I-PPO run kept in each iteration: ``kept[it]`` episodes with weights ``weights[it]``."""

    run_dir: str
    kept: dict[int, int]
    weights: dict[int, list[float]]
    episodes: dict[int, int]

    def __len__(self) -> int:
        return len(self.kept)


def load_matched_schedule(run_dir: str | Path) -> MatchedSchedule:
    """Per-iteration kept counts and kept weights from an I-PPO run's ``influence.jsonl``."""
    path = Path(run_dir) / "influence.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"control.match_run: {path} not found (run the I-PPO run to match first, with "
                                "log.influence_log=true)")
    kept: dict[int, int] = {}
    weights: dict[int, list[float]] = {}
    episodes: dict[int, int] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            it, k, w = int(r["iteration"]), bool(r["kept"]), float(r["weight"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"control.match_run: {path} line {i} is not an influence record ({e})") from None
        episodes[it] = episodes.get(it, 0) + 1
        kept.setdefault(it, 0)
        weights.setdefault(it, [])
        if k:
            kept[it] += 1
            weights[it].append(w)
    if not kept:
        raise ValueError(f"control.match_run: {path} has no episodes")
    return MatchedSchedule(str(run_dir), kept, {it: sorted(w) for it, w in weights.items()}, episodes)


def random_matched(num_kept: int, informative: torch.Tensor, weights: list[float] | None, seed: int,
                   iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``num_kept`` of the E episodes at random; -> (keep [E] bool, weights [E] float32).

    ``informative`` [E] bool: episodes marked True are drawn first (in random order), the rest only
    when there are fewer than ``num_kept`` of them (all True: a plain uniform draw). ``weights``: the matched run's kept
    weights, given to the kept episodes in random order (None: weight 1). The draw depends on
    (seed, iteration) only, so a resumed run draws the same episodes.
    """
    if informative.dim() != 1 or informative.dtype != torch.bool:
        raise ValueError(f"informative must be a 1-D bool tensor [E], got {informative.dtype} "
                         f"{tuple(informative.shape)}")
    E = int(informative.shape[0])
    check_budget("random_matched", num_kept, E, weights)
    g = torch.Generator().manual_seed(derive_seed(seed, "random_filter", iteration))
    order = torch.randperm(E, generator=g)
    first = informative[order]
    ranked = torch.cat([order[first], order[~first]])  # informative first, each part in random order
    chosen = ranked[:num_kept]
    keep = torch.zeros(E, dtype=torch.bool)
    keep[chosen] = True
    return keep, shuffled_weights(chosen, E, weights, g)


def check_budget(who: str, num_kept: int, E: int, weights: list[float] | None) -> None:
    """A matched control's kept count fits the E episodes, and comes with one weight per kept episode (or none)."""
    if not 0 <= num_kept <= E:
        raise ValueError(f"{who}: cannot keep {num_kept} of {E} episodes")
    if weights is not None and len(weights) != num_kept:
        raise ValueError(f"{who}: {len(weights)} weights for {num_kept} kept episodes")


def shuffled_weights(chosen: torch.Tensor, E: int, weights: list[float] | None, g: torch.Generator) -> torch.Tensor:
    """[E] float32: ``weights`` given to the episodes ``chosen`` in random order (``g``), 0 elsewhere; None: 1."""
    w = torch.zeros(E, dtype=torch.float32)
    if weights is None:
        w[chosen] = 1.0
    else:
        perm = torch.randperm(len(chosen), generator=g)
        w[chosen] = torch.tensor(weights, dtype=torch.float32)[perm]
    return w


def max_variance_subset(rewards: torch.Tensor, m: int) -> torch.Tensor:
    """Keep mask [n] of the ``m`` of a prompt's ``n`` samples whose rewards have the largest (population)
    variance. A maximiser is always the k highest and the m - k lowest rewards for some k (PODS, Xu et al.
    2025, Lemma 1), so the search is over k; ties go to the smaller k, equal rewards to the lower index."""
    n = int(rewards.shape[0])
    keep = torch.zeros(n, dtype=torch.bool)
    if m >= n:
        return ~keep
    order = torch.argsort(rewards, stable=True)
    best, best_idx = -1.0, order[:0]
    for k in range(m + 1):
        idx = torch.cat([order[:m - k], order[n - k:]])
        var = float(rewards[idx].double().var(unbiased=False)) if m else 0.0
        if var > best + 1e-12:
            best, best_idx = var, idx
    keep[best_idx] = True
    return keep


def spread_budget(num_kept: int, first: list[int], rest: list[int], n: int) -> dict[int, int]:
    """How many samples each group keeps: ``num_kept`` spread evenly over the groups ``first`` (at most n
    each; the remainder one more each, in the order given), what they cannot hold over ``rest`` the same way."""
    quota: dict[int, int] = {}
    for pool in (first, rest):
        take = min(num_kept, n * len(pool))
        if take <= 0:
            continue
        base, extra = divmod(take, len(pool))
        quota.update({grp: base + (i < extra) for i, grp in enumerate(pool)})
        num_kept -= take
    return quota


def max_variance_matched(num_kept: int, rewards: torch.Tensor, n: int, weights: list[float] | None, seed: int,
                         iteration: int, varied_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PODS down-sampling at a given budget; -> (keep [E] bool, weights [E] float32).

    ``num_kept`` episodes spread over the prompt groups (consecutive ``n`` episodes), in a seeded order of the
    groups, those whose rewards differ first (``varied_first``); each group keeps ``max_variance_subset``.
    ``weights``: the matched run's kept weights in random order (None: 1). Depends on (seed, iteration) only.
    """
    E = int(rewards.shape[0])
    check_budget("max_variance_matched", num_kept, E, weights)
    g = torch.Generator().manual_seed(derive_seed(seed, "max_variance_filter", iteration))
    order = torch.randperm(E // n, generator=g).tolist()
    varies = zero_variance(rewards, n)[::n].tolist() if varied_first else [True] * (E // n)
    quota = spread_budget(num_kept, [i for i in order if varies[i]], [i for i in order if not varies[i]], n)
    keep = torch.zeros(E, dtype=torch.bool)
    for grp, m in quota.items():
        keep[grp * n:(grp + 1) * n] = max_variance_subset(rewards[grp * n:(grp + 1) * n], m)
    return keep, shuffled_weights(keep.nonzero().flatten(), E, weights, g)
