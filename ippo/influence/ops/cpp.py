"""The ``cpp`` backend: the influence ops on the C++ CPU kernels of ``ippo._C``.

Same signatures and semantics as :mod:`ippo.influence.ops.reference`. This module is the only place that
talks to the extension; the extension never sees a torch tensor. For every call it

* validates the arguments (``ValueError`` naming the argument on any problem): tensors, CPU
  device, shapes, floating dtypes, int64 episode ids in ``[-1, num_episodes)``;
* converts every floating input to the accumulation dtype of the reference
  (``acc_dtype(x.dtype)``: fp64 stays fp64, fp16/bf16/fp32 become fp32);
* makes a matrix contiguous only when its last dimension is not (arbitrary row strides are
  passed through), and vectors fully contiguous;
* allocates the outputs with torch (the kernels overwrite every element) and passes
  ``data_ptr()`` + sizes + row strides, plus ``torch.get_num_threads()`` as the thread count.

Results are deterministic and do not depend on the number of threads.
"""

from __future__ import annotations

import operator

import torch

from . import reference
from .binding import FLOATS as _FLOATS
from .binding import check_id_range, check_projected_shapes, extension
from .binding import check_size as _check_size
from .binding import ld as _ld
from .binding import num_episodes_arg as _num_episodes
from .binding import ptr as _ptr
from .binding import rows as _rows
from .reference import acc_dtype

_C = extension()

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


