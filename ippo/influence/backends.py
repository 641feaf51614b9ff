"""Which kernel backends exist on this machine, and which one an op should run on.

``torch``  pure-PyTorch reference (``ippo.influence.ops.reference``), always available.
``cpp``    C++ CPU kernels in the compiled extension ``ippo._C``.
``triton`` fused Triton kernels (``ippo.kernels``), for CUDA tensors (or CPU tensors
           under ``TRITON_INTERPRET=1``, which is how CI tests them).
``cuda``   CUDA C++ kernels in ``ippo._C``, for CUDA tensors.

``backend="auto"`` picks cuda -> triton -> torch for CUDA tensors and cpp -> torch for
CPU tensors. ``IPPO_BACKEND=<name>`` in the environment forces one everywhere.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class BackendInfo:
    available: bool
    reason: str  # why it is (not) available, in words

    def __bool__(self) -> bool:
        return self.available


def _load_extension():
    """Import ``ippo._C``; return (module or None, error text)."""
    try:
        return importlib.import_module("ippo._C"), ""
    except ImportError as e:  # not built, or built for another Python
        return None, f"ippo._C is not importable ({e}); run `pip install --no-build-isolation -e .`"


@functools.cache
def _probe(name: str) -> BackendInfo:
    if name == "torch":
        return BackendInfo(True, f"PyTorch {torch.__version__} reference ops")
    if name == "cpp":
        ext, err = _load_extension()
        if ext is None:
            return BackendInfo(False, err)
        return BackendInfo(True, f"ippo._C CPU kernels ({ext.build_info()})")
    if name == "triton":
        try:
            import triton
        except ImportError as e:
            return BackendInfo(False, f"triton is not installed ({e})")
        try:
            importlib.import_module("ippo.kernels")
        except ImportError as e:
            return BackendInfo(False, f"ippo.kernels failed to import ({e})")
        if torch.cuda.is_available():
            return BackendInfo(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
        if os.environ.get("TRITON_INTERPRET") == "1":
            return BackendInfo(True, f"triton {triton.__version__} in interpreter mode (CPU, for tests)")
        return BackendInfo(False, "no CUDA GPU visible to torch (set TRITON_INTERPRET=1 to run on CPU)")
    if name == "cuda":
        if not torch.cuda.is_available():  # the fact that matters first (the extension's own probe of the driver
            # says e.g. "CUDA driver version is insufficient" on a machine that simply has no GPU)
            build = "; torch is a CPU build" if torch.version.cuda is None else ""
            return BackendInfo(False, f"no CUDA GPU (torch.cuda.is_available() is False{build})")
        ext, err = _load_extension()
        if ext is None:
            return BackendInfo(False, err)
        if not ext.cuda_compiled():
            return BackendInfo(False, "ippo._C was built without CUDA (nvcc not found or IPPO_CUDA=0)")
        n, msg = ext.cuda_device_count()
        if n <= 0:
            return BackendInfo(False, f"ippo._C has CUDA kernels but no GPU is usable ({msg})")
        return BackendInfo(True, f"ippo._C CUDA kernels on {n} GPU(s)")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")


def backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is available here and why (not)."""
    return {name: _probe(name) for name in BACKENDS}


def resolve(backend: str, device: torch.device | str) -> str:
    """Turn ``backend`` ("auto" or a name) into the backend an op on ``device`` runs on."""
    forced = os.environ.get("IPPO_BACKEND", "").strip()
    if forced:
        backend = forced
    kind = torch.device(device).type
    if backend == "auto":
        for name in _AUTO_ORDER.get(kind, ("torch",)):
            if _probe(name):
                return name
        return "torch"
    info = _probe(backend)
    if not info:
        raise RuntimeError(f"backend {backend!r} is not available: {info.reason}")
    if backend in ("cuda",) and kind != "cuda":
        raise RuntimeError(f"backend {backend!r} needs CUDA tensors, got tensors on {kind}")
    if backend == "cpp" and kind != "cpu":
        raise RuntimeError(f"backend 'cpp' needs CPU tensors, got tensors on {kind}")
    return backend
