"""Triton backend: the influence ops with the exact signatures of ``ippo.influence.ops.reference``.

Each op validates its inputs (shapes, dtypes, devices) and launches a fused kernel from
``ippo.kernels`` (the repo's ``kernels/ippo_kernels/`` folder). Conventions follow the
reference: results come back in ``acc_dtype(x.dtype)``, i.e. fp32 for fp16/bf16/fp32 inputs.
**fp64 inputs fall back to the torch reference** (the kernels compute in fp32; fp64 is a
testing/debug dtype, not a training one). ``select_episodes`` is not defined here: the
dispatcher falls back to the reference for it.

Tensors must be CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before the
kernels are imported (how CI runs them).
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

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_device(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{op}: all tensors must be on one device; {name} is on {dev}, not {first}")
    if first.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{op}: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        )


def _check_float(op: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...] | None = None):
    if t is None:
        return
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be fp16/bf16/fp32/fp64, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _check_xdy(op: str, x: torch.Tensor, dy: torch.Tensor) -> None:
    if x.dim() != 2 or dy.dim() != 2:
        raise ValueError(f"{op}: x and dy must be 2-D [N, d], got {tuple(x.shape)} and {tuple(dy.shape)}")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(
            f"{op}: x and dy must have the same number of tokens, got {x.shape[0]} and {dy.shape[0]}"
        )
    _check_float(op, "x", x)
    _check_float(op, "dy", dy)


def _check_matrix(op: str, name: str, t: torch.Tensor, cols: int) -> None:
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{op}: {name} must be 2-D [k, {cols}], got {tuple(t.shape)}")
    _check_float(op, name, t)


def _check_ids(op: str, token_episode: torch.Tensor, n: int, num_episodes: int) -> None:
    if token_episode.dim() != 1 or token_episode.shape[0] != n:
        raise ValueError(f"{op}: token_episode must be 1-D [{n}], got {tuple(token_episode.shape)}")
    if token_episode.is_floating_point() or token_episode.is_complex() or token_episode.dtype == torch.bool:
        raise TypeError(f"{op}: token_episode must be an integer tensor, got {token_episode.dtype}")
    reference.num_episodes_arg(num_episodes)


def exact_token_scores(
    x: torch.Tensor, dy: torch.Tensor, g: torch.Tensor, g_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token exact score ``s_t = g_t^T (G x_t + b)`` (see ``reference.exact_token_scores``)."""
    op = "exact_token_scores"
    _check_xdy(op, x, dy)
    _check_float(op, "g", g, (dy.shape[1], x.shape[1]))
    _check_float(op, "g_bias", g_bias, (dy.shape[1],))
    _check_device(op, {"x": x, "dy": dy, "g": g, "g_bias": g_bias})
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
    op = "projected_token_scores"
    _check_xdy(op, x, dy)
    _check_matrix(op, "p_in", p_in, x.shape[1])
    q = p_in.shape[0]
    _check_float(op, "p_out", p_out, (q, dy.shape[1]))
    _check_float(op, "p_in_bias", p_in_bias, (q,))
    _check_float(op, "weight", weight, (q,))
    _check_device(
        op, {"x": x, "dy": dy, "p_in": p_in, "p_in_bias": p_in_bias, "p_out": p_out, "weight": weight}
    )
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
    op = "segment_sketch"
    _check_xdy(op, x, dy)
    _check_matrix(op, "p_in", p_in, x.shape[1])
    _check_matrix(op, "p_out", p_out, dy.shape[1])
    _check_float(op, "p_in_bias", p_in_bias, (p_in.shape[0],))
    _check_ids(op, token_episode, x.shape[0], num_episodes)
    _check_device(
        op, {"x": x, "dy": dy, "p_in": p_in, "p_in_bias": p_in_bias, "p_out": p_out, "ids": token_episode}
    )
    if x.dtype == torch.float64:
        return reference.segment_sketch(x, dy, p_in, p_in_bias, p_out, token_episode, int(num_episodes))
    return K.segment_sketch(x, dy, p_in, p_in_bias, p_out, token_episode, int(num_episodes))


def segment_sum(values: torch.Tensor, token_episode: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """``out[e] = sum_{t in e} values[t]``, deterministic (see ``reference.segment_sum``)."""
    op = "segment_sum"
    if values.dim() != 1:
        raise ValueError(f"{op}: values must be 1-D [N], got {tuple(values.shape)}")
    _check_float(op, "values", values)
    _check_ids(op, token_episode, values.shape[0], num_episodes)
    _check_device(op, {"values": values, "ids": token_episode})
    return K.segment_sum(values, token_episode, int(num_episodes))
