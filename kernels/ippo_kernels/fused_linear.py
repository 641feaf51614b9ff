"""Two-source GEMM: ``C1 = A @ B1 (+ bias1)`` and ``C2 = A @ B2 (+ bias2)`` in one pass over A.

This is what lets a Kronecker sketch ride on GEMMs that run anyway (``ippo.influence.fused``):

* forward:  A = X [N, d_in],   B1 = W^T,  B2 = P_in^T   ->  Y = X W^T + b,  a = X P_in^T (+ p)
* dgrad:    A = dY [N, d_out], B1 = W,    B2 = P_out^T  ->  dX = dY W,      b = dY P_out^T

The output columns are tiled as if B = [B1 | B2] were one matrix, but the two operands are read
from their own storage (no concatenated weight copy), so the projections cost only their FLOPs:
2·N·K·N2 on top of the layer's 2·N·K·N1, and no extra read of A from memory beyond what the
column tiling of any GEMM re-reads (A tiles stay hot in L2 across neighbouring column tiles).
Floor, bytes: A once (N·K), B1 and B2 once, C1 and C2 once. Accumulation in fp32 (``ieee`` by
default; ``precision="tf32"`` for the tensor-core rate), C1 stored in its tensor's dtype, C2 fp32.
Measured on GPU: not yet (no GPU lent to this issue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config


@triton.jit
def _tile(a_ptr, b_ptr, offs_m, offs_n, M, K, N, stride_am, stride_ak, stride_bk, stride_bn,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@_config.kernel("two_source_gemm")
@triton.jit
def _two_source_gemm_kernel(
    a_ptr, b1_ptr, b2_ptr, bias1_ptr, bias2_ptr, c1_ptr, c2_ptr,
    M, K, N1, N2,
    stride_am, stride_ak, stride_b1k, stride_b1n, stride_b2k, stride_b2n,
    stride_c1m, stride_c1n, stride_c2m, stride_c2n,
    HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tiles1 = tl.cdiv(N1, BLOCK_N)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    if pid_n < n_tiles1:  # a column tile of C1 = A @ B1
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _tile(a_ptr, b1_ptr, offs_m, offs_n, M, K, N1, stride_am, stride_ak, stride_b1k, stride_b1n,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        if HAS_BIAS1:
            acc += tl.load(bias1_ptr + offs_n, mask=offs_n < N1, other=0.0).to(tl.float32)[None, :]
        ptrs = c1_ptr + offs_m[:, None] * stride_c1m + offs_n[None, :] * stride_c1n
        tl.store(ptrs, acc.to(c1_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N1))
    else:  # a column tile of C2 = A @ B2
        offs_n = (pid_n - n_tiles1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _tile(a_ptr, b2_ptr, offs_m, offs_n, M, K, N2, stride_am, stride_ak, stride_b2k, stride_b2n,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        if HAS_BIAS2:
            acc += tl.load(bias2_ptr + offs_n, mask=offs_n < N2, other=0.0).to(tl.float32)[None, :]
        ptrs = c2_ptr + offs_m[:, None] * stride_c2m + offs_n[None, :] * stride_c2n
        tl.store(ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N2))


def two_source_gemm(
    a: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    bias1: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    *,
    precision: str = "ieee",
    overrides: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: ``(A @ B1 + bias1 in A's dtype, A @ B2 + bias2 in fp32)``. A [M, K], B1 [K, N1], B2 [K, N2]
    (any strides: pass ``W.T`` views, no copies). Inputs are assumed validated."""
    m, k = a.shape
    n1, n2 = b1.shape[1], b2.shape[1]
    c1 = torch.empty(m, n1, dtype=a.dtype, device=a.device)
    c2 = torch.empty(m, n2, dtype=torch.float32, device=a.device)
    if m == 0:
        return c1, c2
    dummy = c2

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n1, meta["BLOCK_N"]) + triton.cdiv(n2, meta["BLOCK_N"]))

    _config.launch(
        "two_source_gemm", _two_source_gemm_kernel, grid,
        a, b1, b2, bias1 if bias1 is not None else dummy, bias2 if bias2 is not None else dummy, c1, c2,
        m, k, n1, n2,
        a.stride(0), a.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1),
        c1.stride(0), c1.stride(1), c2.stride(0), c2.stride(1),
        HAS_BIAS1=bias1 is not None, HAS_BIAS2=bias2 is not None, PRECISION=precision,
        overrides=overrides,
    )  # fmt: skip
    return c1, c2
