"""Pure-PyTorch reference for every influence op: the readable definition of the math.

Every other backend (``cpp``, ``triton``, ``cuda``) implements exactly these functions
and is tested against them. Conventions shared by all ops:

* Tokens are flattened: ``x`` is ``[N, d_in]`` (the layer input), ``dy`` is ``[N, d_out]``
  (the gradient at the layer output).
* ``token_episode`` is an int64 ``[N]`` tensor mapping each token to its episode in
  ``[0, num_episodes)``; ``-1`` marks a token that belongs to no episode (it is skipped).
* Inputs may be fp16/bf16/fp32/fp64; arithmetic is done in ``acc_dtype(x.dtype)``
  (fp64 for fp64 inputs, fp32 otherwise) and results come back in that dtype.
* A bias is handled as an extra input column of ones: its gradient is ``sum_t g_t``.
* Arguments are checked by ``contract`` (``ops.get("torch")`` runs the checks first, as for
  every backend); these functions assume valid ones.
"""

from __future__ import annotations

import math

import torch

from .contract import num_episodes_arg

DEVICE_TYPES = None  # the reference runs on any device

# Bound on the temporary [chunk, k_out, k_in] outer products of the sketch reference.
_SKETCH_CHUNK_ELEMENTS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact_token_scores(
    x: torch.Tensor, dy: torch.Tensor, g: torch.Tensor, g_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token exact score ``s_t = g_t^T (G x_t + b)``.

    x [N, d_in], dy [N, d_out], g [d_out, d_in] (the validation gradient of the weight),
    g_bias [d_out] or None (the validation gradient of the bias). Returns [N].
    Summed over an episode's tokens this is ``<G_e, G> + <b_e, b>``.
    """
    dt = acc_dtype(x.dtype)
    z = x.to(dt) @ g.to(dt).T
    if g_bias is not None:
        z = z + g_bias.to(dt)
    return (z * dy.to(dt)).sum(-1)


def projected_token_scores(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Per-token low-rank score ``s_t = sum_j w_j (p_out_j . g_t)(p_in_j . x_t + p_in_bias_j)``.

    x [N, d_in], dy [N, d_out], p_in [q, d_in], p_in_bias [q] or None, p_out [q, d_out],
    weight [q]. With ``p_out = U^T``, ``p_in = V^T`` and ``weight = sigma`` from the
    rank-q SVD ``G = U diag(sigma) V^T`` this is the target-aligned score
    ``<U^T G_e V, diag(sigma)> = <G_e, U diag(sigma) V^T>``. Returns [N].
    """
    dt = acc_dtype(x.dtype)
    a = x.to(dt) @ p_in.to(dt).T
    if p_in_bias is not None:
        a = a + p_in_bias.to(dt)
    b = dy.to(dt) @ p_out.to(dt).T
    return (a * b) @ weight.to(dt)


def segment_sketch(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    token_episode: torch.Tensor,
    num_episodes: int,
) -> torch.Tensor:
    """Per-episode Kronecker sketch ``S_e = sum_{t in e} (P_out g_t)(P_in x_t + p_in_bias)^T``.

    x [N, d_in], dy [N, d_out], p_in [k_in, d_in], p_in_bias [k_in] or None,
    p_out [k_out, d_out], token_episode [N] int64. Returns [E, k_out, k_in].
    ``<S_e, S_val>`` is an unbiased estimate of ``<G_e, G_val>`` when the entries of
    P_in and P_out are i.i.d. N(0, 1/k) (independent of each other).
    """
    dt = acc_dtype(x.dtype)
    a = x.to(dt) @ p_in.to(dt).T
    if p_in_bias is not None:
        a = a + p_in_bias.to(dt)
    b = dy.to(dt) @ p_out.to(dt).T
    return segment_outer(a, b, token_episode, num_episodes)


def segment_outer(
    a: torch.Tensor, b: torch.Tensor, token_episode: torch.Tensor, num_episodes: int
) -> torch.Tensor:
    """``S_e = sum_{t in e} b_t a_t^T`` from projected factors a [N, k_in], b [N, k_out] -> [E, k_out, k_in].

    The reduction half of ``segment_sketch``, used when the projections come out of the layer's own
    GEMMs (``ippo.influence.fused``). Deterministic on every device (one-hot products on CUDA, no atomics).
    """
    num_episodes = num_episodes_arg(num_episodes)
    dt = acc_dtype(a.dtype)
    a, b = a.to(dt), b.to(dt)
    k_out, k_in = b.shape[1], a.shape[1]
    out = torch.zeros(num_episodes, k_out * k_in, dtype=dt, device=a.device)
    keep = token_episode >= 0
    a, b, ids = a[keep], b[keep], token_episode[keep]
    chunk = max(1, _SKETCH_CHUNK_ELEMENTS // max(1, k_out * k_in, num_episodes))
    for start in range(0, a.shape[0], chunk):
        sl = slice(start, start + chunk)
        outer = (b[sl, :, None] * a[sl, None, :]).reshape(-1, k_out * k_in)
        if a.device.type == "cpu":
            out.index_add_(0, ids[sl], outer)
        else:
            out += torch.nn.functional.one_hot(ids[sl], num_episodes).to(dt).T @ outer
    return out.view(num_episodes, k_out, k_in)


def segment_sum(values: torch.Tensor, token_episode: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """``out[e] = sum_{t : token_episode[t] == e} values[t]``; tokens with id -1 are skipped.

    Deterministic on every device: on CUDA it is a one-hot matrix product (no float atomics),
    since these sums feed the keep mask.
    """
    keep = token_episode >= 0
    values, ids = values[keep], token_episode[keep]
    if values.device.type == "cpu":
        return torch.zeros(num_episodes, dtype=values.dtype).index_add_(0, ids, values)
    out = torch.zeros(num_episodes, dtype=values.dtype, device=values.device)
    chunk = max(1, (1 << 26) // max(1, num_episodes))
    for start in range(0, values.shape[0], chunk):
        sl = slice(start, start + chunk)
        onehot = torch.nn.functional.one_hot(ids[sl], num_episodes).to(values.dtype)
        out += values[sl] @ onehot
    return out


def drop_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, robust to float noise (0.29 * 100 drops 29, not 28)."""
    return min(n, math.floor(fraction * n + 1e-9))


def select_episodes(
    scores: torch.Tensor, rule: str = "threshold", value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The I-PPO filter. Returns ``(keep [E] bool, weights [E] same dtype as scores)``.

    Rules:
      * ``threshold``: keep ``score > value``.
      * ``bottom_fraction``: drop the ``drop_count(value, E)`` lowest scores.
      * ``negative_bottom_fraction``: drop the ``drop_count(value, E)`` lowest scores, but only
        those that are negative.
    Ties are broken deterministically by episode index (a lower index counts as lower).
    Weights: ``w_e = score_e / mean(score over kept)`` for kept episodes, 0 for dropped ones;
    all zeros when nothing is kept (and when the kept mean is not positive the weights are
    still that ratio: callers decide what a non-positive mean means).
    NaN or Inf scores raise ``ValueError``.
    """
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"scores contain NaN/Inf (first bad episodes: {bad})")
    n = scores.shape[0]
    if rule == "threshold":
        keep = scores > value
    elif rule in ("bottom_fraction", "negative_bottom_fraction"):
        n_drop = drop_count(value, n)
        # stable sort: equal scores keep index order, so ties are deterministic
        order = torch.sort(scores, stable=True).indices
        drop = order[:n_drop]
        if rule == "negative_bottom_fraction":
            drop = drop[scores[drop] < 0]
        keep = torch.ones(n, dtype=torch.bool, device=scores.device)
        keep[drop] = False
    else:
        raise ValueError(
            f"unknown rule {rule!r}: expected threshold | bottom_fraction | negative_bottom_fraction"
        )
    weights = torch.zeros_like(scores)
    if keep.any():
        mean = scores[keep].mean()
        weights[keep] = scores[keep] / mean
    return keep, weights


def score_and_select(
    sketches: torch.Tensor, target: torch.Tensor, rule: str = "threshold", value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score episodes from their sketches and select them in one op.

    sketches [E, D] (``engine.sketches``), target [D] (``engine.target_sketch``). Returns
    ``(scores [E], keep [E] bool, weights [E])`` with ``scores = sketches @ target`` accumulated
    in fp64 for fp64 inputs and fp32 otherwise, then ``select_episodes(scores, rule, value)``.
    """
    dt = acc_dtype(sketches.dtype)
    scores = sketches.to(dt) @ target.to(dt)
    keep, weights = select_episodes(scores, rule, value)
    return scores, keep, weights
