"""Projected (target-aligned) per-token score: two skinny GEMMs and a fused row reduction.

Math (``ippo.influence.ops.reference.projected_token_scores``)::

    a_t = P_in x_t + p_in_bias        [q]
    b_t = P_out g_t                   [q]      (g_t = dY[t])
    s_t = sum_j w_j b_tj a_tj

Inputs: X [N, d_in], dY [N, d_out], P_in [q, d_in], p_in_bias [q] or None, P_out [q, d_out],
w [q]. Output fp32 [N]. With ``P_out = U^T``, ``P_in = V^T``, ``w = sigma`` from the rank-q
SVD of the validation gradient this is ``<G_e, U diag(sigma) V^T>`` per token.
fp16/bf16/fp32 inputs are upcast to fp32 right after ``tl.load`` (``tl.dot`` with
``input_precision="ieee"`` by default); fp64 inputs go to the torch reference.

Kernel: one program per block of ``BLOCK_T`` tokens. For each rank tile of ``BLOCK_Q``
columns it builds the A tile [BLOCK_T, BLOCK_Q] (``tl.dot`` over ``BLOCK_D`` chunks of
d_in, plus bias) and the B tile (over d_out), then reduces ``sum_j w_j a_tj b_tj`` into a
per-token register accumulator. Neither A nor B touches global memory; each s_t is written
once by one program (deterministic).

Cost:
  * FLOPs: ``2 N q (d_in + d_out) + 3 N q``.
  * Bytes: floor ``N (d_in + d_out) s + q (d_in + d_out) s_p + 4 N`` (X, dY read once).
    The kernel reads X and dY ``ceil(q / BLOCK_Q)`` times (once when q fits one tile, the
    common case q <= 64) and the projections once per token block (L2-resident). The
    unfused reference writes and re-reads A, B and A*B (``12 N q`` bytes more each way).

Measured on GPU: not yet (no GPU lent to this issue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config


@_config.kernel("projected_score")
@triton.jit
def _projected_score_kernel(
    x_ptr, dy_ptr, pin_ptr, bias_ptr, pout_ptr, w_ptr, out_ptr,
    n_tokens, d_in, d_out, q,
    stride_xt, stride_xd, stride_yt, stride_yd,
    stride_pin_q, stride_pin_d, stride_pout_q, stride_pout_d, stride_b, stride_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    offs_t64 = offs_t.to(tl.int64)
    arange_q = tl.arange(0, BLOCK_Q)
    arange_d = tl.arange(0, BLOCK_D)

    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for q0 in range(0, q, BLOCK_Q):
        offs_q = q0 + arange_q
        mask_q = offs_q < q
        a = tl.zeros((BLOCK_T, BLOCK_Q), dtype=tl.float32)
        for d0 in range(0, d_in, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < d_in
            xt = tl.load(
                x_ptr + offs_t64[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            pt = tl.load(
                pin_ptr + offs_q[None, :] * stride_pin_q + offs_d[:, None] * stride_pin_d,
                mask=mask_d[:, None] & mask_q[None, :],
                other=0.0,
            ).to(tl.float32)
            a = tl.dot(xt, pt, a, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_q * stride_b, mask=mask_q, other=0.0).to(tl.float32)
            a += bias[None, :]
        b = tl.zeros((BLOCK_T, BLOCK_Q), dtype=tl.float32)
        for d0 in range(0, d_out, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < d_out
            yt = tl.load(
                dy_ptr + offs_t64[:, None] * stride_yt + offs_d[None, :] * stride_yd,
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            pt = tl.load(
                pout_ptr + offs_q[None, :] * stride_pout_q + offs_d[:, None] * stride_pout_d,
                mask=mask_d[:, None] & mask_q[None, :],
                other=0.0,
            ).to(tl.float32)
            b = tl.dot(yt, pt, b, input_precision=PRECISION)
        w = tl.load(w_ptr + offs_q * stride_w, mask=mask_q, other=0.0).to(tl.float32)
        s += tl.sum(a * b * w[None, :], axis=1)
    tl.store(out_ptr + offs_t64, s, mask=mask_t)


def projected_token_scores(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    weight: torch.Tensor,
    *,
    precision: str = "ieee",
    overrides: dict[str, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher: fp32 ``[N]`` projected scores. Inputs are assumed validated.

    ``precision``: ``tl.dot`` input precision. ``overrides``: block sizes replacing the fixed
    config. ``out``: optional preallocated contiguous fp32 result (every element is overwritten).
    """
    n, d_in = x.shape
    d_out = dy.shape[1]
    q = p_in.shape[0]
    out = _config.check_out(out, (n,), x.device)
    if n == 0:
        return out
    bias = p_in_bias if p_in_bias is not None else out  # dummy pointer when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_T"]),)

    _config.launch(
        "projected_score", _projected_score_kernel, grid,
        x, dy, p_in, bias, p_out, weight, out,
        n, d_in, d_out, q,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        p_in.stride(0), p_in.stride(1), p_out.stride(0), p_out.stride(1),
        bias.stride(0), weight.stride(0),
        HAS_BIAS=p_in_bias is not None, PRECISION=precision,
        overrides=overrides,
    )  # fmt: skip
    return out
