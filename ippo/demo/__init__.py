"""``ippo demo``: PPO vs I-PPO vs controls on the bundled arithmetic task (see ``run.py``)."""

from .run import (  # noqa: F401
    METHODS,
    NOISE_ENV,
    add_sampled_acc,
    clean_reward,
    episode_category,
    faithfulness_metrics,
    is_flipped,
    main,
    reward,
    reward_noise,
)
from .stats import roc_auc  # noqa: F401
