"""Worker of test_fsdp.py, run by torchrun as 2 gloo processes: ``ippo train ARGS`` where, from the second
iteration on, rank 1's policy loss is NaN (rank 0's stays finite).

Under dist.strategy=fsdp a backward is a collective: rank 1 must not skip its NaN backward alone while rank
0 runs its own (the ranks' collectives would no longer pair up). The ranks agree on each micro-batch's
finiteness first, skip together, and the run stops on ppo.max_nonfinite_steps.
"""

from __future__ import annotations

import os
import sys

from ippo import cli
from ippo.rl import advantages, update

real_gae, real_policy_loss, iterations = advantages.gae, update.ppo_policy_loss, []


def counting_gae(*args, **kwargs):  # called once per iteration
    iterations.append(1)
    return real_gae(*args, **kwargs)


def policy_loss_nan_on_rank_1(*args, **kwargs):
    pg_tok, clipped = real_policy_loss(*args, **kwargs)
    if os.environ["RANK"] == "1" and len(iterations) > 1:
        pg_tok = pg_tok * float("nan")
    return pg_tok, clipped


advantages.gae, update.ppo_policy_loss = counting_gae, policy_loss_nan_on_rank_1
sys.exit(cli.main(sys.argv[1:]))
