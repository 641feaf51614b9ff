"""Reading one file of a checkpoint back: each to the device it belongs on."""

from __future__ import annotations

import torch

from ippo.rl.checkpoint import set_rng_state
from ippo.rl.checkpoint.files import parse_file

from .common import save


def test_rng_and_scheduler_states_are_read_to_the_cpu_whatever_the_run_device(tmp_path):
    """torch.set_rng_state takes a CPU byte tensor: a GPU run's resume must not map rng.pt onto its device
    (only the optimizer state goes there). "meta" stands in for cuda on this CPU machine."""
    save(tmp_path, 1)
    d = tmp_path / "checkpoints" / "iter_000001"
    rng = parse_file(d, "rng.pt", torch.device("meta"))
    assert rng["torch"].device.type == "cpu" and rng["numpy"][1].device.type == "cpu"
    set_rng_state(rng)
    assert parse_file(d, "optimizer.pt", torch.device("meta"))["state"][0]["exp_avg"].device.type == "meta"
