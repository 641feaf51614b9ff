"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel is decorated (i.e. before ippo.kernels
is imported), so it is set here, first: CI runs every Triton kernel on the CPU this way.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
