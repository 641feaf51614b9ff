"""``ippo inspect RUN_DIR``: read the run, pick the episodes to show, attribute them at theta_old, write the page."""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ippo.errors import ConfigError
from ippo.rl.components import load_task_data, named_input
from ippo.rl.config import TrainConfig
from ippo.rl.rewards import load_callable

from . import html
from .colors import color_scale
from .model import EpisodeView, IterationView, Page
from .recompute import FLOOR, RTOL, Recomputed, recompute
from .runlog import (
    LOG,
    Row,
    missing_theta_old,
    read_log,
    rebuildable,
    run_config,
    theta_old_sources,
    verified_checkpoint,
)


@dataclass
class Inspected:
    """What ``inspect_run`` wrote and found."""

    out: Path
    theta_old: list[int]  # logged iterations whose theta_old is available
    recomputed: dict[int, Recomputed] = field(default_factory=dict)

    def summary(self) -> dict:
        per = {}
        for it, rec in self.recomputed.items():
            per[it] = {"source": rec.source, "episodes": len(rec.episodes), "problem": rec.problem,
                       "compared": len(rec.compared), "match": rec.all_match if rec.compared else None,
                       "max_rel_diff": rec.max_rel_diff}
        return {"out": str(self.out), "theta_old_iterations": self.theta_old, "inspected": per}


def inspect_run(run_dir: str | Path, iterations: list[int] | None = None, out: str | Path | None = None,
                category: str | None = None, top: int = 5, sample: int = 5, device: str = "auto") -> Inspected:
    """Write the HTML report of ``run_dir`` (default ``RUN_DIR/inspect.html``) with per-token attribution for
    ``iterations`` (default: the newest logged iteration whose theta_old is available). ``category``:
    ``module:function`` mapping (response, gold answer) to an episode category, e.g.
    ``ippo.demo:episode_category``."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    log = read_log(run_dir)
    if not any(r.get("score") is not None for rows in log.values() for r in rows):
        raise ConfigError(f"{run_dir / LOG} holds no influence score (a PPO or control run): nothing to explain")
    sources = theta_old_sources(run_dir, list(log))
    chosen = check_iterations(cfg, log, sources, iterations)
    out = Path(out) if out is not None else run_dir / "inspect.html"
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       device if device != "auto" else "cpu")
    data = load_task_data(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=0)))  # no test split
    hook = named_input("--category", load_callable, category) if category else None
    result = Inspected(out, list(sources))
    views = []
    for it, rows in log.items():
        view = iteration_view(it, rows, data, hook, top, sample, theta_old=it in sources)
        if it in chosen:
            view.recomputed = result.recomputed[it] = attribute(cfg, data, view, sources[it], dev)
        views.append(view)
    page = make_page(cfg, run_dir, out, views, chosen[-1], sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html.render(page), encoding="utf-8")
    return result


def check_iterations(cfg: TrainConfig, log: dict[int, list[Row]], sources: dict, wanted: list[int] | None
                     ) -> list[int]:
    """The iterations to attribute: ``wanted``, each logged and with its theta_old, or the newest that has one."""
    if not wanted:
        return [max(sources)] if sources else []
    for it in wanted:
        if it not in log:
            raise ConfigError(f"--iteration {it}: the run logged iterations {min(log)}..{max(log)}")
        if it not in sources:
            raise ConfigError(missing_theta_old(cfg, it, sources))
    return sorted(set(wanted))


def shown_rows(rows: list[Row], top: int, sample: int, seed: int) -> list[tuple[str, Row]]:
    """The top proponents (highest scores), top opponents (lowest) and a seeded sample of the dropped episodes
    with positive reward that are neither: those with a learning signal (a non-zero advantage) first, since a
    group whose rewards are all equal scores 0 under group-relative advantages."""
    scored = sorted((r for r in rows if r.get("score") is not None and math.isfinite(r["score"])),
                    key=lambda r: (r["score"], r.episode))
    pro = scored[::-1][:top]
    opp = [r for r in scored[:top] if r not in pro]
    seen = {r.episode for r in pro + opp}
    pool = [r for r in rows if not r["kept"] and r["reward"] > 0 and r.episode not in seen]
    rng = random.Random(seed)
    signal = [r for r in pool if r.get("adv_sum")]
    picked = rng.sample(signal, min(sample, len(signal)))
    rest = [r for r in pool if not r.get("adv_sum")]
    picked = sorted(picked + rng.sample(rest, min(sample - len(picked), len(rest))), key=lambda r: r.episode)
    return ([("top proponent", r) for r in pro] + [("top opponent", r) for r in opp]
            + [("dropped, positive reward", r) for r in picked])


def iteration_view(it: int, rows: list[Row], data, hook, top: int, sample: int, theta_old: bool) -> IterationView:
    categories = None
    if hook is not None:
        categories = {r.episode: str(hook(r.get("response", ""), data.train[int(r["prompt_id"])].gold)) for r in rows}
    shown = [EpisodeView(r, role, data.fmt.prompt_text(data.train[int(r["prompt_id"])].question),
                         categories[r.episode] if categories else None)
             for role, r in shown_rows(rows, top, sample, seed=it)]
    return IterationView(it, rows, shown, categories, theta_old=theta_old, rtol=RTOL)


def attribute(cfg: TrainConfig, data, view: IterationView, checkpoint: Path | None, device: torch.device
              ) -> Recomputed:
    """Per-token contributions of the shown episodes at theta_old, attached to their cards."""
    rows = [ev.row for ev in view.shown]
    problem = rebuildable(rows)
    if problem is not None:
        return Recomputed(view.iteration, str(checkpoint), problem=problem)
    largest = max((abs(r["score"]) for r in view.rows if r.get("score") is not None
                   and math.isfinite(r["score"])), default=0.0)
    rec = recompute(cfg, data, view.iteration, rows, verified_checkpoint(checkpoint), largest, device)
    for ev in view.shown:
        ev.attribution = rec.episodes.get(ev.row.episode)
        if ev.attribution is not None:
            ev.pieces = token_pieces(data.tok, ev.row["response_tokens"])
    return rec


def token_pieces(tok, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded response (prefix decoding keeps the spaces a tokenizer puts
    between tokens; a single token's own decoding where the prefix changes)."""
    pieces, prev = [], ""
    for k in range(len(ids)):
        text = tok.decode(ids[:k + 1])
        if text.startswith(prev):
            pieces.append(text[len(prev):])
        else:
            pieces.append(tok.decode(ids[k:k + 1]))
        prev = text
    return pieces


