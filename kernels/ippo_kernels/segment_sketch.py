"""Per-episode two-sided Kronecker sketch, fused: ``S_e = sum_{t in e} (P_out g_t)(P_in x_t + b)^T``.

Math (``ippo.influence.ops.reference.segment_sketch``)::

    A = X P_in^T + 1 b^T      [N, k_in]   (never written to global memory)
    B = dY P_out^T            [N, k_out]  (never written to global memory)
    S[e] = B[T_e]^T A[T_e]    [k_out, k_in] for the token set T_e of episode e

Inputs: X [N, d_in], dY [N, d_out], P_in [k_in, d_in], b [k_in] or None, P_out [k_out, d_out],
token_episode [N] (int, ``-1`` = skip), E episodes. Output fp32 [E, k_out, k_in].
fp16/bf16/fp32 inputs are loaded, upcast to fp32 right after ``tl.load`` and computed in fp32
(``tl.dot`` with ``input_precision="ieee"``: no TF32 unless the caller asks for it).
fp64 inputs are not handled here: ``ippo.influence.ops.triton`` sends them to the torch reference.

Algorithm:
  1. Host: stable argsort of the kept tokens by episode id, segment offsets by
     ``bincount`` + ``cumsum`` (tokens of an episode need not be contiguous in X).
  2. Kernel, one program per (episode chunk, k_out tile, k_in tile): walk the chunk's
     sorted token range in ``BLOCK_T`` steps; per step gather the X / dY rows, build the
     A tile [BLOCK_T, BLOCK_KI] and the B tile [BLOCK_T, BLOCK_KO] with ``tl.dot`` over
     ``BLOCK_D`` feature chunks, add the bias, and accumulate ``B^T A`` with ``tl.dot`` in
     registers. Each output tile is written by exactly one program, in a fixed token order:
     no float atomics, bit-for-bit deterministic run to run. Empty episodes write zeros.
  3. Very long episodes with few episodes (GPU occupancy): ``split`` > 1 cuts every episode
     into ``split`` contiguous chunks, each program writes a partial [E, split, k_out, k_in]
     and a fixed-order ``sum(dim=1)`` combines them (still deterministic).

Cost, with M kept tokens, tiles ``n_ko = ceil(k_out/BLOCK_KO)``, ``n_ki = ceil(k_in/BLOCK_KI)``:
  * FLOPs: useful ``2 M (d_in k_in + d_out k_out + k_out k_in)``; the kernel recomputes the
    A tile for each k_out tile and the B tile for each k_in tile, i.e.
    ``2 M (n_ko d_in k_in + n_ki d_out k_out + k_out k_in)`` (= useful when both ranks fit
    one tile, the intended regime k <= 64..128).
  * Bytes: floor ``M (d_in + d_out) s + (k_in d_in + k_out d_out) s + 4 E k_out k_in``
    (s = input element size; X and dY read once, S written once). The kernel reads X
    ``n_ko`` times and dY ``n_ki`` times (the repeats hit L2 when tiles run together), the
    projections once per program (L2-resident), plus 8 bytes per token of sort order.
    The unfused reference additionally writes and re-reads A and B (``4 M (k_in + k_out)``
    bytes each way) and materialises [chunk, k_out, k_in] outer products.

Measured on GPU: not yet (no GPU lent to this issue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config


@_config.kernel("segment_sketch")
@triton.jit
def _segment_sketch_kernel(
    x_ptr, dy_ptr, pin_ptr, bias_ptr, pout_ptr, order_ptr, seg_ptr, out_ptr,
    d_in, d_out, k_in, k_out, split,
    stride_xt, stride_xd, stride_yt, stride_yd,
    stride_pin_k, stride_pin_d, stride_pout_k, stride_pout_d, stride_b,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_KO: tl.constexpr, BLOCK_KI: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)  # = episode * split + chunk
    pid_ko = tl.program_id(1)
    pid_ki = tl.program_id(2)
    e = pid_s // split
    c = pid_s % split
    start = tl.load(seg_ptr + e)
    end = tl.load(seg_ptr + e + 1)
    per = tl.cdiv(tl.cdiv(end - start, split), BLOCK_T) * BLOCK_T  # chunk length, BLOCK_T multiple
    lo = start + c * per
    hi = tl.minimum(end, lo + per)

    offs_ko = pid_ko * BLOCK_KO + tl.arange(0, BLOCK_KO)
    offs_ki = pid_ki * BLOCK_KI + tl.arange(0, BLOCK_KI)
    mask_ko = offs_ko < k_out
    mask_ki = offs_ki < k_in
    arange_t = tl.arange(0, BLOCK_T)
    arange_d = tl.arange(0, BLOCK_D)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_ki * stride_b, mask=mask_ki, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_KO, BLOCK_KI), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        offs_t = t0 + arange_t
        mask_t = offs_t < hi
        rows = tl.load(order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        # A tile = X[rows] @ P_in[ki tile]^T (+ bias)
        a = tl.zeros((BLOCK_T, BLOCK_KI), dtype=tl.float32)
        for d0 in range(0, d_in, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < d_in
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            pt = tl.load(
                pin_ptr + offs_ki[None, :] * stride_pin_k + offs_d[:, None] * stride_pin_d,
                mask=mask_d[:, None] & mask_ki[None, :],
                other=0.0,
            ).to(tl.float32)
            a = tl.dot(xt, pt, a, input_precision=PRECISION)
        if HAS_BIAS:
            a = tl.where(mask_t[:, None], a + bias[None, :], 0.0)
        # B tile = dY[rows] @ P_out[ko tile]^T
        b = tl.zeros((BLOCK_T, BLOCK_KO), dtype=tl.float32)
        for d0 in range(0, d_out, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < d_out
            yt = tl.load(
                dy_ptr + rows[:, None] * stride_yt + offs_d[None, :] * stride_yd,
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            pt = tl.load(
                pout_ptr + offs_ko[None, :] * stride_pout_k + offs_d[:, None] * stride_pout_d,
                mask=mask_d[:, None] & mask_ko[None, :],
                other=0.0,
            ).to(tl.float32)
            b = tl.dot(yt, pt, b, input_precision=PRECISION)
        # S tile += B^T A (masked token rows are zero in both)
        acc = tl.dot(tl.trans(b), a, acc, input_precision=PRECISION)

    out_base = out_ptr + pid_s.to(tl.int64) * k_out * k_in
    tl.store(
        out_base + offs_ko[:, None] * k_in + offs_ki[None, :],
        acc,
        mask=mask_ko[:, None] & mask_ki[None, :],
    )


@_config.kernel("segment_sum")
@triton.jit
def _segment_sum_kernel(
    val_ptr, order_ptr, seg_ptr, out_ptr, stride_v,
    ACC_FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0)
    start = tl.load(seg_ptr + e)
    end = tl.load(seg_ptr + e + 1)
    if ACC_FP64:
        acc = tl.zeros((BLOCK_T,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        rows = tl.load(order_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        v = tl.load(val_ptr + rows * stride_v, mask=mask_t, other=0.0)
        acc += v.to(acc.dtype)
    tl.store(out_ptr + e, tl.sum(acc, axis=0))


def sort_by_episode(token_episode: torch.Tensor, num_episodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group tokens by episode: returns ``(order [M] int64, offsets [E+1] int64)``.

    ``order[offsets[e]:offsets[e+1]]`` are the token indices of episode ``e`` in increasing
    token order (stable sort); tokens with id ``-1`` are dropped. Raises ``ValueError`` for
    ids ``< -1`` or ``>= num_episodes`` (one host sync).
    """
    ids = token_episode.to(torch.int64)
    keep = ids >= 0
    idx = keep.nonzero().squeeze(1)
    kept = ids[idx]
    counts = torch.bincount(kept, minlength=num_episodes)
    if counts.numel() > num_episodes or bool((ids < -1).any()):
        raise ValueError(f"token_episode values must lie in [-1, {num_episodes}), got out-of-range ids")
    order = idx[torch.argsort(kept, stable=True)]
    offsets = torch.zeros(num_episodes + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def _auto_split(num_episodes: int, n_tiles: int, max_len: int, k_out: int, k_in: int) -> int:
    """How many chunks to cut each episode into (GPU occupancy); always 1 off the GPU."""
    if not _config.ON_GPU or max_len <= 512:
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    programs = max(1, num_episodes * n_tiles)
    split = min(-(-2 * sms // programs), max_len // 256, 16)
    # bound the fp32 partial buffer to ~256 MiB
    split = min(split, max(1, (1 << 26) // max(1, num_episodes * k_out * k_in)))
    return max(1, split)


def segment_sketch(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    token_episode: torch.Tensor,
    num_episodes: int,
    *,
    split: int | None = None,
    precision: str = "ieee",
    overrides: dict[str, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher: fp32 ``[E, k_out, k_in]`` sketch. Inputs are assumed validated (see triton_ops).

    ``split``: chunks per episode (None = automatic: 1 off the GPU). ``precision``: the
    ``tl.dot`` input precision ("ieee" exact fp32; "tf32" faster on a GPU, ~1e-3 relative).
    ``overrides``: block sizes replacing the fixed config (tests use them to force tiling).
    ``out``: optional preallocated contiguous fp32 result (every element is overwritten).
    """
    n, d_in = x.shape
    d_out = dy.shape[1]
    k_in, k_out = p_in.shape[0], p_out.shape[0]
    out = _config.check_out(out, (num_episodes, k_out, k_in), x.device)
    if out.numel() == 0:
        return out
    order, offsets = sort_by_episode(token_episode, num_episodes)
    if split is None and not _config.ON_GPU:
        split = 1
    elif split is None:  # one more host sync, GPU only
        n_tiles = triton.cdiv(k_out, 64) * triton.cdiv(k_in, 64)
        max_len = int((offsets[1:] - offsets[:-1]).max().item()) if n else 0
        split = _auto_split(num_episodes, n_tiles, max_len, k_out, k_in)
    split = max(1, int(split))
    dst = (
        out
        if split == 1
        else torch.empty(num_episodes * split, k_out, k_in, dtype=torch.float32, device=x.device)
    )
    bias = p_in_bias if p_in_bias is not None else p_in  # dummy pointer when HAS_BIAS is False

    def grid(meta):
        return (
            num_episodes * split,
            triton.cdiv(k_out, meta["BLOCK_KO"]),
            triton.cdiv(k_in, meta["BLOCK_KI"]),
        )

    _config.launch(
        "segment_sketch", _segment_sketch_kernel, grid,
        x, dy, p_in, bias, p_out, order, offsets, dst,
        d_in, d_out, k_in, k_out, split,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        p_in.stride(0), p_in.stride(1), p_out.stride(0), p_out.stride(1),
        bias.stride(0),
        HAS_BIAS=p_in_bias is not None, PRECISION=precision,
        overrides=overrides,
    )  # fmt: skip
    if split > 1:
        # fixed-order reduction over the chunks of each episode: deterministic
        torch.sum(dst.view(num_episodes, split, k_out, k_in), dim=1, out=out)
    return out


def segment_sum(
    values: torch.Tensor,
    token_episode: torch.Tensor,
    num_episodes: int,
    *,
    overrides: dict[str, int] | None = None,
) -> torch.Tensor:
    """``out[e] = sum_{t in e} values[t]`` (ids ``-1`` skipped), one program per episode.

    Deterministic (sorted segments, fixed order, no atomics). Accumulates in fp32 (fp64 for
    fp64 values) and returns ``values.dtype``. Bytes: ``M (s + 8) + E s``; FLOPs: ``M``.
    Measured on GPU: not yet (no GPU lent to this issue).
    """
    acc_dt = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = torch.empty(num_episodes, dtype=acc_dt, device=values.device)
    if num_episodes == 0:
        return out.to(values.dtype)
    order, offsets = sort_by_episode(token_episode, num_episodes)
    _config.launch(
        "segment_sum", _segment_sum_kernel, lambda meta: (num_episodes,),
        values, order, offsets, out, values.stride(0) if values.numel() else 1,
        ACC_FP64=acc_dt == torch.float64, overrides=overrides,
    )  # fmt: skip
    return out.to(values.dtype)
