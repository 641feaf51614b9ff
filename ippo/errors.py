"""Errors that callers may want to tell apart from plain bad input."""

from __future__ import annotations


class NonFiniteError(ValueError):
    """A loss, gradient or score is NaN/Inf (a diverged model, not a wrong argument).

    A ``ValueError`` like every other bad-value error of the engine; the trainer catches this one to stop
    a run with a one-line reason instead of a traceback.
    """
