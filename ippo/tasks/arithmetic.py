"""The embedded default task: tiny GSM8K-style arithmetic word problems.

Why a synthetic task: the demo must run PPO vs I-PPO in minutes on 2 CPU cores with a
1-5M-parameter character-level model and no downloads, yet keep what makes GSM8K
interesting for influence-guided RL: multi-step reasoning with checkable calculator
annotations (``<<a+b=c>>c``), a ``#### answer`` line, and a reward that only looks at the
answer, so unfaithful-but-correct chains are possible and measurable.

Problems are 2-4 operations (+, -, x, and / only when exact) on small numbers (every
intermediate value stays in 0..``spec.max_value``, added or subtracted operands are at most
``spec.max_operand``). A ``TaskSpec`` sets those ranges; the bundled model records the spec it was
trained on, and the demo writes its data with that spec. The split of a problem is a function of
its canonical question text (a SHA-256 bucket), so the same problem can never be in two splits,
whatever seeds are used to sample them.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from ippo.tasks.faithfulness import numbers_equal, parse_final_answer, parse_number

__all__ = [
    "DEFAULT_SPEC",
    "MAX_VALUE",
    "SPLITS",
    "Problem",
    "TaskSpec",
    "generate",
    "make_problem",
    "prompt",
    "reward",
    "split_of",
]

SPLITS = ("train", "validation", "test")
# Buckets out of 100 for each split: 80 / 10 / 10.
_SPLIT_BUCKETS = {"train": range(80), "validation": range(80, 90), "test": range(90, 100)}
MAX_VALUE = 99  # the largest max_value a spec may use (and the default's)


@dataclass(frozen=True)
class TaskSpec:
    """Number ranges of the generated problems.

    ``max_value`` bounds every intermediate value (0..max_value); ``max_operand`` bounds the
    operand of an addition or subtraction (multiplications and divisions use 2 or 3). Smaller
    ranges mean fewer distinct arithmetic facts, i.e. a task a tiny model can compute reliably.
    """

    max_value: int = MAX_VALUE
    max_operand: int = 12

    def __post_init__(self) -> None:
        if not 20 <= self.max_value <= MAX_VALUE:
            raise ValueError(f"TaskSpec.max_value={self.max_value}: must be in 20..{MAX_VALUE}")
        if not 1 <= self.max_operand <= self.max_value // 2:
            raise ValueError(f"TaskSpec.max_operand={self.max_operand}: must be in 1..max_value // 2")

    def to_dict(self) -> dict[str, int]:
        return {"max_value": self.max_value, "max_operand": self.max_operand}

    @classmethod
    def from_dict(cls, d: dict | None) -> TaskSpec:
        d = dict(d or {})
        unknown = sorted(set(d) - {"max_value", "max_operand"})
        if unknown:
            raise ValueError(f"unknown TaskSpec field(s): {', '.join(unknown)}")
        return cls(**{k: int(v) for k, v in d.items()})


DEFAULT_SPEC = TaskSpec()

_NAMES = [
    ("Tom", "he", "his"),
    ("Ann", "she", "her"),
    ("Sam", "he", "his"),
    ("Mia", "she", "her"),
    ("Ben", "he", "his"),
    ("Eva", "she", "her"),
    ("Leo", "he", "his"),
    ("Zoe", "she", "her"),
]
_ITEMS = ["apples", "pens", "cards", "eggs", "coins", "books", "shells", "stamps"]
# Phrasings per operation; {b} is the operand, {P} the capitalised pronoun.
_PHRASES = {
    "+": ["{P} buys {b} more.", "{P} finds {b} more.", "{P} gets {b} more."],
    "-": ["{P} gives away {b}.", "{P} loses {b}.", "{P} sells {b}."],
    "*": ["{P} ends up with {b} times as many."],
    "/": ["{P} splits them into {b} equal piles and keeps one."],
}
_CONNECT = ["", "Then ", "Later "]


@dataclass(frozen=True)
class Problem:
    """One problem. ``steps`` holds (expression, result) pairs in solution order."""

    id: str
    question: str
    solution: str
    answer: int
    steps: tuple[tuple[str, int], ...]


def words() -> list[str]:
    """Every word the question templates can write (names, items, pronouns, phrase words)."""
    text = " ".join([n for n, _, _ in _NAMES] + [w for _, a, b in _NAMES for w in (a, b, a.capitalize())] + _ITEMS
                    + [ph for phs in _PHRASES.values() for ph in phs] + _CONNECT
                    + ["has bags of How many does have Q A"])
    return sorted({w for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", text))})


def _problem_id(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def split_of(question: str) -> str:
    """The split a question belongs to: a hash bucket of the text, so splits never overlap."""
    bucket = int(hashlib.sha256(("split:" + question).encode("utf-8")).hexdigest(), 16) % 100
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError("unreachable")


def make_problem(rng: random.Random, spec: TaskSpec = DEFAULT_SPEC) -> Problem:
    """Sample one problem (any split) from ``rng``."""
    top, step_max = spec.max_value, spec.max_operand
    name, pron, _ = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    n_ops = rng.randint(2, 4)
    steps: list[tuple[str, int]] = []
    if rng.random() < 0.3:
        # "Tom has 3 bags of 4 apples." -- a multiplication is the first step.
        a = rng.randint(2, 6)
        b = rng.randint(2, min(9, top // a))
        opening = f"{name} has {a} bags of {b} {item}."
        value = a * b
        steps.append((f"{a}*{b}", value))
    else:
        value = rng.randint(2, min(20, top))
        opening = f"{name} has {value} {item}."
    sentences = [opening]
    while len(steps) < n_ops:
        ops = [op for op, ok in (("+", value < top), ("-", value >= 1)) if ok]
        if value * 2 <= top and value > 0:
            ops.append("*")
        if value >= 2 and any(value % k == 0 for k in (2, 3)):
            ops.append("/")
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(1, min(step_max, top - value))
            new = value + b
        elif op == "-":
            b = rng.randint(1, min(step_max, value))
            new = value - b
        elif op == "*":
            b = rng.choice([k for k in (2, 3) if value * k <= top])
            new = value * b
        else:
            b = rng.choice([k for k in (2, 3) if value % k == 0])
            new = value // b
        connect = rng.choice(_CONNECT)
        phrase = rng.choice(_PHRASES[op]).format(b=b, P=pron.capitalize() if not connect else pron)
        sentences.append(connect + phrase)
        steps.append((f"{value}{op}{b}", new))
        value = new
    question = " ".join(sentences) + f" How many {item} does {pron} have?"
    solution = "\n".join(f"<<{e}={r}>>{r}" for e, r in steps) + f"\n#### {value}"
    return Problem(_problem_id(question), question, solution, value, tuple(steps))


def generate(split: str, n: int, seed: int = 0, spec: TaskSpec = DEFAULT_SPEC) -> list[Problem]:
    """``n`` distinct problems of ``split``, the same list for the same (split, n, seed).

    Sampling rejects problems that hash into another split, so the splits stay disjoint
    for any seeds; duplicates within a call are dropped.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError("n must be >= 0")
    # The default spec keeps the historical stream name, so its problems did not change with specs.
    name = f"ippo-arith:{split}:{seed}" if spec == DEFAULT_SPEC else f"ippo-arith:{split}:{seed}:{spec.max_value}:{spec.max_operand}"
    rng = random.Random(name)
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError(f"could not sample {n} distinct {split} problems")
        p = make_problem(rng, spec)
        if p.id in seen or split_of(p.question) != split:
            continue
        seen.add(p.id)
        out.append(p)
    return out


