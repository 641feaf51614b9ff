"""``ippo inspect``: why I-PPO kept or dropped an episode, as one self-contained HTML page.

For each iteration of a run's influence log: the kept fraction, the score distribution by reward (and by a
category, with a ``module:function`` hook such as ``ippo.demo:episode_category``), the kept episodes' weights,
and the top proponents, top opponents and a sample of dropped episodes with positive reward. For the iterations
inspected (their theta_old must still exist: ``checkpoint.keep_every``), each shown episode is rebuilt from the
log and scored again offline with per-token contributions, every response token coloured by its share of the
score, and the recomputed scores are checked against the logged ones.

Modules: ``runlog`` (the run's config, log and checkpoints), ``recompute`` (rebuild and score at theta_old),
``colors`` (the diverging scale), ``model`` (what the page shows), ``html`` (the page), ``report`` (all of it).
"""

from .colors import color_scale, contribution_color  # noqa: F401
from .recompute import RTOL, EpisodeAttribution, Recomputed, recompute  # noqa: F401
from .report import Inspected, inspect_run  # noqa: F401
