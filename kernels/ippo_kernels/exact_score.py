"""Exact per-token target score, one GEMM with a fused epilogue.

Math (``ippo.influence.ops.reference.exact_token_scores``)::

    s_t = sum_o dY[t, o] * ( sum_i G[o, i] X[t, i] + g_bias[o] )      for t in [0, N)

Inputs: X [N, d_in], dY [N, d_out], G [d_out, d_in] (validation gradient of the weight),
g_bias [d_out] or None. Output fp32 [N]. Summed over an episode's tokens this is
``<G_e, G> + <b_e, g_bias>``; the per-episode sum is a separate cheap step
(``segment_sum`` in ``segment_sketch.py``). fp16/bf16/fp32 inputs are upcast to
fp32 right after ``tl.load`` (``tl.dot`` with ``input_precision="ieee"`` by default); fp64
inputs go to the torch reference (``ippo.influence.ops.triton``).

Kernel: one program per (token block of ``BLOCK_T``, d_out split ``c``). It walks the
d_out tiles ``c, c + split, c + 2 split, ...``; for each it accumulates the
[BLOCK_T, BLOCK_O] tile of ``X G^T`` over ``BLOCK_D`` chunks of d_in with ``tl.dot``, then
the epilogue adds the bias, multiplies by the dY tile and reduces over the tile's columns
into a per-token register accumulator. ``X G^T`` is never materialised. With ``split == 1``
(always off the GPU) the program writes ``s`` directly; with ``split > 1`` (GPU, few tokens)
programs write partials [split, N] that a fixed-order ``sum(dim=0)`` combines: every output
element is produced by one program in a fixed order, no atomics, deterministic.

Cost:
  * FLOPs: ``2 N d_in d_out`` (the GEMM) ``+ 3 N d_out`` (epilogue).
  * Bytes: floor ``N (d_in + d_out) s + d_out d_in s_g + 4 N`` (X, dY, G read once, s
    written once). The kernel reads dY once, X ``ceil(d_out / BLOCK_O) / split`` times per
    program (L2 hits), and G once per token block (L2-resident up to ~40 MB, i.e. a
    3k x 3k fp32 G on an H100; beyond that G streams from HBM ``ceil(N / BLOCK_T)`` times,
    like any GEMM with that tiling). The unfused reference writes and re-reads the
    ``4 N d_out``-byte product ``X G^T``.

Measured on GPU: not yet (no GPU lent to this issue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config


@_config.kernel("exact_score")
@triton.jit
def _exact_score_kernel(
    x_ptr, dy_ptr, g_ptr, gb_ptr, out_ptr,
    n_tokens, d_in, d_out, split,
    stride_xt, stride_xd, stride_yt, stride_yd, stride_go, stride_gi, stride_gb,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    offs_t64 = offs_t.to(tl.int64)
    arange_o = tl.arange(0, BLOCK_O)
    arange_d = tl.arange(0, BLOCK_D)

    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for o0 in range(pid_o * BLOCK_O, d_out, split * BLOCK_O):
        offs_o = o0 + arange_o
        mask_o = offs_o < d_out
        z = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for d0 in range(0, d_in, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < d_in
            xt = tl.load(
                x_ptr + offs_t64[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            gt = tl.load(  # G^T tile [BLOCK_D, BLOCK_O]
                g_ptr + offs_o[None, :] * stride_go + offs_d[:, None] * stride_gi,
                mask=mask_d[:, None] & mask_o[None, :],
                other=0.0,
            ).to(tl.float32)
            z = tl.dot(xt, gt, z, input_precision=PRECISION)
        if HAS_BIAS:
            gb = tl.load(gb_ptr + offs_o * stride_gb, mask=mask_o, other=0.0).to(tl.float32)
            z += gb[None, :]
        yt = tl.load(
            dy_ptr + offs_t64[:, None] * stride_yt + offs_o[None, :] * stride_yd,
            mask=mask_t[:, None] & mask_o[None, :],
            other=0.0,
        ).to(tl.float32)
        s += tl.sum(z * yt, axis=1)
    tl.store(out_ptr + pid_o.to(tl.int64) * n_tokens + offs_t64, s, mask=mask_t)


def _auto_split(n_tokens: int, d_out: int) -> int:
    """d_out splits per token block (GPU occupancy when N is small); always 1 off the GPU."""
    if not _config.ON_GPU:
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    blocks = triton.cdiv(n_tokens, 64)
    return max(1, min(triton.cdiv(d_out, 64), triton.cdiv(2 * sms, blocks), 16))


def exact_token_scores(
    x: torch.Tensor,
    dy: torch.Tensor,
    g: torch.Tensor,
    g_bias: torch.Tensor | None = None,
    *,
    split: int | None = None,
    precision: str = "ieee",
    overrides: dict[str, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher: fp32 ``[N]`` per-token exact scores. Inputs are assumed validated.

    ``split``: d_out splits (None = automatic: 1 off the GPU). ``precision``: ``tl.dot``
    input precision. ``overrides``: block sizes replacing the fixed config. ``out``: optional
    preallocated contiguous fp32 result (every element is overwritten).
    """
    n, d_in = x.shape
    d_out = dy.shape[1]
    out = _config.check_out(out, (n,), x.device)
    if n == 0:
        return out
    if split is None:
        split = _auto_split(n, d_out)
    split = max(1, int(split))
    dst = out if split == 1 else torch.empty(split, n, dtype=torch.float32, device=x.device)
    gb = g_bias if g_bias is not None else out  # dummy pointer when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_T"]), split)

    _config.launch(
        "exact_score", _exact_score_kernel, grid,
        x, dy, g, gb, dst,
        n, d_in, d_out, split,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), g.stride(0), g.stride(1), gb.stride(0),
        HAS_BIAS=g_bias is not None, PRECISION=precision,
        overrides=overrides,
    )  # fmt: skip
    if split > 1:
        torch.sum(dst, dim=0, out=out)  # fixed-order combine of the d_out partials
    return out
