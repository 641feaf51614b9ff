"""Marshalling helpers of the backends that hand raw pointers to ``ippo._C`` (``cpp``, ``cuda``).

The extension never sees a torch tensor: these turn tensors that passed the contract (``contract.py``)
into what the launchers take (pointer, row stride, int64 ids, a threshold in the scores' dtype).
"""

from __future__ import annotations

import torch


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


def vec(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A vector in ``dtype``, contiguous (None stays None)."""
    return None if t is None else t.to(dtype).contiguous()


def ids64(t: torch.Tensor) -> torch.Tensor:
    """Episode ids as the kernels read them: contiguous int64."""
    return t.to(torch.int64).contiguous()


def ld(t: torch.Tensor) -> int:
    """Row stride in elements (any value >= the row length is fine for the kernels)."""
    return max(t.stride(0), t.shape[1], 1)


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def threshold(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``: torch evaluates ``scores > value`` in the dtype of the scores."""
    return torch.tensor([value], dtype=torch.float64).to(dtype).item()
