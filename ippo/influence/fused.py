"""Fused linear path: a Kronecker sketch that rides on the layer's own GEMMs.

``InfluenceLinear`` replaces an ``nn.Linear`` forward inside ``engine.recording(fused_sketch=True)``:

* forward:  ``[Y | a] = X [W^T | P_in^T]``   -> a = P_in x_t (+ bias column), from the same pass over X
* dgrad:    ``[dX | b] = dY [W | P_out^T]``  -> b = P_out g_t, from the same pass over dY

so the sketch ``S_e = sum_{t in e} b_t a_t^T`` costs its FLOPs (2·N·k·(d_in + d_out)) plus a small
segmented reduction, and no extra read of X or dY. On CUDA the two-source GEMM is the Triton kernel
``ippo.kernels.fused_linear`` (no concatenated weight copy); elsewhere two torch matmuls compute the
same thing (correct, not fused). Weight gradients, when autograd asks for them, are the usual ones.
"""

from __future__ import annotations

import torch

from .backends import resolve
from .ops.reference import acc_dtype


def two_source_gemm(a, b1, b2, bias1=None, bias2=None, backend: str = "auto"):
    """``(A @ B1 + bias1 in A's dtype, A @ B2 + bias2 in the accumulation dtype)``."""
    return _two_source_gemm(resolve(backend, a.device), a, b1, b2, bias1, bias2)


def _two_source_gemm(resolved: str, a, b1, b2, bias1=None, bias2=None):
    """``two_source_gemm`` on a resolved backend name (``InfluenceLinear`` gets its engine's)."""
    if a.dtype != torch.float64 and resolved in ("triton", "cuda"):
        from .ops.triton import K  # ippo.kernels

        return K.two_source_gemm(a, b1, b2, bias1, bias2)
    c1 = a @ b1.to(a.dtype)
    if bias1 is not None:
        c1 = c1 + bias1.to(a.dtype)
    dt = acc_dtype(a.dtype)
    c2 = a.to(dt) @ b2.to(dt)
    if bias2 is not None:
        c2 = c2 + bias2.to(dt)
    return c1, c2


class InfluenceLinear(torch.autograd.Function):
    """``y = x W^T + b`` that also leaves ``record.a = x P_in^T (+ p)`` and, in the engine's backward,
    ``record.b = dY P_out^T`` for the sketch. ``anchor`` ties the node to the engine's backward; ``slot``
    (a ``recording.SinkSlot``) holds the engine's sink while that backward runs; ``backend`` is the
    engine's backend resolved for x's device."""

    @staticmethod
    def forward(ctx, x, weight, bias, p_in, p_in_bias, p_out, anchor, slot, record, backend):
        lead, d_in = x.shape[:-1], x.shape[-1]
        y2, a = _two_source_gemm(backend, x.reshape(-1, d_in), weight.T, p_in.T, bias, p_in_bias)
        record.a = a
        ctx.slot, ctx.record, ctx.backend = slot, record, backend
        ctx.save_for_backward(x, weight, p_out)
        return y2.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, p_out = ctx.saved_tensors
        d_out, d_in = weight.shape
        dy2 = dy.reshape(-1, d_out)
        sink = ctx.slot.sink
        if sink is not None:
            dx2, ctx.record.b = _two_source_gemm(ctx.backend, dy2, weight, p_out.T)
            sink(ctx.record, dy)
            ctx.record.b = None  # consumed: free it with the step
        else:
            dx2 = dy2 @ weight.to(dy2.dtype)
        dx = dx2.view(x.shape) if ctx.needs_input_grad[0] else None
        dw = dy2.T @ x.reshape(-1, d_in).to(dy2.dtype) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None
