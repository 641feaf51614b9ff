"""pytest plugin (tools/cuda_emu/run.sh): run tests/test_cuda_kernels.py's GPU tests on CPU tensors, with
ippo.influence.ops.cuda calling the emulated build of csrc/cuda/*.cu (``ippo_emu``) instead of ``ippo._C``."""

import importlib
import os

import ippo_emu
import torch

B = importlib.import_module("ippo.influence.backends")
from ippo.influence.ops import cuda as cuda_ops

_orig_probe = B._probe


def _probe(name):
    if name == "cuda":
        return B.BackendInfo(True, "EMULATED on the CPU")
    return _orig_probe(name)


B._probe = _probe
cuda_ops._C = ippo_emu
cuda_ops.KERNEL_NAMES = tuple(n for n in cuda_ops.KERNEL_NAMES)
_orig_tensor = cuda_ops._tensor


def _tensor(t, name, ndim):
    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and os.environ.get("EMU_STRICT") != "1":
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
        return t
    return _orig_tensor(t, name, ndim)


cuda_ops._tensor = _tensor
cuda_ops._stream = lambda device: 0
cuda_ops._index = lambda device: 0
cuda_ops._sm_count = lambda index: int(os.environ.get("EMU_SMS", "4"))
ippo_emu.set_order(int(os.environ.get("EMU_ORDER", "0")))


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "DEVICE"):
            mod.DEVICE = "cpu"
