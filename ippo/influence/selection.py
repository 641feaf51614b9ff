"""``ippo.select_episodes``: the I-PPO filter that the PPO loop calls on the episode scores."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ippo.errors import NonFiniteError

from . import ops
from .backends import resolve
from .ops import contract


@dataclass(frozen=True)
class Selection:
    """Which episodes I-PPO keeps and how it weights them.

    keep     BoolTensor [E]
    weights  [E]: score / mean(kept scores) for kept episodes, 0 for dropped ones
    """

    keep: torch.Tensor
    weights: torch.Tensor
    num_kept: int
    num_dropped: int
    mean_kept_score: float  # nan when nothing is kept

    @property
    def kept_fraction(self) -> float:
        total = self.num_kept + self.num_dropped
        return self.num_kept / total if total else 0.0


def select_episodes(
    scores: torch.Tensor, rule: str = "threshold", value: float = 0.0, backend: str = "auto"
) -> Selection:
    """Keep mask and I-PPO weights for episode ``scores`` [E].

    Rules: ``threshold`` keeps score > value (the paper: value = 0); ``bottom_fraction``
    drops the lowest ``value`` fraction; ``negative_bottom_fraction`` drops the lowest
    ``value`` fraction but only among negative scores. Ties break by episode index.
    NaN/Inf scores raise ``ippo.NonFiniteError``, a ``ValueError`` (never a silent drop); bad arguments
    raise as every op's do (``ippo.influence.ops.contract``).
    """
    scores, rule, value = contract.select_episodes(scores, rule, value)
    return select_with(ops.get(resolve(backend, scores.device)), scores, rule, value)


def select_with(op: SimpleNamespace, scores: torch.Tensor, rule: str = "threshold", value: float = 0.0) -> Selection:
    """``select_episodes`` on an already resolved op namespace (``ops.get``, or an engine's ``ops.Dispatch``)."""
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero().flatten()[:5].tolist()
        raise NonFiniteError(f"scores contain NaN/Inf (first bad episodes: {bad})")
    keep, weights = op.select_episodes(scores, rule, value)
    num_kept = int(keep.sum())
    mean = float(scores[keep].double().mean()) if num_kept else float("nan")
    return Selection(keep, weights, num_kept, scores.shape[0] - num_kept, mean)