def _tensor(t, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        # ValueError (not TypeError) on purpose: every bad argument of an op is a ValueError
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU for the cpp backend, got device {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _float(t, name: str, ndim: int, dt: torch.dtype) -> torch.Tensor:
    t = _tensor(t, name, ndim)
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    return t.to(dt).contiguous() if ndim == 1 else _rows(t, dt)










def _ids(token_episode, n: int, num_episodes: int) -> torch.Tensor:
    ids = _tensor(token_episode, "token_episode", 1)
    if ids.dtype != torch.int64:
        raise ValueError(f"token_episode must be int64, got {ids.dtype}")
    _check_size(ids.shape[0], n, "token_episode length (number of tokens N)")
    ids = ids.contiguous()
    check_id_range(ids, num_episodes)
    return ids


def _x_dy(x, dy) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    x0 = _tensor(x, "x", 2)
    if x0.dtype not in _FLOATS:
        raise ValueError(f"x must be a floating tensor (fp16/bf16/fp32/fp64), got {x0.dtype}")
    dt = acc_dtype(x0.dtype)
    x = _float(x, "x", 2, dt)
    dy = _float(dy, "dy", 2, dt)
    _check_size(dy.shape[0], x.shape[0], "dy.shape[0] (number of tokens N, from x)")
    return x, dy, dt


def exact_token_scores(
    x: torch.Tensor, dy: torch.Tensor, g: torch.Tensor, g_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token exact score ``s_t = g_t^T (G x_t + b)`` (see the reference). Returns [N]."""
    x, dy, dt = _x_dy(x, dy)
    n, d_in = x.shape
    d_out = dy.shape[1]
    g = _float(g, "g", 2, dt)
    _check_size(g.shape[0], d_out, "g.shape[0] (d_out, from dy)")
    _check_size(g.shape[1], d_in, "g.shape[1] (d_in, from x)")
    if g_bias is not None:
        g_bias = _float(g_bias, "g_bias", 1, dt)
        _check_size(g_bias.shape[0], d_out, "g_bias length (d_out, from dy)")
    out = _empty((n,), dt)
    _C.exact_token_scores(
        _NAMES[dt],
        _ptr(x),
        _ld(x),
        _ptr(dy),
        _ld(dy),
        _ptr(g),
        _ld(g),
        _ptr(g_bias),
        n,
        d_in,
        d_out,
        _ptr(out),
        torch.get_num_threads(),
    )
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
    x, dy, dt = _x_dy(x, dy)
    n, d_in = x.shape
    d_out = dy.shape[1]
    p_in = _float(p_in, "p_in", 2, dt)
    p_out = _float(p_out, "p_out", 2, dt)
    p_in_bias = None if p_in_bias is None else _float(p_in_bias, "p_in_bias", 1, dt)
    weight = _float(weight, "weight", 1, dt)
    q = check_projected_shapes(d_in, d_out, p_in, p_out, p_in_bias, weight)
    out = _empty((n,), dt)
    _C.projected_token_scores(
        _NAMES[dt],
        _ptr(x),
        _ld(x),
        _ptr(dy),
        _ld(dy),
        _ptr(p_in),
        _ld(p_in),
        _ptr(p_in_bias),
        _ptr(p_out),
        _ld(p_out),
        _ptr(weight),
        n,
        d_in,
        d_out,
        q,
        _ptr(out),
        torch.get_num_threads(),
    )
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
    x, dy, dt = _x_dy(x, dy)
    n, d_in = x.shape
    d_out = dy.shape[1]
    p_in = _float(p_in, "p_in", 2, dt)
    k_in = p_in.shape[0]
    _check_size(p_in.shape[1], d_in, "p_in.shape[1] (d_in, from x)")
    p_out = _float(p_out, "p_out", 2, dt)
    k_out = p_out.shape[0]
    _check_size(p_out.shape[1], d_out, "p_out.shape[1] (d_out, from dy)")
    if p_in_bias is not None:
        p_in_bias = _float(p_in_bias, "p_in_bias", 1, dt)
        _check_size(p_in_bias.shape[0], k_in, "p_in_bias length (k_in, from p_in)")
    e = _num_episodes(num_episodes)
    ids = _ids(token_episode, n, e)
    out = _empty((e, k_out, k_in), dt)
    _C.segment_sketch(
        _NAMES[dt],
        _ptr(x),
        _ld(x),
        _ptr(dy),
        _ld(dy),
        _ptr(p_in),
        _ld(p_in),
        _ptr(p_in_bias),
        _ptr(p_out),
        _ld(p_out),
        _ptr(ids),
        n,
        d_in,
        d_out,
        k_in,
        k_out,
        e,
        _ptr(out),
        torch.get_num_threads(),
    )
    return out


def segment_sum(values: torch.Tensor, token_episode: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """``out[e] = sum_{t : token_episode[t] == e} values[t]``, in token order; ids of -1 are skipped.

    Returns the dtype of ``values`` (as the reference); fp16/bf16 values are summed in fp32.
    Integer or bool values go to the reference implementation (exact either way).
    """
    v = _tensor(values, "values", 1)
    e = _num_episodes(num_episodes)
    ids = _ids(token_episode, v.shape[0], e)
    if not v.dtype.is_floating_point:
        if v.dtype.is_complex:
            raise ValueError(f"values must be a real tensor, got {v.dtype}")
        return reference.segment_sum(v, ids, e)
    dt = acc_dtype(v.dtype)
    vc = _float(v, "values", 1, dt)
    out = _empty((e,), dt)
    _C.segment_sum(_NAMES[dt], _ptr(vc), _ptr(ids), v.shape[0], e, _ptr(out))
    return out if v.dtype == dt else out.to(v.dtype)


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
    s = _tensor(scores, "scores", 1) if isinstance(scores, torch.Tensor) and scores.dim() == 1 else None
    if s is None:
        if isinstance(scores, torch.Tensor):
            raise ValueError(f"scores must be 1-D [E], got shape {tuple(scores.shape)}")
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if s.dtype not in _FLOATS:
        raise ValueError(f"scores must be a floating tensor (fp16/bf16/fp32/fp64), got {s.dtype}")
    if not isinstance(rule, str):
        raise ValueError(f"rule must be a string, got {type(rule).__name__}")  # noqa: TRY004
    value = reference.select_value(value)
    if rule == "threshold":
        # torch evaluates `scores > value` in the dtype of scores: round value the same way
        value = torch.tensor([value], dtype=torch.float64).to(s.dtype).item()
    dt = acc_dtype(s.dtype)
    sc = _float(s, "scores", 1, dt)
    e = sc.shape[0]
    keep = _empty((e,), torch.bool)
    weights = _empty((e,), dt)
    _C.select_episodes(_NAMES[dt], _ptr(sc), e, rule, value, _ptr(keep), _ptr(weights))
    return keep, (weights if s.dtype == dt else weights.to(s.dtype))


def score_and_select(
    sketches: torch.Tensor, target: torch.Tensor, rule: str = "threshold", value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scores = sketches @ target`` (a GEMV in the accumulation dtype: the BLAS one is as fast as
    anything hand-written here), then the C++ ``select_episodes``. Same contract as the reference."""
    sk = _tensor(sketches, "sketches", 2)
    tg = _tensor(target, "target", 1)
    _check_size(tg.shape[0], sk.shape[1], "target length (sketch width D)")
    for name, t in (("sketches", sk), ("target", tg)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    dt = acc_dtype(sk.dtype)
    scores = sk.to(dt) @ tg.to(dt)
    keep, weights = select_episodes(scores, rule, value)
    return scores, keep, weights
