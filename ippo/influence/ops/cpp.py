"""The ``cpp`` backend: the influence ops on the C++ CPU kernels of ``ippo._C``.

Same signatures and semantics as :mod:`ippo.influence.ops.reference`. This module is the only place that
talks to the extension; the extension never sees a torch tensor. It runs on arguments that passed the
contract (``ippo.influence.ops.get("cpp")`` checks them first: see ``contract.py``) and for every call

* converts every floating input to the accumulation dtype of the reference
  (``acc_dtype(x.dtype)``: fp64 stays fp64, fp16/bf16/fp32 become fp32);
* makes a matrix contiguous only when its last dimension is not (arbitrary row strides are
  passed through), and vectors fully contiguous;
* allocates the outputs with torch (the kernels overwrite every element) and passes
  ``data_ptr()`` + sizes + row strides, plus ``torch.get_num_threads()`` as the thread count.

Results are deterministic and do not depend on the number of threads. The extension checks the
episode ids again (defence in depth).
"""

from __future__ import annotations

import operator

import torch

from . import reference
from .binding import extension, ids64, ld, ptr, rows, threshold, vec
from .reference import acc_dtype

_C = extension()

DEVICE_TYPES = ("cpu",)

__all__ = [
    "drop_count",
    "exact_token_scores",
    "projected_token_scores",
    "score_and_select",
    "segment_sketch",
    "segment_sum",
    "select_episodes",
]

_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Output allocation (a hook: the tests poison it with NaN to prove every element is written)."""
    return torch.empty(shape, dtype=dtype)


def _tokens(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    dt = acc_dtype(x.dtype)
    return rows(x, dt), rows(dy, dt), dt


def exact_token_scores(
    x: torch.Tensor, dy: torch.Tensor, g: torch.Tensor, g_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token exact score ``s_t = g_t^T (G x_t + b)`` (see the reference). Returns [N]."""
    x, dy, dt = _tokens(x, dy)
    g, g_bias = rows(g, dt), vec(g_bias, dt)
    (n, d_in), d_out = x.shape, dy.shape[1]
    out = _empty((n,), dt)
    _C.exact_token_scores(
        _NAMES[dt], ptr(x), ld(x), ptr(dy), ld(dy), ptr(g), ld(g), ptr(g_bias), n, d_in, d_out, ptr(out),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def projected_token_scores(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Per-token low-rank score ``sum_j w_j (p_out_j . g_t)(p_in_j . x_t + p_in_bias_j)``. Returns [N]."""
    x, dy, dt = _tokens(x, dy)
    p_in, p_in_bias, p_out, weight = rows(p_in, dt), vec(p_in_bias, dt), rows(p_out, dt), vec(weight, dt)
    (n, d_in), d_out, q = x.shape, dy.shape[1], p_in.shape[0]
    out = _empty((n,), dt)
    _C.projected_token_scores(
        _NAMES[dt], ptr(x), ld(x), ptr(dy), ld(dy), ptr(p_in), ld(p_in), ptr(p_in_bias), ptr(p_out), ld(p_out),
        ptr(weight), n, d_in, d_out, q, ptr(out), torch.get_num_threads(),
    )  # fmt: skip
    return out


def segment_sketch(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    token_episode: torch.Tensor,
    num_episodes: int,
) -> torch.Tensor:
    """Per-episode sketch ``S_e = sum_{t in e} (P_out g_t)(P_in x_t + p_in_bias)^T``. Returns [E, k_out, k_in]."""
    x, dy, dt = _tokens(x, dy)
    p_in, p_in_bias, p_out = rows(p_in, dt), vec(p_in_bias, dt), rows(p_out, dt)
    (n, d_in), d_out, k_in, k_out = x.shape, dy.shape[1], p_in.shape[0], p_out.shape[0]
    ids = ids64(token_episode)
    out = _empty((num_episodes, k_out, k_in), dt)
    _C.segment_sketch(
        _NAMES[dt], ptr(x), ld(x), ptr(dy), ld(dy), ptr(p_in), ld(p_in), ptr(p_in_bias), ptr(p_out), ld(p_out),
        ptr(ids), n, d_in, d_out, k_in, k_out, num_episodes, ptr(out), torch.get_num_threads(),
    )  # fmt: skip
    return out


def segment_sum(values: torch.Tensor, token_episode: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """``out[e] = sum_{t : token_episode[t] == e} values[t]``, in token order; ids of -1 are skipped.

    Returns the dtype of ``values`` (as the reference); fp16/bf16 values are summed in fp32.
    Integer or bool values go to the reference implementation (exact either way).
    """
    ids = ids64(token_episode)
    if not values.dtype.is_floating_point:
        return reference.segment_sum(values, ids, num_episodes)
    dt = acc_dtype(values.dtype)
    vc = vec(values, dt)
    out = _empty((num_episodes,), dt)
    _C.segment_sum(_NAMES[dt], ptr(vc), ptr(ids), values.shape[0], num_episodes, ptr(out))
    return out if values.dtype == dt else out.to(values.dtype)


def drop_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, robust to float noise (the C++ twin of ``reference.drop_count``)."""
    return _C.drop_count(float(fraction), operator.index(n))


def select_episodes(
    scores: torch.Tensor, rule: str = "threshold", value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The I-PPO filter, identical to ``reference.select_episodes`` (keep mask bit for bit).

    Returns ``(keep [E] bool, weights [E] in the dtype of scores)``. fp16/bf16 scores are
    compared in fp32 after rounding ``value`` to their dtype, exactly as torch compares them.
    """
    if rule == "threshold":
        value = threshold(value, scores.dtype)
    dt = acc_dtype(scores.dtype)
    sc = vec(scores, dt)
    e = sc.shape[0]
    keep = _empty((e,), torch.bool)
    weights = _empty((e,), dt)
    _C.select_episodes(_NAMES[dt], ptr(sc), e, rule, value, ptr(keep), ptr(weights))
    return keep, (weights if scores.dtype == dt else weights.to(scores.dtype))


def score_and_select(
    sketches: torch.Tensor, target: torch.Tensor, rule: str = "threshold", value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scores = sketches @ target`` (a GEMV in the accumulation dtype: the BLAS one is as fast as
    anything hand-written here), then the C++ ``select_episodes``. Same contract as the reference."""
    dt = acc_dtype(sketches.dtype)
    scores = sketches.to(dt) @ target.to(dt)
    keep, weights = select_episodes(scores, rule, value)
    return scores, keep, weights
