"""GSM8K loading, answer extraction, reward and prompts (on the bundled 20-row sample)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

import ippo
from ippo.tasks.faithfulness import check
from ippo.tasks.gsm8k import (
    GSM8KExample,
    GSM8KFormatError,
    extract_answer,
    extract_response_answer,
    load_gsm8k,
    prompt,
    reward,
)

SAMPLE = Path(ippo.__file__).resolve().parent / "assets" / "gsm8k_sample.jsonl"


def test_sample_loads():
    rows = load_gsm8k(SAMPLE)
    assert len(rows) == 20
    assert rows[0].gold == 72 and rows[0].gold_str == "72"
    assert rows[0].source.endswith("gsm8k_sample.jsonl:1")
    assert all(isinstance(r, GSM8KExample) and r.question and "####" in r.answer for r in rows)
    assert len(load_gsm8k(SAMPLE, limit=5)) == 5


def test_sample_gold_mostly_faithful():
    rows = load_gsm8k(SAMPLE)
    strict = sum(check(r.answer, r.gold).faithful for r in rows) / len(rows)
    lenient = sum(check(r.answer, r.gold, allow_plain_final_step=True).faithful for r in rows) / len(rows)
    # Measured on all 8,792 GSM8K train+test rows: strict 93.3%, lenient 95.8%.
    assert strict >= 0.85 and lenient >= strict
    assert all(check(r.answer, r.gold).correct for r in rows)
    assert all(reward(r.answer, r) == 1.0 for r in rows)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_gsm8k(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "q?", "answer": "no marker"}', "####"),
        ('{"question": "q?"}', "'answer'"),
        ('{"question": "", "answer": "#### 1"}', "'question'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"question": "q?", "answer": "#### lots"}', "####"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_line, message):
    f = tmp_path / "bad.jsonl"
    good = '{"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\\n#### 2"}'
    f.write_text(good + "\n\n" + bad_line + "\n")
    with pytest.raises(GSM8KFormatError, match=message) as info:
        load_gsm8k(f)
    assert f"{f}:3" in str(info.value)


def test_extract_answer():
    assert extract_answer("blah\n#### 1,080") == 1080
    assert extract_answer("#### -5") == -5
    assert extract_answer("no answer") is None


@pytest.mark.parametrize(
    ("response", "value"),
    [
        ("so #### 72", 72),
        ("The answer is \\boxed{72}.", 72),
        ("\\boxed{1} then \\boxed{$1,000}", 1000),
        ("\\boxed{\\frac{1}{2}}", Fraction(1, 2)),
        ("\\boxed{18 \\text{ dollars}}", 18),
        ("#### 5 and \\boxed{7}", 5),  # #### wins
        ("\\boxed{72", None),
        ("\\boxed{seventy}", None),
        ("72", None),
        ("", None),
    ],
)
def test_extract_response_answer(response, value):
    assert extract_response_answer(response) == value


def test_reward():
    assert reward("#### 72", "72") == 1.0
    assert reward("\\boxed{0.50}", Fraction(1, 2)) == 1.0
    assert reward("#### 71", 72) == 0.0
    assert reward("#### 72.001", 72) == 0.0
    assert reward("I think 72", 72) == 0.0
    assert reward("#### 72", "not a number") == 0.0


class _ChatTok:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"


class _PlainTok:
    chat_template = None


def test_prompt_formats():
    assert prompt("What is 1+1?") == "Question: What is 1+1?\nAnswer:"
    assert prompt("What is 1+1?", _PlainTok()) == "Question: What is 1+1?\nAnswer:"
    assert prompt("What is 1+1?", _ChatTok()) == "<user>What is 1+1?</user><assistant>"
    row = load_gsm8k(SAMPLE, limit=1)[0]
    assert prompt(row).startswith("Question: Natalia")
