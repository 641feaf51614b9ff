"""Op dispatch: ``ops.get(backend_name)`` returns a namespace with the influence ops.

Each backend module (``reference`` for ``torch``, ``cpp``, ``triton``, ``cuda``) defines any subset of
``OPS`` with the exact signatures of ``ippo.influence.ops.reference`` and states the device types it
runs on (``DEVICE_TYPES``; None: any); an op a backend does not define falls back to the reference.
Every op of the namespace first checks its arguments against ``contract`` (the same checks, exception
types and messages on every backend), then runs the backend's function, which only marshals and
launches. ``ippo.influence.backends.resolve`` chooses the backend (and checks its availability);
``Dispatch`` does that once per device type.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..backends import resolve
from . import contract, reference

OPS = (
    "exact_token_scores",
    "projected_token_scores",
    "segment_sketch",
    "segment_sum",
    "select_episodes",
    "score_and_select",
)


def _checked(op: str, impl: Callable, backend: str, device_types: tuple[str, ...] | None) -> Callable:
    check = getattr(contract, op)

    @functools.wraps(impl)  # __wrapped__ is the backend's own function
    def run(*args, **kwargs):
        return impl(*check(*args, **kwargs, backend=backend, device_types=device_types))

    return run


@functools.cache
def get(backend: str) -> SimpleNamespace:
    """Namespace of the ops for a resolved backend name (see ``ippo.influence.backends.resolve``)."""
    module = reference if backend == "torch" else importlib.import_module(f"ippo.influence.ops.{backend}")
    fns = {op: _checked(op, getattr(module, op, None) or getattr(reference, op), backend, module.DEVICE_TYPES)
           for op in OPS}
    return SimpleNamespace(name=backend, **fns)


class Dispatch:
    """The ops of one backend choice ("auto" or a name) for each device type, resolved on the first call
    for that type (``IPPO_BACKEND`` is read then) and reused after: an engine holds one."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._by_type: dict[str, SimpleNamespace] = {}

    def __call__(self, device: torch.device) -> SimpleNamespace:
        ns = self._by_type.get(device.type)
        if ns is None:
            ns = self._by_type[device.type] = get(resolve(self.backend, device))
        return ns
