"""Rule rewards: binary correctness of a response against the gold final answer.

``make_reward_fn(name)`` returns ``fn(response, gold) -> float``. Built-ins:

* ``gsm8k``: the answer after the last ``#### `` marker;
* ``boxed``: the last ``\\boxed{...}`` (nested braces handled);
* ``auto``: ``\\boxed{}`` if present, else ``####``;
* ``math_verify``: the ``math-verify`` package when installed (symbolic equivalence);
* ``contains``: the gold number appears anywhere as a whole number (a lenient debugging reward);
* ``module:function``: any importable callable with the same signature.

An answer that cannot be parsed scores 0; a reward function that raises is an error.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from fractions import Fraction

RewardFn = Callable[[str, str], float]

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_answer(s: str | None) -> str | None:
    """Canonical text of an answer: trimmed, no $ / thousands commas / trailing period, 7.0 -> 7."""
    if s is None:
        return None
    s = s.strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    s = s.replace("$", "").replace("\\%", "").replace("%", "").strip()
    s = s.rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators only
        s = s.replace(",", "")
    v = _to_number(s)
    if v is not None:
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return s or None


def _to_number(s: str) -> float | None:
    s = s.strip()
    m = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return float(Fraction(num, den)) if den else None
    m = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", s)
    if m:
        den = int(m.group(2))
        return float(Fraction(int(m.group(1)), den)) if den else None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def extract_gsm8k(text: str) -> str | None:
    """Answer after the last '####' (first number-like token on that line), or None."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    rest = text[idx + 4:].split("\n", 1)[0].strip()  # the answer is on the marker's line
    if not rest:
        return None
    m = _NUM.search(rest.replace("$", ""))
    if m and m.start() <= 1:
        return m.group(0)
    return rest


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5" form
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: unparseable


def extract_auto(text: str) -> str | None:
    b = extract_boxed(text)
    return b if b is not None else extract_gsm8k(text)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "auto": extract_auto,
}


def answers_match(pred: str | None, gold: str | None) -> bool:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    pv, gv = _to_number(p), _to_number(g)
    return pv is not None and gv is not None and abs(pv - gv) <= 1e-6 * max(1.0, abs(gv))


def gold_final_answer(answer_field: str) -> str:
    """The gold final answer from a dataset's answer field (GSM8K '####', boxed, or the whole text)."""
    a = extract_gsm8k(answer_field)
    if a is None:
        a = extract_boxed(answer_field)
    return (a if a is not None else answer_field).strip()


def _rule(extract: Callable[[str], str | None]) -> RewardFn:
    def fn(response: str, gold: str) -> float:
        return 1.0 if answers_match(extract(response), gold) else 0.0
    return fn


def contains_reward(response: str, gold: str) -> float:
    g = normalize_answer(gold)
    if g is None:
        return 0.0
    for m in _NUM.finditer(response):
        if normalize_answer(m.group(0)) == g:
            return 1.0
    return 0.0


def _math_verify_reward() -> RewardFn:
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ValueError("reward.fn=math_verify needs `pip install math-verify`") from e

    def fn(response: str, gold: str) -> float:
        try:
            return 1.0 if verify(parse("$" + gold + "$"), parse(response)) else 0.0
        except Exception:  # noqa: BLE001 -- unparseable -> 0, as for every rule
            return 0.0
    return fn


def load_callable(spec: str) -> Callable:
    """'package.module:function' -> the function (clear error if missing)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import reward module {mod_name!r}: {e}") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"{mod_name!r} has no callable {attr!r}")  # noqa: TRY004 -- a config error
    return fn


def make_reward_fn(name: str) -> RewardFn:
    if name in EXTRACTORS:
        return _rule(EXTRACTORS[name])
    if name == "contains":
        return contains_reward
    if name == "math_verify":
        return _math_verify_reward()
    if ":" in name:
        return load_callable(name)
    raise ValueError(f"unknown reward.fn {name!r}: expected auto | gsm8k | boxed | math_verify | contains "
                     "| module:function")


def extract_for_vote(name: str) -> Callable[[str], str | None]:
    """The answer extractor used for majority voting (the rule's own, or auto for other rewards)."""
    return EXTRACTORS.get(name, extract_auto)
