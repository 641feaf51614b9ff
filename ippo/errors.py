"""Errors that callers may want to tell apart from plain bad input."""

from __future__ import annotations


class NonFiniteError(ValueError):
    """A loss, gradient or score is NaN/Inf (a diverged model, not a wrong argument).

    A ``ValueError`` like every other bad-value error of the engine; the trainer catches this one to stop
    a run with a one-line reason instead of a traceback.
    """


class ConfigError(ValueError):
    """A configuration that cannot be run (unknown key, bad type, bad value), named by its dotted key.

    Defined here rather than in ``ippo.rl.config`` so that the registries the config validates against
    (advantage estimators, episode filters) can raise it without importing the config module.
    """


class RunDirError(ConfigError):
    """A run directory this start may not use as asked: in use by another process, not writable, holding
    checkpoints that resume=false would replace, or a resume whose config changes what the run computes."""
