"""Fused Triton kernels of the influence engine (installed as ``ippo.kernels``).

One file per op, Liger-Kernel style: kernel(s), launcher, and a docstring with the math,
FLOP and byte counts.

* :func:`segment_sketch` (``segment_sketch.py``): per-episode two-sided projection and
  outer-product accumulation ``S_e = sum_{t in e} (P_out g_t)(P_in x_t + b)^T``.
* :func:`segment_sum` (``segment_sketch.py``): deterministic per-episode sum.
* :func:`exact_token_scores` (``exact_score.py``): ``s_t = g_t^T (G x_t + b)``, one GEMM with
  a fused epilogue.
* :func:`projected_token_scores` (``projected_score.py``): target-aligned low-rank score.
* :func:`two_source_gemm` (``fused_linear.py``): ``A @ B1`` and ``A @ B2`` in one pass over A, the
  GEMM behind ``ippo.influence.fused.InfluenceLinear`` (the sketch inside the layer's own forward/dgrad).

Launch configuration policy: ``_config.py`` (fixed configs on CPU / interpreter, autotune
only with a CUDA GPU). The launchers assume validated inputs; ``ippo.influence.ops.triton``
validates and dispatches (fp64 goes to the torch reference there).
Set ``TRITON_INTERPRET=1`` before importing this package to run on CPU tensors.
"""

from ._config import ON_GPU
from .exact_score import exact_token_scores
from .fused_linear import two_source_gemm
from .projected_score import projected_token_scores
from .segment_sketch import segment_sketch, segment_sum, sort_by_episode

__all__ = [
    "ON_GPU",
    "exact_token_scores",
    "projected_token_scores",
    "segment_sketch",
    "segment_sum",
    "sort_by_episode",
    "two_source_gemm",
]
