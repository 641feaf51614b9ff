"""Helpers shared by the backends that hand raw pointers to ``ippo._C`` (``cpp_ops``, ``cuda_ops``).

The extension never sees a torch tensor: these turn validated tensors into what the launchers
take (pointer, row stride) and hold the argument checks both backends make the same way.
"""

from __future__ import annotations

import torch

from .reference import num_episodes_arg  # noqa: F401  (re-exported for the backends)

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def extension():
    """The compiled ``ippo._C`` (``ippo.influence.backends`` checks availability before a backend module loads)."""
    try:
        from ippo import _C
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            f"ippo._C is not importable ({e}); build it with `pip install --no-build-isolation -e .`"
        ) from e
    return _C


def rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` with a contiguous last dimension and a row stride >= the row length
    (the kernels take any such row stride, so a strided view is passed without a copy)."""
    t = t.to(dtype)
    if t.shape[1] > 1 and t.stride(1) != 1 or t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        t = t.contiguous()
    return t


def ld(t: torch.Tensor) -> int:
    """Row stride in elements (any value >= the row length is fine for the kernels)."""
    return max(t.stride(0), t.shape[1], 1)


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def check_size(actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{what}: expected {expected}, got {actual}")


def check_id_range(ids: torch.Tensor, num_episodes: int) -> None:
    """Episode ids must lie in [-1, num_episodes); names the first offending tokens otherwise."""
    if not ids.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))  # one host sync
    if lo < -1 or hi >= num_episodes:
        bad = ((ids < -1) | (ids >= num_episodes)).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"token_episode ids must be in [-1, {num_episodes}) (num_episodes={num_episodes}); "
            f"got min {lo}, max {hi} (first bad tokens: {bad})"
        )


def check_projected_shapes(d_in: int, d_out: int, p_in, p_out, p_in_bias=None, weight=None) -> int:
    """Shapes of the projected-score arguments against (d_in, d_out) from x and dy; returns q."""
    q = p_in.shape[0]
    check_size(p_in.shape[1], d_in, "p_in.shape[1] (d_in, from x)")
    check_size(p_out.shape[0], q, "p_out.shape[0] (q, from p_in)")
    check_size(p_out.shape[1], d_out, "p_out.shape[1] (d_out, from dy)")
    if p_in_bias is not None:
        check_size(p_in_bias.shape[0], q, "p_in_bias length (q, from p_in)")
    if weight is not None:
        check_size(weight.shape[0], q, "weight length (q, from p_in)")
    return q
