"""The argument contract of the influence ops: every argument of every op, checked once, the same way
on every backend.

``ippo.influence.ops.get(backend)`` wraps each op of a backend (the torch reference included) as
``contract.<op>(args, backend=..., device_types=...)`` followed by the backend's implementation, so
the backend modules only marshal (dtype conversion, contiguity, pointers, allocation) and launch.
Each check below has the op's exact signature and returns the arguments the implementation gets:
the same objects, except episode ids (converted to int64), ``num_episodes`` (an ``int``) and
``value`` (a ``float``).

Exception policy (the same type and message whatever the backend):

* ``TypeError``: an argument of the wrong Python type. A tensor argument that is not a
  ``torch.Tensor`` (or not None where None is allowed); ``num_episodes`` that is not an int
  (a float, a bool, a str); ``value`` that is not a real number (a str, None, a bool, a tensor);
  ``rule`` that is not a str; a rank that is not an int.
* ``ValueError``: a tensor or number the op cannot take. A wrong number of dimensions, sizes that
  disagree, a dtype outside the accepted set (floating inputs: fp16/bf16/fp32/fp64; episode ids:
  ``ID_DTYPES``; ``segment_sum`` values: any real dtype), tensors on different devices or on a
  device type the backend does not run on, an episode id outside ``[-1, num_episodes)``, a
  negative ``num_episodes``, an unknown rule, a fraction outside ``[0, 1]``, a rank < 1.

Checks run argument by argument in signature order (type, dimensions, dtype), then the Python
numbers (``num_episodes``, ``rule``, ``value``), the sizes across arguments, the devices, and last
the id range (the only check that reads tensor data: one host synchronisation). NaN/Inf scores
are not an argument error: the selection ops find them while they run (``ValueError`` on every
backend; ``ippo.select_episodes`` raises ``ippo.NonFiniteError`` before any op).

The engine's own arguments use the same helpers: ``episodes`` (ids of shape [B] or [B, T]),
``ids_fit`` and ``rank_arg``.
"""

from __future__ import annotations

import numbers
import operator

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
RULES = ("threshold", "bottom_fraction", "negative_bottom_fraction")

_ID_NAMES = "/".join(str(d).removeprefix("torch.") for d in ID_DTYPES)


# ---------------------------------------------------------------------------------------------- pieces
def tensor(t, name: str, ndim: int, layout: str | None = None) -> torch.Tensor:
    """``t`` if it is a tensor with ``ndim`` dimensions (``layout`` describes them in the message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {layout or f'{ndim}-D'}, got shape {tuple(t.shape)}")
    return t


def floating(t, name: str, ndim: int, layout: str | None = None) -> torch.Tensor:
    t = tensor(t, name, ndim, layout)
    if t.dtype not in FLOATS:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    return t


def optional_floating(t, name: str, ndim: int, layout: str | None = None) -> torch.Tensor | None:
    return None if t is None else floating(t, name, ndim, layout)


def size(actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{what}: expected {expected}, got {actual}")


def num_episodes_arg(num_episodes) -> int:
    """``num_episodes`` as an int >= 0."""
    if isinstance(num_episodes, bool):
        raise TypeError(f"num_episodes must be an int, got bool {num_episodes!r}")
    try:
        e = operator.index(num_episodes)
    except TypeError:
        raise TypeError(f"num_episodes must be an int, got {type(num_episodes).__name__} {num_episodes!r}") from None
    if e < 0:
        raise ValueError(f"num_episodes must be >= 0, got {e}")
    return e


def select_value(value) -> float:
    """The ``value`` of the selection ops (a threshold or a fraction) as a float: an int or a float, not a
    bool (so the string "0.3" is an error everywhere, never a comparison on one backend and accepted on
    another)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"value must be a number (int or float), got {type(value).__name__} {value!r}")
    return float(value)


def rule_and_value(rule, value) -> tuple[str, float]:
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a string, got {type(rule).__name__} {rule!r}")
    value = select_value(value)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: expected {' | '.join(RULES)}")
    if rule != "threshold" and not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{rule} needs a fraction in [0, 1], got {value}")
    return rule, value


