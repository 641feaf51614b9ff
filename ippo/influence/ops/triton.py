"""Triton backend: the influence ops with the exact signatures of ``ippo.influence.ops.reference``.

Each op launches a fused kernel from ``ippo.kernels`` (the repo's ``kernels/ippo_kernels/`` folder)
on arguments that passed the contract (``ippo.influence.ops.get("triton")`` checks them first: see
``contract.py``). Conventions follow the reference: results come back in ``acc_dtype(x.dtype)``,
i.e. fp32 for fp16/bf16/fp32 inputs. **fp64 inputs fall back to the torch reference** (the kernels
compute in fp32; fp64 is a testing/debug dtype, not a training one), and so do integer or bool
``segment_sum`` values. ``select_episodes`` and ``score_and_select`` are not defined here: the
dispatcher falls back to the reference for them.

Tensors must be CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before the
kernels are imported (how CI runs them): ``DEVICE_TYPES`` says which.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from . import reference


def _import_kernels():
    """``ippo.kernels``; before the package is installed, load the repo's ``kernels/ippo_kernels/`` under that name."""
    try:
        return importlib.import_module("ippo.kernels")
    except ModuleNotFoundError as e:
        if e.name not in ("ippo.kernels",):
            raise
    folder = Path(__file__).resolve().parents[3] / "kernels" / "ippo_kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        raise ImportError(f"ippo.kernels is not installed and {folder} does not exist")
    spec = importlib.util.spec_from_file_location(
        "ippo.kernels", init, submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ippo.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["ippo.kernels"]
        raise
    return module


K = _import_kernels()

# TRITON_INTERPRET is read when the kernels are decorated (at import), so it is read here once too
DEVICE_TYPES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def exact_token_scores(
    x: torch.Tensor, dy: torch.Tensor, g: torch.Tensor, g_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token exact score ``s_t = g_t^T (G x_t + b)`` (see ``reference.exact_token_scores``)."""
    if x.dtype == torch.float64:
        return reference.exact_token_scores(x, dy, g, g_bias)
    return K.exact_token_scores(x, dy, g, g_bias)


def projected_token_scores(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Per-token low-rank score (see ``reference.projected_token_scores``)."""
    if x.dtype == torch.float64:
        return reference.projected_token_scores(x, dy, p_in, p_in_bias, p_out, weight)
    return K.projected_token_scores(x, dy, p_in, p_in_bias, p_out, weight)


def segment_sketch(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    p_out: torch.Tensor,
    token_episode: torch.Tensor,
    num_episodes: int,
) -> torch.Tensor:
    """Per-episode Kronecker sketch ``[E, k_out, k_in]`` (see ``reference.segment_sketch``)."""
    if x.dtype == torch.float64:
        return reference.segment_sketch(x, dy, p_in, p_in_bias, p_out, token_episode, int(num_episodes))
    return K.segment_sketch(x, dy, p_in, p_in_bias, p_out, token_episode, int(num_episodes))


def segment_sum(values: torch.Tensor, token_episode: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """``out[e] = sum_{t in e} values[t]``, deterministic (see ``reference.segment_sum``)."""
    if not values.dtype.is_floating_point:
        return reference.segment_sum(values, token_episode, int(num_episodes))
    return K.segment_sum(values, token_episode, int(num_episodes))