def prompt(problem: Problem | str) -> str:
    """The prompt every component uses for this task (the model answers after ``A:\\n``)."""
    question = problem.question if isinstance(problem, Problem) else problem
    return f"Q: {question}\nA:\n"


def reward(response: str, problem: Problem | int | str) -> float:
    """1.0 iff the response's ``#### answer`` equals the gold answer; anything else is 0.0.

    ``problem`` may be the Problem, its integer answer, or the answer as a string (the
    trainer's generic ``reward(response, gold: str)`` signature).
    """
    if isinstance(problem, Problem):
        gold: Fraction | None = Fraction(problem.answer)
    elif isinstance(problem, str):
        gold = parse_number(problem)
    else:
        gold = Fraction(problem)
    answer = parse_final_answer(response)
    if answer is None or gold is None:
        return 0.0
    return 1.0 if numbers_equal(answer, gold) else 0.0


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_STEP = re.compile(r"<<([^=<>]+)=([^<>]+)>>[^\n]*")


def final_number_reward(response: str, gold: str) -> float:
    """1.0 iff the last number in the response equals the gold answer: the reward for a chat model that
    answers in its own words (``reward.fn=ippo.tasks.arithmetic:final_number_reward``)."""
    numbers = _NUMBER.findall(response.replace(",", ""))
    value, target = (parse_number(numbers[-1]) if numbers else None), parse_number(str(gold))
    return 1.0 if value is not None and target is not None and numbers_equal(value, target) else 0.0


def natural_solution(solution: str) -> str:
    """A gold solution in plain words (``<<13-7=6>>6`` -> ``13 - 7 = 6.``; ``#### 3`` -> ``The answer is 3.``),
    the style an instruction-tuned model writes, for SFT-type use of the gold data with such a model."""
    lines = []
    for line in solution.splitlines():
        step = _STEP.fullmatch(line.strip())
        if step:
            expr = re.sub(r"\s*([+\-*/])\s*", r" \1 ", step.group(1)).strip()
            lines.append(f"{expr} = {step.group(2).strip()}.")
        elif line.startswith("####"):
            lines.append(f"The answer is {line[4:].strip()}.")
        elif line.strip():
            lines.append(line.strip())
    return "\n".join(lines)