def integer_ids(ids, name: str, ndims: tuple[int, ...] = (1,), layout: str | None = None) -> torch.Tensor:
    """Episode ids as int64 (type, dimensions and dtype checked; the range is ``id_range``'s)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() not in ndims:
        raise ValueError(f"{name} must be {layout or f'{ndims[0]}-D'}, got shape {tuple(ids.shape)}")
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"{name} must be an integer tensor ({_ID_NAMES}), got {ids.dtype}")
    return ids.to(torch.int64)


def id_range(ids: torch.Tensor, name: str, num_episodes: int | None) -> int:
    """Every id in ``[-1, num_episodes)`` (``num_episodes=None``: ids >= -1 only); returns the number of
    episodes (``num_episodes``, or max id + 1). One host synchronisation."""
    if not ids.numel():
        return num_episodes or 0
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo >= -1 and (num_episodes is None or hi < num_episodes):
        return hi + 1 if num_episodes is None else num_episodes
    bad = ids < -1 if num_episodes is None else (ids < -1) | (ids >= num_episodes)
    where = bad.flatten().nonzero().flatten()[:5].tolist()
    if num_episodes is None:
        raise ValueError(f"{name} must be >= -1 (-1 = no episode): got min {lo}; out of range at tokens {where}")
    raise ValueError(f"{name} must lie in [-1, {num_episodes}) (num_episodes={num_episodes}; -1 = no episode): "
                     f"got min {lo}, max {hi}; out of range at tokens {where}")


def placement(backend: str, device_types: tuple[str, ...] | None, tensors: dict[str, torch.Tensor | None]) -> None:
    """All tensors on one device, of a type the backend runs on (``device_types=None``: any)."""
    named = [(n, t.device) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, dev in named[1:]:
        if dev != first:
            raise ValueError(f"all tensors must be on one device: {n} is on {dev}, {first_name} on {first}")
    if device_types is not None and first.type not in device_types:
        raise ValueError(f"{first_name} must be a {' or '.join(device_types)} tensor for the {backend} backend, "
                         f"got device {first}")


def _tokens(x, dy) -> tuple[torch.Tensor, torch.Tensor]:
    x = floating(x, "x", 2, "2-D [N, d_in]")
    dy = floating(dy, "dy", 2, "2-D [N, d_out]")
    return x, dy


def _projections(p_in, p_in_bias, p_out):
    """p_in [k_in, d_in], p_in_bias [k_in] or None, p_out [k_out, d_out]: types, dimensions, dtypes."""
    p_in = floating(p_in, "p_in", 2, "2-D [k, d_in]")
    p_in_bias = optional_floating(p_in_bias, "p_in_bias", 1, "1-D [k]")
    p_out = floating(p_out, "p_out", 2, "2-D [k, d_out]")
    return p_in, p_in_bias, p_out


def _projection_sizes(x, dy, p_in, p_in_bias, p_out) -> None:
    size(dy.shape[0], x.shape[0], "dy.shape[0] (number of tokens N, from x)")
    size(p_in.shape[1], x.shape[1], "p_in.shape[1] (d_in, from x)")
    size(p_out.shape[1], dy.shape[1], "p_out.shape[1] (d_out, from dy)")
    if p_in_bias is not None:
        size(p_in_bias.shape[0], p_in.shape[0], "p_in_bias length (k, from p_in)")


def _token_episode(token_episode, num_episodes) -> tuple[torch.Tensor, int]:
    ids = integer_ids(token_episode, "token_episode", (1,), "1-D [N]")
    return ids, num_episodes_arg(num_episodes)


# ---------------------------------------------------------------------------------------------- the ops
def exact_token_scores(x, dy, g, g_bias=None, *, backend: str = "torch", device_types=None):
    x, dy = _tokens(x, dy)
    g = floating(g, "g", 2, "2-D [d_out, d_in]")
    g_bias = optional_floating(g_bias, "g_bias", 1, "1-D [d_out]")
    size(dy.shape[0], x.shape[0], "dy.shape[0] (number of tokens N, from x)")
    size(g.shape[0], dy.shape[1], "g.shape[0] (d_out, from dy)")
    size(g.shape[1], x.shape[1], "g.shape[1] (d_in, from x)")
    if g_bias is not None:
        size(g_bias.shape[0], dy.shape[1], "g_bias length (d_out, from dy)")
    placement(backend, device_types, {"x": x, "dy": dy, "g": g, "g_bias": g_bias})
    return x, dy, g, g_bias


def projected_token_scores(x, dy, p_in, p_in_bias, p_out, weight, *, backend: str = "torch", device_types=None):
    x, dy = _tokens(x, dy)
    p_in, p_in_bias, p_out = _projections(p_in, p_in_bias, p_out)
    weight = floating(weight, "weight", 1, "1-D [q]")
    _projection_sizes(x, dy, p_in, p_in_bias, p_out)
    size(p_out.shape[0], p_in.shape[0], "p_out.shape[0] (q, from p_in)")
    size(weight.shape[0], p_in.shape[0], "weight length (q, from p_in)")
    placement(backend, device_types,
              {"x": x, "dy": dy, "p_in": p_in, "p_in_bias": p_in_bias, "p_out": p_out, "weight": weight})
    return x, dy, p_in, p_in_bias, p_out, weight


def segment_sketch(x, dy, p_in, p_in_bias, p_out, token_episode, num_episodes, *, backend: str = "torch",
                   device_types=None):
    x, dy = _tokens(x, dy)
    p_in, p_in_bias, p_out = _projections(p_in, p_in_bias, p_out)
    ids, e = _token_episode(token_episode, num_episodes)
    _projection_sizes(x, dy, p_in, p_in_bias, p_out)
    size(ids.shape[0], x.shape[0], "token_episode length (number of tokens N, from x)")
    placement(backend, device_types,
              {"x": x, "dy": dy, "p_in": p_in, "p_in_bias": p_in_bias, "p_out": p_out, "token_episode": ids})
    id_range(ids, "token_episode", e)
    return x, dy, p_in, p_in_bias, p_out, ids, e


def segment_sum(values, token_episode, num_episodes, *, backend: str = "torch", device_types=None):
    values = tensor(values, "values", 1, "1-D [N]")
    if values.dtype.is_complex:
        raise ValueError(f"values must be a real tensor (floating, integer or bool), got {values.dtype}")
    ids, e = _token_episode(token_episode, num_episodes)
    size(ids.shape[0], values.shape[0], "token_episode length (number of tokens N, from values)")
    placement(backend, device_types, {"values": values, "token_episode": ids})
    id_range(ids, "token_episode", e)
    return values, ids, e


def select_episodes(scores, rule="threshold", value=0.0, *, backend: str = "torch", device_types=None):
    scores = floating(scores, "scores", 1, "1-D [E]")
    rule, value = rule_and_value(rule, value)
    placement(backend, device_types, {"scores": scores})
    return scores, rule, value


def score_and_select(sketches, target, rule="threshold", value=0.0, *, backend: str = "torch", device_types=None):
    sketches = floating(sketches, "sketches", 2, "2-D [E, D]")
    target = floating(target, "target", 1, "1-D [D]")
    rule, value = rule_and_value(rule, value)
    size(target.shape[0], sketches.shape[1], "target length (D, from sketches)")
    placement(backend, device_types, {"sketches": sketches, "target": target})
    return sketches, target, rule, value


# ---------------------------------------------------------------------------------------------- the engine's
def episodes(episode_ids, num_episodes) -> tuple[torch.Tensor, int]:
    """The engine's ``episode_ids`` ([B]: one per row, or [B, T]: one per token; -1 = none) as int64, and
    the number of episodes (``num_episodes``, or max id + 1 when it is None)."""
    ids = integer_ids(episode_ids, "episode_ids", (1, 2), "[B] or [B, T]")
    if num_episodes is not None:
        num_episodes = num_episodes_arg(num_episodes)
    return ids, id_range(ids, "episode_ids", num_episodes)


def ids_fit(ids: torch.Tensor, lead: tuple, name: str) -> None:
    """Episode ids against the leading (batch) shape of one call of module ``name``."""
    if ids.dim() == 1:
        ok = len(lead) >= 1 and lead[0] == ids.shape[0]
    else:
        ok = lead == tuple(ids.shape)
    if not ok:
        raise ValueError(f"episode_ids of shape {tuple(ids.shape)} does not match the batch shape {lead} "
                         f"seen by module {name!r} ([B] ids need the batch first; [B, T] ids the exact shape)")


def rank_arg(rank, name: str) -> int:
    """A sketch or target rank: an int >= 1 (a clear error instead of a negative tensor dimension)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(rank).__name__} {rank!r}")
    if rank < 1:
        raise ValueError(f"{name} must be >= 1, got {rank}")
    return int(rank)
