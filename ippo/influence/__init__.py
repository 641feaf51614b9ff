"""The influence engine: every episode's score against a validation gradient in one backward pass.

``InfluenceEngine`` (``engine.py``) records the hooked layers and runs the activation-only backward;
``Target`` (``target.py``) holds the validation gradient; ``select_episodes`` (``selection.py``) is the
I-PPO filter; ``ops/`` holds each op's torch reference and its cpp / cuda / triton backends behind one
argument contract.
"""

from .backends import BackendInfo, backends
from .engine import MODES, InfluenceEngine
from .selection import Selection, select_episodes
from .target import Target

__all__ = ["MODES", "BackendInfo", "InfluenceEngine", "Selection", "Target", "backends", "select_episodes"]
