"""The demo's task as the trainer sees it: the arithmetic reward with recorded noise, and what an episode is.

``reward`` is the ``reward.fn`` of ``configs/demo.yaml`` (``ippo.demo:reward``): the clean ``#### answer``
reward, flipped for a pseudo-random fraction p of (response, gold) pairs when ``$IPPO_DEMO_REWARD_NOISE``
is p > 0 (``is_flipped``: a hash of a salt, the gold answer and the response, so the flips can be found
again afterwards). ``faithfulness_metrics`` is the ``eval.response_metrics`` hook
(``ippo.demo:faithfulness_metrics``): the clean accuracy and faithfulness rates of the greedy answers.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

NOISE_ENV = "IPPO_DEMO_REWARD_NOISE"  # fraction p of episodes whose reward is flipped
SALT_ENV = "IPPO_DEMO_NOISE_SALT"  # which episodes: a hash of (salt, gold, response) below p


def _gold_value(gold: Any) -> Fraction | None:
    from ippo.tasks.faithfulness import parse_number

    if isinstance(gold, (int, Fraction)):
        return Fraction(gold)
    return parse_number(str(gold))


def clean_reward(response: str, gold: Any) -> float:
    """The task's reward: 1.0 iff the ``#### answer`` equals the gold answer."""
    from ippo.tasks import arithmetic

    value = _gold_value(gold)
    if value is None:
        return 0.0
    return arithmetic.reward(response, value)  # Fraction gold works like an int here


def is_flipped(response: str, gold: Any, p: float, salt: str) -> bool:
    """Deterministic pseudo-random choice of a fraction ``p`` of (response, gold) pairs."""
    if p <= 0:
        return False
    h = hashlib.sha256(f"{salt}\x00{gold}\x00{response}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64 < p


def reward(response: str, gold: Any) -> float:
    """``reward.fn`` of the demo: the clean reward, flipped (1 - r) for the episodes ``is_flipped`` picks
    with p = $IPPO_DEMO_REWARD_NOISE (default 0) and salt $IPPO_DEMO_NOISE_SALT. Note the trainer also
    scores its test evaluation (``greedy_acc``) with this function; the demo reports the clean
    ``test_acc`` of ``faithfulness_metrics`` instead."""
    r = clean_reward(response, gold)
    p = float(os.environ.get(NOISE_ENV) or 0.0)
    if p > 0 and is_flipped(response, gold, p, os.environ.get(SALT_ENV, "")):
        r = 1.0 - r
    return r


@contextmanager
def reward_noise(p: float, salt: str):
    old = {k: os.environ.get(k) for k in (NOISE_ENV, SALT_ENV)}
    os.environ[NOISE_ENV], os.environ[SALT_ENV] = repr(float(p)), salt
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def faithfulness_metrics(responses: list[str], rows: list) -> dict[str, float]:
    """``eval.response_metrics`` hook: clean accuracy and faithfulness rates of the greedy answers.

    ``rows`` are ``ippo.rl.data.Example``s (``.gold``: the final answer). Works for GSM8K runs too.
    """
    from ippo.tasks.faithfulness import check

    n = len(responses)
    if n == 0:
        return {}
    reps = [check(r, row.gold) for r, row in zip(responses, rows)]
    correct = sum(bool(r.correct) for r in reps)
    unfaithful_correct = sum(r.unfaithful_correct for r in reps)
    return {
        "test_acc": correct / n,
        "faithful_rate": sum(r.faithful for r in reps) / n,
        "faithful_correct_rate": (correct - unfaithful_correct) / n,
        "unfaithful_correct_rate": unfaithful_correct / n,
        "unfaithful_share_of_correct": unfaithful_correct / correct if correct else 0.0,
    }


def episode_category(response: str, gold: Any) -> str:
    """faithful_correct | unfaithful_correct | wrong (by the clean answer, whatever the logged reward)."""
    from ippo.tasks.faithfulness import check

    rep = check(response, str(gold))
    if not rep.correct:
        return "wrong"
    return "faithful_correct" if rep.faithful else "unfaithful_correct"


def add_sampled_acc(ev: dict, noise: float) -> dict:
    """``sampled_acc``: eval's ``mean_acc`` (k samples per test problem at eval.temperature, when eval.k > 0),
    which the trainer scores with the (possibly noisy) training reward. Flips are a hash independent of
    correctness, so E[measured] = p + acc (1 - 2p): invert that to report the clean rate."""
    if "mean_acc" in ev:
        ev["sampled_acc"] = (ev["mean_acc"] - noise) / (1 - 2 * noise) if noise > 0 else ev["mean_acc"]
    return ev


def hackable_reward(response: str, gold: Any) -> float:
    """A reward with a known exploit (``ippo demo --hackable-reward``): 1.0 when the gold answer appears anywhere in
    the response as a number, whatever the ``####`` line says -- a policy can collect it by writing many numbers.
    The demo still measures accuracy with the true checker (``faithfulness_metrics``' ``test_acc``)."""
    from ippo.tasks.faithfulness import numbers_equal, parse_number

    value = _gold_value(gold)
    if value is None:
        return 0.0
    for token in response.replace("<<", " ").replace(">>", " ").replace("=", " ").split():
        number = parse_number(token.strip(".,;:"))
        if number is not None and numbers_equal(number, value):
            return 1.0
    return 0.0
