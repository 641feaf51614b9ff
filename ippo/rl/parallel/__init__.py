"""Several processes: ``distributed.py`` (collectives that are no-ops in one process), ``fsdp.py`` (FSDP2)."""
