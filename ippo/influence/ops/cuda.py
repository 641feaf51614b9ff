"""The ``cuda`` backend: the influence ops on the CUDA kernels of ``ippo._C`` (``csrc/cuda/*.cu``).

Same signatures and semantics as :mod:`ippo.influence.ops.reference`; this module is the only place that talks to
the CUDA launchers (the extension never sees a torch tensor). It runs on arguments that passed the contract
(``ippo.influence.ops.get("cuda")`` checks them first, CUDA device included: see ``contract.py``) and for
every call it

* picks the element type the kernels load: X and dY stay in their dtype when it is fp32/fp16/bf16 and
  the same for both (converted to fp32 inside the kernel, right after the load); mixed dtypes are
  converted to fp32 here first (exact, as the reference's ``.to(fp32)``, at the cost of a copy). The
  small operands (G, projections, biases, weights, target) are converted to fp32 here;
* **fp64 inputs of the GEMM ops** (``exact_token_scores``, ``projected_token_scores``,
  ``segment_sketch``) **go to the torch reference**: the CUDA kernels compute in fp32. ``segment_sum``,
  ``select_episodes`` and ``score_and_select`` have fp64 kernels;
* groups the tokens by episode in torch (stable argsort of the kept ids, ``bincount`` + ``cumsum``) so
  that each output tile is reduced by one thread block in a fixed order;
* makes a matrix contiguous only when its last dimension is not (row strides are passed through);
* allocates outputs and workspaces with torch on the tensors' device and passes ``data_ptr()`` + sizes +
  row strides + ``torch.cuda.current_stream(device).cuda_stream`` + the device index.

Results come back in ``acc_dtype(x.dtype)`` (fp32 for fp16/bf16/fp32), as the reference's. Every op is
deterministic (no float atomics: two calls give bitwise equal results on the same device). NaN/Inf scores
in the selection ops raise ``ValueError`` naming the first bad episode (one host synchronisation, as the
reference's ``torch.isfinite(...).all()``). The contract's id range check and the token grouping synchronise too.
Integer ``segment_sum`` values are summed by torch's ``index_add_`` (exact in any order).
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from . import reference
from .binding import extension, ids64, threshold
from .binding import ld as _ld
from .binding import ptr as _ptr
from .binding import rows as _rows
from .binding import vec as _vec
from .reference import acc_dtype, drop_count

_C = extension()

DEVICE_TYPES = ("cuda",)  # tools/cuda_emu adds "cpu" (its emulated build runs on CPU tensors)

__all__ = [
    "drop_count",
    "exact_token_scores",
    "projected_token_scores",
    "score_and_select",
    "segment_sketch",
    "segment_sum",
    "select_episodes",
]

KERNEL_NAMES = (
    "cuda_exact_token_scores",
    "cuda_projected_token_scores",
    "cuda_segment_sketch",
    "cuda_segment_sum",
    "cuda_select_episodes",
    "cuda_score_and_select",
)
TILE = 64  # tokens and columns per tile of the GEMM kernels (csrc/cuda/kernels.h)

_GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (a hook: the tests poison it to prove that every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kernels():
    """``ippo._C`` when it carries the CUDA launchers, else a clear error."""
    if not _C.cuda_compiled():
        raise RuntimeError(
            "ippo._C was built without CUDA (nvcc not found or IPPO_CUDA=0): the cuda backend is unavailable"
        )
    missing = [name for name in KERNEL_NAMES if not hasattr(_C, name)]
    if missing:
        raise RuntimeError(f"ippo._C was built with CUDA but lacks the launchers {missing}; rebuild it")
    return _C


# ---------------------------------------------------------------------------------------------------
# marshalling helpers


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _storage(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X and dY as the kernels load them: one dtype among fp32/fp16/bf16 (mixed -> fp32)."""
    dt = x.dtype if x.dtype == dy.dtype and x.dtype in _GEMM_DTYPES else torch.float32
    return _rows(x, dt), _rows(dy, dt)


