"""The arms of the demo's comparison: PPO, I-PPO and the controls, each a label and its config overrides."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: a label and the training-config overrides that make it."""

    label: str
    overrides: dict
    color: str
    matches: str | None = None  # a random control: the method (same seed) whose kept counts it copies ("ippo":
    # the demo's I-PPO, whichever timing it runs)
    kind: str = "ppo"  # ppo | influence | control (what the report may say about it)
    linestyle: str = "-"


METHODS: dict[str, Method] = {
    "ppo": Method("PPO", {"influence": {"enabled": False}}, "tab:blue"),
    "ippo": Method("I-PPO before_update", {"influence": {"enabled": True, "timing": "before_update"}}, "tab:red",
                   kind="influence"),
    "ippo_in_update": Method("I-PPO in_update", {"influence": {"enabled": True, "timing": "in_update"}},
                             "tab:green", kind="influence"),
    "random": Method("random filter", {"influence": {"enabled": False},
                                       "control": {"filter": "random", "weights": "matched"}},
                     "tab:purple", matches="ippo", kind="control"),
    "zero_variance": Method("zero-variance filter", {"influence": {"enabled": False},
                                                     "control": {"filter": "zero_variance"}},
                            "tab:olive", kind="control", linestyle="--"),
    "ippo_unweighted": Method("I-PPO unweighted", {"influence": {"enabled": True, "timing": "in_update",
                                                                 "reweight": False}}, "tab:orange",
                              kind="influence", linestyle="--"),
    "random_unweighted": Method("random filter unweighted", {"influence": {"enabled": False},
                                                             "control": {"filter": "random", "weights": "uniform"}},
                                "tab:pink", matches="ippo_unweighted", kind="control", linestyle="--"),
    # I-PPO and the gold data together: I-PPO's selection plus λ x SFT on the same gold solutions
    "ippo_sft": Method("I-PPO + SFT on the gold data", {"influence": {"enabled": True, "timing": "in_update"},
                                                        "control": {"sft_coef": "λ"}},
                       "tab:cyan", kind="influence", linestyle="-."),
    # the gold-data control: PPO + λ x SFT on the gold solutions I-PPO's target uses (λ: demo.sft_coef)
    "ppo_sft": Method("PPO + SFT on the gold data", {"influence": {"enabled": False}, "control": {"sft_coef": "λ"}},
                      "tab:brown", kind="control", linestyle="-."),
    # PODS (Xu et al. 2025): I-PPO's kept count, spent on each prompt's samples of largest reward variance -- a
    # gradient-free selector at I-PPO's budget and weights (control.filter=max_variance)
    "max_variance": Method("max-variance filter (PODS)", {"influence": {"enabled": False},
                                                          "control": {"filter": "max_variance", "weights": "matched"}},
                           "tab:cyan", matches="ippo", kind="control", linestyle=":"),
}
SWEEP_SEP = "@"  # "ppo_sft@0.3": the gold-data control at λ = 0.3 (the λ sweep's arms)
# what ``ippo.demo.task.episode_category`` calls a training episode, in report order
CATEGORIES = ("faithful_correct", "unfaithful_correct", "wrong")


def method(name: str) -> Method:
    """The arm ``name``: one of ``METHODS``, or ``ppo_sft@λ`` (the gold-data control at that λ)."""
    base, _, lam = name.partition(SWEEP_SEP)
    m = METHODS[base]
    if not lam:
        return m
    colors = ("tab:brown", "tab:gray", "tab:cyan", "tab:olive", "tab:pink")
    return Method(f"{m.label}, λ = {lam}", {**m.overrides, "control": {"sft_coef": float(lam)}},
                  colors[int(float(lam) * 1000) % len(colors)], kind=m.kind, linestyle=m.linestyle)


def sft_coef_of(name: str, default: float) -> float | None:
    """λ of a gold-data arm (its own, or the demo's ``sft_coef``); None for any other arm."""
    base, _, lam = name.partition(SWEEP_SEP)
    if METHODS[base].overrides.get("control", {}).get("sft_coef") is None:
        return None
    return float(lam) if lam else float(default)


def influence_method(timing: str) -> str:
    """The demo's I-PPO arm for ``demo.timing`` (what ``matches="ippo"`` refers to): the in_update arm unless the
    demo runs before_update alone (in_update is the default: I-PPO at the lowest cost, benchmarks/README.md)."""
    return "ippo" if timing == "before_update" else "ippo_in_update"


def methods_for(timing: str, controls: bool = True, ablations: bool = False, gold: bool = True) -> list[str]:
    """The methods a demo runs, in report order."""
    out = ["ppo"] + {"before_update": ["ippo"], "in_update": ["ippo_in_update"],
                     "both": ["ippo", "ippo_in_update"]}[timing]
    if controls or ablations:
        out += ["random", "zero_variance"] + (["ppo_sft"] if gold else [])
    if ablations:
        out += ["ippo_unweighted", "random_unweighted", "max_variance"]
    return out
