"""pytest plugin (tools/cuda_emu/run.sh): run tests/influence/ops/test_cuda.py's GPU tests on CPU tensors, with
ippo.influence.ops.cuda calling the emulated build of csrc/cuda/*.cu (``ippo_emu``) instead of ``ippo._C``."""

import importlib
import os

import ippo_emu

B = importlib.import_module("ippo.influence.backends")
from ippo.influence import ops
from ippo.influence.ops import cuda as cuda_ops

_orig_probe = B._probe


def _probe(name):
    if name == "cuda":
        return B.BackendInfo(True, "EMULATED on the CPU")
    return _orig_probe(name)


B._probe = _probe
cuda_ops._C = ippo_emu
cuda_ops.KERNEL_NAMES = tuple(n for n in cuda_ops.KERNEL_NAMES)
# The emulated kernels run on CPU tensors: the cuda backend accepts them too (EMU_STRICT=1 keeps the
# contract's CUDA-only device check, as on a GPU).
if os.environ.get("EMU_STRICT") != "1":
    cuda_ops.DEVICE_TYPES = ("cuda", "cpu")
ops.get.cache_clear()  # a namespace made before this plugin would hold the old device types
cuda_ops._stream = lambda device: 0
cuda_ops._index = lambda device: 0
cuda_ops._sm_count = lambda index: int(os.environ.get("EMU_SMS", "4"))
ippo_emu.set_order(int(os.environ.get("EMU_ORDER", "0")))


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "DEVICE"):
            mod.DEVICE = "cpu"
