"""ippo: Influence-Guided PPO (I-PPO) with a fused-kernel influence engine.

    engine = ippo.InfluenceEngine(model)
    with engine.recording():
        val_loss = ...; train_loss = ...
    target = engine.target(val_loss)
    scores = engine.scores(train_loss, episode_ids, target, mode="exact")
    selection = ippo.select_episodes(scores)
"""

from .backends import BackendInfo, backends
from .engine import MODES, InfluenceEngine, Target
from .errors import NonFiniteError
from .selection import Selection, select_episodes

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "BackendInfo",
    "InfluenceEngine",
    "NonFiniteError",
    "Selection",
    "Target",
    "__version__",
    "backends",
    "select_episodes",
]
