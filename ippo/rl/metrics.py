"""Per-iteration measurements: wall time per phase, and named sums reduced over the ranks in one all-reduce."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from ippo.rl.parallel import distributed as dist


class PhaseTimer:
    """Wall time per phase, summed within an iteration (CUDA synchronised so times are real)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times[name] += time.perf_counter() - t0


class Sums:
    """Float sums by name (a name never added reads 0.0)."""

    def __init__(self, **initial: float) -> None:
        self._values: dict[str, float] = dict(initial)

    def add(self, name: str, value: float) -> None:
        self._values[name] = self._values.get(name, 0.0) + value

    def __getitem__(self, name: str) -> float:
        return self._values.get(name, 0.0)

    def update(self, other: Sums) -> None:
        for name, value in other._values.items():
            self._values[name] = value

    def all_reduce(self, names: list[str], device: torch.device) -> dict[str, float]:
        """``names``' sums over all ranks (float64, one collective; in one process, the sums themselves)."""
        packed = torch.tensor([self[n] for n in names], dtype=torch.float64, device=device)
        dist.all_reduce_sum(packed)
        return dict(zip(names, packed.tolist()))
