"""The optimizer step that never leaves a NaN/Inf weight behind: checked after every step, undone when it fails.

The update (``ippo.rl.update``) only steps on a finite loss and a finite, clipped gradient; this guards what
is left: the step itself (a learning rate so large that a weight overflows its dtype, float16's 65504 first).

Cost, and why the snapshot is usually not taken. Checking is one reduction over the weights after the step
(``torch.aminmax`` per tensor -- one pass, NaN propagated -- stacked into one number read back once), which
also gives max|w|, kept for the next step. Undoing needs the pre-step weights and optimizer state, and a copy
of them costs as much memory as the weights again; so a copy is taken only when the step *can* overflow. For
AdamW that is decidable from that one number: each weight moves by lr * (wd * |w| + |m_hat| / (sqrt(v_hat) +
eps)), where m_hat is an average of past clipped gradients (each element at most ppo.max_grad_norm, G), so
|w_new| <= max|w| * max(1, |1 - lr * wd|) + lr * G / eps. When that is below half the dtype's largest value
(rounding cannot double it) the step cannot produce a NaN/Inf from finite inputs, and no copy is needed:
with lr = 1e-6, G = 1, eps = 1e-8 the bound is max|w| + 100, far below float32's and bfloat16's 3.4e38, and
below float16's 65504 for ordinary weights. Any other optimizer always gets the copy. A failed check with no
copy (impossible by the bound above) raises ``NonFiniteError`` rather than continue with broken weights.
Under several processes the verdicts are all-reduced, so every rank keeps or undoes the step alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ippo.errors import NonFiniteError
from ippo.rl.parallel import distributed as dist


@dataclass
class StepGuard:
    max_abs: float | None = None  # max |w| after the last step that stood (None: not measured yet)


def local_parts(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's elements of each parameter (an FSDP2 DTensor's local shard), the empty ones left out."""
    parts = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    return [t.detach() for t in parts if t.numel()]


def max_abs(params: list[torch.Tensor]) -> float:
    """max |w| over every rank's weights: one pass per tensor and one read-back; NaN when any weight is NaN,
    inf when any is infinite."""
    parts = local_parts(params)
    if parts:
        ends = torch.stack([torch.stack(torch.aminmax(t)).float() for t in parts])
        local = torch.maximum(-ends[:, 0], ends[:, 1]).amax()
        flags = torch.stack([(~torch.isfinite(local)).float(), torch.nan_to_num(local, nan=0.0, posinf=0.0)])
    else:
        flags = torch.zeros(2)
    if dist.is_dist():  # (NaN does not survive every backend's MAX: a flag carries it)
        flags = dist.all_reduce_max(flags.to(dist_device(params)))
    return math.nan if flags[0].item() > 0 else flags[1].item()


def dist_device(params: list[torch.Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def may_overflow(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], weights_max: float,
                 max_grad_norm: float) -> bool:
    """Whether the next step could turn finite weights non-finite (see the module's docstring)."""
    if type(optimizer) is not torch.optim.AdamW or not math.isfinite(weights_max):
        return True
    limit = min(torch.finfo(p.dtype).max for p in params) / 2
    for group in optimizer.param_groups:
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        bound = weights_max * max(1.0, abs(1 - lr * wd)) + lr * max_grad_norm / eps
        if not bound < limit:  # (NaN-safe: a NaN bound takes the copy)
            return True
    return False


def snapshot(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[list, dict]:
    with torch.no_grad():
        weights = [p.detach().clone() for p in params]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                 for p in params if p in optimizer.state}
    return weights, state


def restore(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], saved: tuple[list, dict]) -> None:
    weights, state = saved
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    for p in params:
        optimizer.state.pop(p, None)
    optimizer.state.update(state)


def guarded_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], guard: StepGuard,
                 max_grad_norm: float) -> bool:
    """``optimizer.step()``, kept when every weight after it is finite; else undone (weights and optimizer state
    as before it) and False: the caller counts it as a skipped step."""
    if guard.max_abs is None:
        guard.max_abs = max_abs(params)
    saved = snapshot(optimizer, params) if may_overflow(optimizer, params, guard.max_abs, max_grad_norm) else None
    optimizer.step()
    after = max_abs(params)
    if math.isfinite(after):
        guard.max_abs = after
        return True
    if saved is None:
        raise NonFiniteError("an optimizer step made weights NaN/Inf although it could not overflow; it cannot be "
                             "undone (no copy was kept): the run stops, and no checkpoint holds these weights")
    restore(optimizer, params, saved)
    return False
