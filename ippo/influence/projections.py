"""Deterministic random projections for Kronecker sketches.

A layer's projections depend only on (seed, layer name, shape): they are drawn on the CPU
from a generator seeded by a stable hash, then moved, so every device and every rank of a
distributed run gets bit-identical matrices without communicating.
"""

from __future__ import annotations

import hashlib

import torch

# Prefixes that wrappers add to module names (DDP, torch.compile); stripped so a wrapped and an
# unwrapped model draw the same projections.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """Module name without the prefixes DDP / torch.compile add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, identical across processes and machines."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian(rows: int, cols: int, *parts: object) -> torch.Tensor:
    """[rows, cols] float64 matrix with i.i.d. N(0, 1/rows) entries, so E[P^T P] = I."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(*parts))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / rows**0.5
