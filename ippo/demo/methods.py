"""The arms of the demo's comparison: PPO, I-PPO and the controls, each a label and its config overrides."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: a label and the training-config overrides that make it."""

    label: str
    overrides: dict
    color: str
    matches: str | None = None  # a random control: the method (same seed) whose kept counts it copies
    kind: str = "ppo"  # ppo | influence | control (what the report may say about it)
    linestyle: str = "-"


METHODS: dict[str, Method] = {
    "ppo": Method("PPO", {"influence": {"enabled": False}}, "tab:blue"),
    "ippo": Method("I-PPO", {"influence": {"enabled": True, "timing": "before_update"}}, "tab:red",
                   kind="influence"),
    "ippo_in_update": Method("I-PPO in_update", {"influence": {"enabled": True, "timing": "in_update"}},
                             "tab:green", kind="influence"),
    "random": Method("random filter", {"influence": {"enabled": False},
                                       "control": {"filter": "random", "weights": "matched"}},
                     "tab:purple", matches="ippo", kind="control"),
    "zero_variance": Method("zero-variance filter", {"influence": {"enabled": False},
                                                     "control": {"filter": "zero_variance"}},
                            "tab:olive", kind="control", linestyle="--"),
    "ippo_unweighted": Method("I-PPO unweighted", {"influence": {"enabled": True, "timing": "before_update",
                                                                 "reweight": False}}, "tab:orange",
                              kind="influence", linestyle="--"),
    "random_unweighted": Method("random filter unweighted", {"influence": {"enabled": False},
                                                             "control": {"filter": "random", "weights": "uniform"}},
                                "tab:pink", matches="ippo_unweighted", kind="control", linestyle="--"),
}
# what ``ippo.demo.task.episode_category`` calls a training episode, in report order
CATEGORIES = ("faithful_correct", "unfaithful_correct", "wrong")


def methods_for(timing: str, controls: bool = True, ablations: bool = False) -> list[str]:
    """The methods a demo runs, in report order."""
    out = ["ppo"] + {"before_update": ["ippo"], "in_update": ["ippo_in_update"],
                     "both": ["ippo", "ippo_in_update"]}[timing]
    if controls or ablations:
        out += (["random"] if "ippo" in out else []) + ["zero_variance"]
    if ablations:
        out += ["ippo_unweighted", "random_unweighted"]
    return out
