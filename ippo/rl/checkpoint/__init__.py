"""Atomic checkpoints that verify themselves: a run killed at any instant resumes from the last complete
one, and a damaged checkpoint is found before anything is loaded from it.

Layout under ``run_dir/checkpoints``::

    iter_000012/          complete checkpoint (written as iter_000012.tmp-<pid>, then renamed)
        policy.safetensors  value.safetensors  optimizer.pt  scheduler.pt  rng.pt  state.json
        manifest.json     size and sha256 of each file above (written last)
    latest                text file naming the newest checkpoint that verified on disk (replaced atomically)

A run sharded over W > 1 processes (``dist.strategy=fsdp``) writes each rank's part of the weights and
optimizer state instead of the whole-model files (``sharded``)::

    iter_000012/
        policy.shard-RRRRR-of-WWWWW.safetensors  value.shard-...  optimizer.shard-...   one of each per rank
        optimizer.pt  scheduler.pt  rng.pt  state.json  manifest.json                    written by rank 0

Its manifest lists every shard file of every rank and ``world_size``.

Guarantees:

- atomic: every file is written to a temporary name, fsynced and renamed; the directory is renamed into
  place only when all its files are durable, so a checkpoint directory is complete or absent.
- self-verifying: the manifest records the size and sha256 of every file as it was written; the new
  checkpoint is checked against it before ``latest`` moves (and older ones are pruned), and every
  checkpoint is checked before a resume reads anything from it.
- fall-back: a resume loads the newest checkpoint that verifies and loads (``latest``, then older ones),
  reporting each damaged one in one line naming the file; ``CheckpointError`` (one line) when none does.
  Checkpoints written before manifests existed load with a warning.

Modules, each one job (lower ones import only those above them):

- ``layout``: the names of files and directories, and which layout a checkpoint has;
- ``files``: atomic, hashed writes of one file, and reading one file back;
- ``manifest``: manifests, ``verify_checkpoint``, and moving ``latest`` only to a verified checkpoint;
- ``whole``: whole-model checkpoints (``save_checkpoint``) and RNG state;
- ``sharded``: FSDP2-sharded checkpoints (``save_sharded_checkpoint``) and their shard files;
- ``restore``: which checkpoint to resume from, ``restore_checkpoint``, ``ippo eval``'s policy,
  ``ippo verify``.
"""

from .files import (
    CPU,
    CheckpointError,
    Report,
    atomic_write_bytes,
    fsync_path,
    sha256_file,
    warn,
)
from .layout import (
    CORE_FILES,
    FORMAT,
    MANIFEST,
    SHARED_FILES,
    checkpoint_dirs,
    iteration_of,
    layout_of,
    layout_problem,
    shard_file,
)
from .manifest import Verdict, verify_checkpoint
from .restore import (
    latest_checkpoint,
    load_policy_into,
    restore_checkpoint,
    resume_candidates,
    verified_policy_checkpoint,
    verify_run,
)
from .sharded import (
    SHARD_FORMAT,
    module_tensors,
    optimizer_tensors,
    read_full_tensors,
    read_policy_weights,
    read_shard,
    save_sharded_checkpoint,
    write_shard,
)
from .whole import load_tensors_into, rng_state, save_checkpoint, set_rng_state, state_tensors

__all__ = [
    "CORE_FILES",
    "CPU",
    "FORMAT",
    "MANIFEST",
    "SHARD_FORMAT",
    "SHARED_FILES",
    "CheckpointError",
    "Report",
    "Verdict",
    "atomic_write_bytes",
    "checkpoint_dirs",
    "fsync_path",
    "iteration_of",
    "latest_checkpoint",
    "layout_of",
    "layout_problem",
    "load_policy_into",
    "load_tensors_into",
    "module_tensors",
    "optimizer_tensors",
    "read_full_tensors",
    "read_policy_weights",
    "read_shard",
    "restore_checkpoint",
    "resume_candidates",
    "rng_state",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "set_rng_state",
    "sha256_file",
    "shard_file",
    "state_tensors",
    "verified_policy_checkpoint",
    "verify_checkpoint",
    "verify_run",
    "warn",
    "write_shard",
]
