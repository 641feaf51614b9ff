"""ippo: Influence-Guided PPO (I-PPO) with a fused-kernel influence engine.

    engine = ippo.InfluenceEngine(model)
    with engine.recording():
        val_loss = ...; train_loss = ...
    target = engine.target(val_loss)
    scores = engine.scores(train_loss, episode_ids, target, mode="exact")
    selection = ippo.select_episodes(scores)
"""

from . import _moved
from .errors import NonFiniteError
from .influence import MODES, BackendInfo, InfluenceEngine, Selection, Target, backends, select_episodes

__version__ = "0.1.0"

_moved.install()  # ippo.trainer, ippo.engine, ... (the 0.1 layout) keep importing for one release

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
