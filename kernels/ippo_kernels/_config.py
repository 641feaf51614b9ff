"""Launch-configuration policy for the ``ippo.kernels`` Triton kernels.

Decided once, at import time:

* ``ON_GPU`` is true when torch sees a CUDA GPU **and** Triton is not in interpreter mode
  (``TRITON_INTERPRET=1``). Only then are kernels wrapped in ``triton.autotune`` over the
  ``GPU_CONFIGS`` below (``@triton.autotune`` fails with "0 active drivers" without a GPU).
* Otherwise (CPU, interpreter) every kernel runs with the fixed ``CPU_CONFIGS`` below.

Why the CPU configs look the way they do: the interpreter executes programs one after
another and each ``tl.dot``/``tl.load`` is one numpy call, so its cost is roughly
(number of programs) x (inner-loop steps), almost independent of the tile size. Larger
tiles therefore mean fewer programs and fewer loop steps, i.e. faster tests. Every block
that feeds ``tl.dot`` stays >= 16 (smaller blocks run in the interpreter but fail to
compile on a GPU), so the CPU configs are also valid GPU launches. ``num_warps`` and
``num_stages`` are ignored by the interpreter; the values given are what the GPU path
would use with autotuning switched off.

GPU configs are starting points, not measurements: Measured on GPU: not yet (no GPU lent
to this issue). The autotune keys are the problem dimensions that change the best tile
shape (feature widths and sketch ranks); the token count is left out of the key so that
the variable number of tokens per PPO batch does not retrigger tuning.

Launchers call :func:`launch` which applies this policy; tests may pass ``overrides`` (e.g.
16-wide blocks to force several tiles on small shapes), which bypass autotuning.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = bool(torch.cuda.is_available()) and not INTERPRET

# Fixed configs for the CPU / interpreter path (and for GPU launches with autotuning disabled).
CPU_CONFIGS: dict[str, dict[str, int]] = {
    # tokens per inner step, k_out tile, k_in tile, feature (d_in / d_out) chunk
    "segment_sketch": {"BLOCK_T": 32, "BLOCK_KO": 32, "BLOCK_KI": 32, "BLOCK_D": 64},
    # tokens per program, d_out tile, d_in chunk
    "exact_score": {"BLOCK_T": 32, "BLOCK_O": 64, "BLOCK_D": 64},
    # tokens per program, rank tile, feature chunk
    "projected_score": {"BLOCK_T": 32, "BLOCK_Q": 32, "BLOCK_D": 64},
    # tokens per inner step of the per-episode sum
    "segment_sum": {"BLOCK_T": 256},
    # rows per program, output-column tile, reduction chunk
    "two_source_gemm": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
}

# The launch options that are not tile sizes, for the fixed configs.
CPU_LAUNCH_OPTIONS: dict[str, int] = {"num_warps": 4, "num_stages": 2}


def _cfg(num_warps: int, num_stages: int, **kw: int) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# Autotune search spaces (GPU only). Kept small: each config costs a compile + a benchmark.
GPU_CONFIGS: dict[str, list[triton.Config]] = {
    "segment_sketch": [
        _cfg(4, 3, BLOCK_T=32, BLOCK_KO=64, BLOCK_KI=64, BLOCK_D=64),
        _cfg(8, 3, BLOCK_T=64, BLOCK_KO=64, BLOCK_KI=64, BLOCK_D=64),
        _cfg(8, 3, BLOCK_T=64, BLOCK_KO=128, BLOCK_KI=64, BLOCK_D=32),
        _cfg(4, 4, BLOCK_T=32, BLOCK_KO=32, BLOCK_KI=32, BLOCK_D=128),
        _cfg(8, 2, BLOCK_T=128, BLOCK_KO=64, BLOCK_KI=64, BLOCK_D=32),
    ],
    "exact_score": [
        _cfg(4, 3, BLOCK_T=64, BLOCK_O=64, BLOCK_D=64),
        _cfg(8, 3, BLOCK_T=128, BLOCK_O=64, BLOCK_D=64),
        _cfg(8, 3, BLOCK_T=64, BLOCK_O=128, BLOCK_D=32),
        _cfg(4, 4, BLOCK_T=32, BLOCK_O=128, BLOCK_D=64),
        _cfg(8, 4, BLOCK_T=128, BLOCK_O=128, BLOCK_D=32),
    ],
    "projected_score": [
        _cfg(4, 3, BLOCK_T=64, BLOCK_Q=32, BLOCK_D=64),
        _cfg(4, 3, BLOCK_T=64, BLOCK_Q=64, BLOCK_D=64),
        _cfg(8, 3, BLOCK_T=128, BLOCK_Q=64, BLOCK_D=64),
        _cfg(8, 4, BLOCK_T=128, BLOCK_Q=32, BLOCK_D=128),
    ],
    "segment_sum": [
        _cfg(4, 2, BLOCK_T=256),
        _cfg(8, 2, BLOCK_T=1024),
    ],
    "two_source_gemm": [
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    ],
}

# Which launch arguments each kernel is tuned on.
AUTOTUNE_KEYS: dict[str, list[str]] = {
    "segment_sketch": ["d_in", "d_out", "k_in", "k_out"],
    "exact_score": ["d_in", "d_out"],
    "projected_score": ["d_in", "d_out", "q"],
    "segment_sum": [],
    "two_source_gemm": ["K", "N1", "N2"],
}


def kernel(name: str):
    """Decorator for a ``@triton.jit`` kernel: wrap it in ``triton.autotune`` on a GPU only."""

    def wrap(jitted):
        if ON_GPU:
            return triton.autotune(configs=GPU_CONFIGS[name], key=AUTOTUNE_KEYS[name])(jitted)
        return jitted

    return wrap


def launch(name: str, kern, grid, *args, overrides: dict[str, int] | None = None, **kwargs):
    """Launch ``kern`` under the policy.

    ``grid`` is a callable ``meta -> tuple`` (meta holds the block sizes actually used).
    On a GPU without ``overrides`` the autotuner picks the block sizes; otherwise the fixed
    ``CPU_CONFIGS[name]`` (updated with ``overrides``) are passed explicitly.
    """
    if ON_GPU and not overrides:
        return kern[grid](*args, **kwargs)
    meta = dict(CPU_CONFIGS[name])
    if overrides:
        unknown = set(overrides) - set(meta)
        if unknown:
            raise ValueError(f"unknown launch overrides for {name}: {sorted(unknown)}")
        meta.update(overrides)
    base = kern.fn if isinstance(kern, triton.runtime.Autotuner) else kern
    return base[grid](*args, **kwargs, **meta, **CPU_LAUNCH_OPTIONS)


def block_sizes(name: str, overrides: dict[str, int] | None = None) -> dict[str, int]:
    """The fixed block sizes a non-autotuned launch of ``name`` uses."""
    meta = dict(CPU_CONFIGS[name])
    meta.update(overrides or {})
    return meta


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Validate a caller-provided fp32 output buffer, or allocate one (``torch.empty``)."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if (
        out.dtype != torch.float32
        or tuple(out.shape) != shape
        or out.device != device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous fp32 tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out