def make_page(cfg: TrainConfig, run_dir: Path, out: Path, views: list[IterationView], focus: int,
              sources: dict) -> Page:
    ic, ppo, ck = cfg.influence, cfg.ppo, cfg.checkpoint
    rewards = sorted({float(r["reward"]) for v in views for r in v.rows})
    page = Page(
        title="/".join(run_dir.resolve().parts[-2:]), run_dir=str(run_dir),
        log_href=Path(os.path.relpath(run_dir.resolve() / LOG, out.resolve().parent)).as_posix(), focus=focus,
        theta_old_text=", ".join(map(str, sources)) or "none",
        checkpoint_note=(f"Iteration N's θ_old is checkpoints/iter_N (written after N iterations), iteration 0's "
                         f"the starting model; this run: checkpoint.every={ck.every}, keep_last={ck.keep_last}, "
                         f"keep_every={ck.keep_every} (keep_every=K keeps every K-th checkpoint for inspection)."),
        settings={"influence": f"mode={ic.mode}, timing={ic.timing}, filter={ic.filter}, episode_loss="
                               f"{ic.episode_loss}, reweight={ic.reweight}, n_val={ic.n_val}",
                  "ppo": f"advantage={ppo.advantage}, loss_agg={ppo.loss_agg}, epochs={ppo.epochs}, "
                         f"mini_batch_size={ppo.mini_batch_size}",
                  "rollout": f"{cfg.rollout.prompts_per_iter} prompts x {cfg.rollout.samples_per_prompt} samples",
                  "score tolerance": f"rtol {RTOL:g} of max(|score|, {FLOOR:g} x the iteration's largest |score|)"},
        iterations=views, many_rewards=len(rewards) > 12)
    page.reward_values = sorted({page.reward_key(x) for x in rewards})
    page.color_scale = color_scale([t for v in views for ev in v.shown if ev.attribution is not None
                                    for t in ev.attribution.tokens])
    return page
