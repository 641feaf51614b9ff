"""``ippo demo``: PPO vs I-PPO vs controls on the bundled arithmetic task (see ``run.py``).

``task.py``: the reward with recorded noise (``ippo.demo:reward``) and the ``eval.response_metrics`` hook
(``ippo.demo:faithfulness_metrics``); ``methods.py``: the arms; ``run.py``: ``ippo demo`` itself;
``report.py``: what it measured; ``stats.py``: standard errors, t-test, ROC AUC.
"""

from .methods import CATEGORIES, METHODS, Method, methods_for  # noqa: F401
from .run import main  # noqa: F401
from .stats import roc_auc  # noqa: F401
from .task import (  # noqa: F401
    NOISE_ENV,
    SALT_ENV,
    add_sampled_acc,
    clean_reward,
    episode_category,
    faithfulness_metrics,
    is_flipped,
    reward,
    reward_noise,
)
