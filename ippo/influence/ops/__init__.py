"""Op dispatch: ``ops.get(backend_name)`` returns a namespace with the influence ops.

Each backend module (``ippo.influence.ops.cpp``, ``ippo.influence.ops.triton``, ``ippo.influence.ops.cuda``) defines any
subset of ``OPS`` with the exact signatures of ``ippo.influence.ops.reference``; an op a backend does
not define falls back to the reference. Backend modules validate their inputs and may
assume ``ippo.influence.backends.resolve`` already checked availability.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

from . import reference

OPS = (
    "exact_token_scores",
    "projected_token_scores",
    "segment_sketch",
    "segment_sum",
    "select_episodes",
    "score_and_select",
)


@functools.cache
def get(backend: str) -> SimpleNamespace:
    """Namespace of the ops for a resolved backend name (see ``ippo.influence.backends.resolve``)."""
    if backend == "torch":
        module = reference
    else:
        module = importlib.import_module(f"ippo.influence.ops.{backend}")
    fns = {op: getattr(module, op, None) or getattr(reference, op) for op in OPS}
    return SimpleNamespace(name=backend, **fns)