def group_by_episode(ids: torch.Tensor, num_episodes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order [M], offsets [E+1], counts [E])`` for int64 ids in ``[-1, num_episodes)`` (``-1`` dropped).

    ``order[offsets[e]:offsets[e+1]]`` are the tokens of episode ``e`` in increasing token order.
    """
    idx = (ids >= 0).nonzero().squeeze(1)
    kept = ids[idx]
    order = idx[torch.argsort(kept, stable=True)].contiguous()
    counts = torch.bincount(kept, minlength=num_episodes)
    offsets = torch.zeros(num_episodes + 1, dtype=torch.int64, device=ids.device)
    if num_episodes:
        torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets, counts


def _token_split(row_tiles: int, col_tiles: int, device: torch.device) -> int:
    """How many blocks share the column tiles of one token tile (occupancy when there are few tokens)."""
    if col_tiles <= 1:
        return 1
    target = 2 * _sm_count(_index(device))
    if row_tiles >= target:
        return 1
    return max(1, min(col_tiles, -(-target // row_tiles), 64))


def _sketch_split(num_episodes: int, n_tiles: int, max_len: int, k_out: int, k_in: int, device) -> int:
    """Chunks per episode for the sketch (few, long episodes); 1 whenever there is enough parallelism."""
    if max_len <= 512:
        return 1
    programs = max(1, num_episodes * n_tiles)
    split = min(-(-2 * _sm_count(_index(device)) // programs), max_len // 256, 16)
    split = min(split, max(1, (1 << 26) // max(1, num_episodes * k_out * k_in)))  # partials <= 256 MiB
    return max(1, split)


def _split_arg(split, default: int) -> int:
    if split is None:
        return default
    split = operator.index(split)
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    return split


# ---------------------------------------------------------------------------------------------------
# ops


def exact_token_scores(
    x: torch.Tensor, dy: torch.Tensor, g: torch.Tensor, g_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token exact score ``s_t = g_t^T (G x_t + b)`` (see the reference). Returns fp32 [N].

    fp64 ``x`` goes to the torch reference (the kernel computes in fp32).
    """
    return _exact_token_scores(x, dy, g, g_bias)


