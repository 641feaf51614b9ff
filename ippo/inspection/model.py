"""What the page shows, as plain data (``report`` fills it, ``html`` renders it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .recompute import EpisodeAttribution, Recomputed
from .runlog import Row


@dataclass
class EpisodeView:
    """One episode card."""

    row: Row
    role: str  # top proponent | top opponent | dropped, positive reward
    prompt_text: str
    category: str | None = None
    pieces: list[str] | None = None  # the response tokens as text (attributed episodes only)
    attribution: EpisodeAttribution | None = None


@dataclass
class IterationView:
    iteration: int
    rows: list[Row]  # every episode of the iteration
    shown: list[EpisodeView]
    categories: dict[int, str] | None = None  # episode -> category (with a category hook)
    recomputed: Recomputed | None = None  # the iterations inspected at theta_old
    theta_old: bool = False  # its theta_old is available
    rtol: float = 0.0


@dataclass
class Page:
    title: str
    run_dir: str
    log_href: str  # influence.jsonl, relative to the page
    focus: int  # the iteration the filter starts on
    theta_old_text: str
    checkpoint_note: str
    settings: dict[str, str] = field(default_factory=dict)
    iterations: list[IterationView] = field(default_factory=list)
    color_scale: float = 0.0
    reward_values: list[str] = field(default_factory=list)
    many_rewards: bool = False  # too many distinct rewards to list: filter by sign

    def reward_key(self, reward: float) -> str:
        if self.many_rewards:
            return "> 0" if reward > 0 else "≤ 0"
        return f"{reward:g}"
