"""A factor target over 2 gloo processes (torchrun): each rank holds only its own validation
tokens' (X, dY); the range finder sums each stage's sketches over the ranks. Every rank must end
with the same basis, equal to one process's over all the tokens, and the same scores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.influence.target_dist_worker import N_VAL, run

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_factor_basis_over_two_processes_equals_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", str(ROOT / "tests" / "influence" / "target_dist_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = run(list(range(N_VAL)), distributed=False)

    assert list(ranks[0]["basis"]) == list(one["basis"])
    for name, entry in one["basis"].items():
        for a, b, ref in zip(ranks[0]["basis"][name], ranks[1]["basis"][name], entry):
            if ref is None:
                assert a is None and b is None
                continue
            assert torch.equal(a, b), name  # every rank holds the same bits
        # against one process: the same basis up to rounding (sign-free: sigma and U S V^T)
        p_in, p_in_bias, p_out, s = ranks[0]["basis"][name]
        r_in, r_in_bias, r_out, r_s = entry
        torch.testing.assert_close(s, r_s, rtol=1e-9, atol=1e-15)
        vh = p_in if p_in_bias is None else torch.cat([p_in, p_in_bias[:, None]], 1)
        r_vh = r_in if r_in_bias is None else torch.cat([r_in, r_in_bias[:, None]], 1)
        torch.testing.assert_close((p_out.T * s) @ vh, (r_out.T * r_s) @ r_vh, rtol=1e-9, atol=1e-13)
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    torch.testing.assert_close(ranks[0]["scores"], one["scores"], rtol=1e-9, atol=1e-13)
    for name, g in one["grads"].items():  # the dense view of a distributed factor target is the sum
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(ranks[1]["grads"][name], g, rtol=1e-10, atol=1e-14)
    for r in ranks:
        assert "different hooked layers on different ranks" in r["mismatch_error"]