def _exact_token_scores(x, dy, g, g_bias=None, *, split: int | None = None) -> torch.Tensor:
    (n, d_in), d_out, device = x.shape, dy.shape[1], x.device
    if x.dtype == torch.float64:
        return reference.exact_token_scores(x, dy, g, g_bias)
    C = _kernels()
    xs, dys = _storage(x, dy)
    g32 = _rows(g, torch.float32)
    b32 = _vec(g_bias, torch.float32)
    out = _empty((n,), torch.float32, device)
    if n == 0:
        return out
    split = _split_arg(split, _token_split(math.ceil(n / TILE), math.ceil(d_out / TILE), device))
    split = min(split, max(1, math.ceil(d_out / TILE)))
    ws = torch.empty((split, n), dtype=torch.float32, device=device) if split > 1 else None
    C.cuda_exact_token_scores(
        _NAMES[xs.dtype], _ptr(xs), _ld(xs), _ptr(dys), _ld(dys), _ptr(g32), _ld(g32), _ptr(b32),
        n, d_in, d_out, split, _ptr(ws), _ptr(out), _stream(device), _index(device),
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
    """Per-token low-rank score ``sum_j w_j (p_out_j . g_t)(p_in_j . x_t + p_in_bias_j)``. Returns fp32 [N].

    fp64 ``x`` goes to the torch reference (the kernel computes in fp32).
    """
    return _projected_token_scores(x, dy, p_in, p_in_bias, p_out, weight)


def _projected_token_scores(x, dy, p_in, p_in_bias, p_out, weight, *, split: int | None = None):
    (n, d_in), d_out, q, device = x.shape, dy.shape[1], p_in.shape[0], x.device
    if x.dtype == torch.float64:
        return reference.projected_token_scores(x, dy, p_in, p_in_bias, p_out, weight)
    C = _kernels()
    xs, dys = _storage(x, dy)
    pi, po = _rows(p_in, torch.float32), _rows(p_out, torch.float32)
    pb, w = _vec(p_in_bias, torch.float32), _vec(weight, torch.float32)
    out = _empty((n,), torch.float32, device)
    if n == 0:
        return out
    split = _split_arg(split, _token_split(math.ceil(n / TILE), math.ceil(q / TILE), device))
    split = min(split, max(1, math.ceil(q / TILE)))
    ws = torch.empty((split, n), dtype=torch.float32, device=device) if split > 1 else None
    C.cuda_projected_token_scores(
        _NAMES[xs.dtype], _ptr(xs), _ld(xs), _ptr(dys), _ld(dys), _ptr(pi), _ld(pi), _ptr(pb),
        _ptr(po), _ld(po), _ptr(w), n, d_in, d_out, q, split, _ptr(ws), _ptr(out),
        _stream(device), _index(device),
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
    """Per-episode sketch ``S_e = sum_{t in e} (P_out g_t)(P_in x_t + p_in_bias)^T``: fp32 [E, k_out, k_in].

    fp64 ``x`` goes to the torch reference (the kernel computes in fp32).
    """
    return _segment_sketch(x, dy, p_in, p_in_bias, p_out, token_episode, num_episodes)


def _segment_sketch(x, dy, p_in, p_in_bias, p_out, token_episode, num_episodes, *, split: int | None = None):
    (n, d_in), d_out, k_in, k_out, device = x.shape, dy.shape[1], p_in.shape[0], p_out.shape[0], x.device
    e, ids = num_episodes, ids64(token_episode)
    if x.dtype == torch.float64:
        return reference.segment_sketch(x, dy, p_in, p_in_bias, p_out, ids, e)
    C = _kernels()
    out = _empty((e, k_out, k_in), torch.float32, device)
    if out.numel() == 0:
        return out
    xs, dys = _storage(x, dy)
    pi, po = _rows(p_in, torch.float32), _rows(p_out, torch.float32)
    pb = _vec(p_in_bias, torch.float32)
    order, offsets, counts = group_by_episode(ids, e)
    if split is None:
        max_len = int(counts.max()) if n else 0  # host sync
        n_tiles = math.ceil(k_out / TILE) * math.ceil(k_in / TILE)
        split = _sketch_split(e, n_tiles, max_len, k_out, k_in, device)
    split = _split_arg(split, 1)
    ws = torch.empty((e * split, k_out, k_in), dtype=torch.float32, device=device) if split > 1 else None
    C.cuda_segment_sketch(
        _NAMES[xs.dtype], _ptr(xs), _ld(xs), _ptr(dys), _ld(dys), _ptr(pi), _ld(pi), _ptr(pb),
        _ptr(po), _ld(po), _ptr(order), _ptr(offsets), d_in, d_out, k_in, k_out, e, split, _ptr(ws),
        _ptr(out), _stream(device), _index(device),
    )  # fmt: skip
    return out


def segment_sum(values: torch.Tensor, token_episode: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """``out[e] = sum_{t : token_episode[t] == e} values[t]`` in a fixed order; ids of -1 are skipped.

    Returns the dtype of ``values`` (as the reference); fp16/bf16/fp32 are summed in fp32, fp64 in fp64.
    Integer values are summed exactly by ``index_add_``; bool values go to the reference.
    """
    v, e, device = values, num_episodes, values.device
    ids = ids64(token_episode)
    if not v.dtype.is_floating_point:
        if v.dtype == torch.bool:
            return reference.segment_sum(v, ids, e)
        # integer sums are exact in any order (index_add_'s atomics cannot change the result)
        kept = ids >= 0
        return torch.zeros(e, dtype=v.dtype, device=device).index_add_(0, ids[kept], v[kept])
    C = _kernels()
    dt = acc_dtype(v.dtype)
    out = _empty((e,), dt, device)
    if e:
        vc = v.contiguous()
        order, offsets, _ = group_by_episode(ids, e)
        C.cuda_segment_sum(
            _NAMES[vc.dtype],
            _ptr(vc),
            _ptr(order),
            _ptr(offsets),
            e,
            _ptr(out),
            _stream(device),
            _index(device),
        )
    return out if v.dtype == dt else out.to(v.dtype)


def select_episodes(
    scores: torch.Tensor, rule: str = "threshold", value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The I-PPO filter, identical to ``reference.select_episodes`` (keep mask bit for bit).

    Returns ``(keep [E] bool, weights [E] in the dtype of scores)``. fp16/bf16 scores are compared in
    fp32 after rounding ``value`` to their dtype, exactly as torch compares them. Ties are broken by
    index (a stable sort). NaN/Inf scores raise ``ValueError`` naming the first bad episode.
    """
    s = scores
    if rule == "threshold":
        value = threshold(value, s.dtype)
    dt = acc_dtype(s.dtype)
    sc = s.to(dt).contiguous()
    e = sc.shape[0]
    keep = _empty((e,), torch.bool, s.device)
    weights = _empty((e,), dt, s.device)
    if e:
        C = _kernels()
        n_drop = drop_count(value, e) if rule != "threshold" else 0
        flag = torch.empty(1, dtype=torch.int64, device=s.device)
        C.cuda_select_episodes(
            _NAMES[dt], _ptr(sc), e, rule, value, n_drop, _ptr(keep), _ptr(weights), _ptr(flag),
            _stream(s.device), _index(s.device),
        )  # fmt: skip
    return keep, (weights if s.dtype == dt else weights.to(s.dtype))


def score_and_select(
    sketches: torch.Tensor, target: torch.Tensor, rule: str = "threshold", value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scores = sketches @ target`` (fixed-order fp32 sums; fp64 for fp64 sketches), then the filter.

    sketches [E, D], target [D]. Returns ``(scores [E], keep [E] bool, weights [E])`` as the reference,
    from one host call (a few launches, one synchronisation for the NaN/Inf check).
    """
    sk, tg, device = sketches, target, sketches.device
    dt = acc_dtype(sk.dtype)
    if rule == "threshold":
        value = threshold(value, dt)
    e, d = sk.shape
    scores = _empty((e,), dt, device)
    keep = _empty((e,), torch.bool, device)
    weights = _empty((e,), dt, device)
    if e:
        C = _kernels()
        skr = _rows(sk, sk.dtype)
        tgt = tg.to(dt).contiguous()
        n_drop = drop_count(value, e) if rule != "threshold" else 0
        flag = torch.empty(1, dtype=torch.int64, device=device)
        C.cuda_score_and_select(
            _NAMES[skr.dtype], _ptr(skr), _ld(skr), _ptr(tgt), e, d, rule, value, n_drop, _ptr(scores),
            _ptr(keep), _ptr(weights), _ptr(flag), _stream(device), _index(device),
        )  # fmt: skip
    return scores, keep, weights
