"""Old import paths of the flat 0.1 layout, kept working for one release (removed in 0.3).

``import ippo.trainer`` (or ``from ippo.engine import InfluenceEngine``) still works: it returns the
module's new home, with a ``DeprecationWarning`` that says where it moved. One table, one finder, no
stub files: the package's folders show the design (``ippo/influence``, ``ippo/rl``, ``ippo/demo``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED: dict[str, str] = {
    "ippo.engine": "ippo.influence.engine",
    "ippo.selection": "ippo.influence.selection",
    "ippo.backends": "ippo.influence.backends",
    "ippo.projections": "ippo.influence.projections",
    "ippo.fused": "ippo.influence.fused",
    "ippo.lowrank": "ippo.influence.target",
    "ippo.ops": "ippo.influence.ops",
    "ippo.ops.reference": "ippo.influence.ops.reference",
    "ippo.ops.cpp_ops": "ippo.influence.ops.cpp",
    "ippo.ops.cuda_ops": "ippo.influence.ops.cuda",
    "ippo.ops.triton_ops": "ippo.influence.ops.triton",
    "ippo.trainer": "ippo.rl.loop",
    "ippo.config": "ippo.rl.config",
    "ippo.checkpoint": "ippo.rl.checkpoint",
    "ippo.models": "ippo.rl.models",
    "ippo.data": "ippo.rl.data",
    "ippo.rollout": "ippo.rl.rollout",
    "ippo.vllm_rollout": "ippo.rl.vllm_rollout",
    "ippo.ppo": "ippo.rl.losses",
    "ippo.controls": "ippo.rl.filters",
    "ippo.evaluate": "ippo.rl.evaluate",
    "ippo.metrics_log": "ippo.rl.run_log",
    "ippo.rewards": "ippo.rl.rewards",
    "ippo.distributed": "ippo.rl.parallel.distributed",
    "ippo.fsdp": "ippo.rl.parallel.fsdp",
    "ippo.demo_report": "ippo.demo.report",
    "ippo.stats": "ippo.demo.stats",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites it with the alias's spec: put it back
        return module

    def exec_module(self, module) -> None:  # the target module is already executed
        module.__spec__ = self._spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves an old module name to its new module (the same object, not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old name is removed in ippo 0.3", DeprecationWarning,
                      stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    # first on the path: `ippo.ops.reference` must resolve here, not through the aliased package's __path__
    # (which would load a second copy of the module)
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
