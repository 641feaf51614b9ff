"""GSM8K from a local JSONL file: loading, gold answers, reward and prompts.

Why local only: the machines that run ippo may have no hub access, and a silent partial
load (a truncated file, a row without ``####``) would quietly change what RL optimises.
So every bad row is an error that names the file and line.

Rows carry ``question`` and ``answer``; the answer is a worked solution with
``<<expr=value>>`` calculator annotations ending in ``#### <number>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ippo.tasks.faithfulness import numbers_equal, parse_final_answer, parse_number

__all__ = [
    "GSM8KExample",
    "GSM8KFormatError",
    "extract_answer",
    "extract_response_answer",
    "load_gsm8k",
    "prompt",
    "reward",
]


class GSM8KFormatError(ValueError):
    """A row of a GSM8K file is not usable; the message names the file and line."""


@dataclass(frozen=True)
class GSM8KExample:
    """One row. ``gold`` is the number after ``####`` (commas, ``$`` removed)."""

    question: str
    answer: str  # the full worked solution, as in the file
    gold: Fraction
    source: str  # "path:line", for error messages and logs

    @property
    def gold_str(self) -> str:
        """The gold answer as a plain number string ("72", "0.5")."""
        g = self.gold
        return str(g.numerator) if g.denominator == 1 else f"{float(g):g}"


def extract_answer(solution: str) -> Fraction | None:
    """The gold number after ``####`` in a GSM8K solution, or None when absent/unparseable."""
    return parse_final_answer(solution)


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[GSM8KExample]:
    """Load GSM8K rows from a JSONL file; raise clear errors for a missing file or bad row."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {p} (expected JSONL with 'question' and 'answer')")
    out: list[GSM8KExample] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise GSM8KFormatError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise GSM8KFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("question", "answer"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise GSM8KFormatError(f"{where}: missing or empty string field {key!r}")
            gold = extract_answer(row["answer"])
            if gold is None:
                raise GSM8KFormatError(f"{where}: answer has no parseable '#### <number>' line")
            out.append(GSM8KExample(row["question"], row["answer"], gold, where))
    return out


_BOXED = "\\boxed{"


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced (``\\boxed{\\frac{1}{2}}``)."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i = start + len(_BOXED)
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _boxed_number(body: str) -> Fraction | None:
    body = body.strip().replace("\\$", "").replace("\\%", "").replace("\\,", "").replace("{,}", ",")
    body = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", "", body).strip()
    frac = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", body)
    if frac:
        if int(frac.group(3)) == 0:
            return None
        value = Fraction(int(frac.group(2)), int(frac.group(3)))
        return -value if frac.group(1) else value
    return parse_number(body)


def extract_response_answer(response: str) -> Fraction | None:
    """A model response's final answer: ``#### x`` first, else the last ``\\boxed{x}``."""
    value = parse_final_answer(response)
    if value is not None:
        return value
    boxed = _last_boxed(response)
    return _boxed_number(boxed) if boxed is not None else None


def reward(response: str, gold: GSM8KExample | Fraction | float | str) -> float:
    """1.0 iff the response's answer (``#### x`` or ``\\boxed{x}``) equals gold; else 0.0."""
    if isinstance(gold, GSM8KExample):
        gold_value: Fraction | None = gold.gold
    elif isinstance(gold, str):
        gold_value = parse_number(gold)
    else:
        gold_value = Fraction(gold)
    answer = extract_response_answer(response)
    if answer is None or gold_value is None:
        return 0.0
    return 1.0 if numbers_equal(answer, gold_value) else 0.0


def prompt(question: str | GSM8KExample, tokenizer: Any = None) -> str:
    """The model's prompt: its chat template when it has one, else ``Question: ...\\nAnswer:``.

    Instruction-tuned models answer far better inside their own template; base and tiny
    models have none, and the plain format matches GSM8K few-shot conventions.
    """
    q = question.question if isinstance(question, GSM8KExample) else question
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {q}\nAnswer:"
