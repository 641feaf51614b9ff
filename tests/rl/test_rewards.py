"""Reward parsers on tricky strings: unparseable answers score 0, never crash."""

import pytest

from ippo.rl import rewards as R


@pytest.mark.parametrize("text,expected", [
    ("so 3+4=7\n#### 7", "7"),
    ("#### 1,234", "1,234"),
    ("#### $18.", "18"),
    ("first #### 3 then fixed\n#### -5", "-5"),
    ("#### 0.50", "0.50"),
    ("no marker 42", None),
    ("####", None),
    ("#### \n 9", None),
])
def test_extract_gsm8k(text, expected):
    got = R.extract_gsm8k(text)
    assert (got if got is None else got.rstrip(".").replace("$", "")) == expected


@pytest.mark.parametrize("text,expected", [
    (r"the answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed{{a}+{b}}", "{a}+{b}"),
    (r"\boxed{unbalanced", None),
    ("nothing here", None),
    (r"\fbox{7}", "7"),
])
def test_extract_boxed(text, expected):
    assert R.extract_boxed(text) == expected


@pytest.mark.parametrize("pred,gold,ok", [
    ("1,234", "1234", True),
    ("7.0", "7", True),
    ("$18", "18", True),
    ("18.", "18", True),
    ("0.5", r"\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("1,5", "15", False),  # not a thousands separator
    ("-3", "3", False),
    (None, "3", False),
    ("abc", "3", False),
    ("inf", "inf", True),  # non-numeric text compares as text
])
def test_answers_match(pred, gold, ok):
    assert R.answers_match(pred, gold) is ok


def test_rule_rewards_binary_and_unparseable_zero():
    gsm = R.make_reward_fn("gsm8k")
    assert gsm("3+4=7\n#### 7", "7") == 1.0
    assert gsm("3+4=7\n#### 8", "7") == 0.0
    assert gsm("the answer is 7", "7") == 0.0  # no marker: unparseable
    auto = R.make_reward_fn("auto")
    assert auto(r"\boxed{7} #### 8", "7") == 1.0  # boxed wins
    assert auto("#### 7", "7") == 1.0
    assert R.make_reward_fn("contains")("x7y 12", "12") == 1.0
    assert R.make_reward_fn("contains")("x712", "12") == 0.0  # whole numbers only


def test_gold_final_answer():
    assert R.gold_final_answer("a<<1+1=2>>2\n#### 2") == "2"
    assert R.gold_final_answer(r"so \boxed{5}") == "5"
    assert R.gold_final_answer(" 17 ") == "17"


def test_user_function_by_import_path():
    fn = R.make_reward_fn("tests.rl.test_rewards:_length_reward")
    assert fn("abcd", "x") == 4.0
    with pytest.raises(ValueError, match="cannot import"):
        R.make_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no callable"):
        R.make_reward_fn("tests.rl.test_rewards:missing")
    with pytest.raises(ValueError, match="unknown reward"):
        R.make_reward_fn("nonsense")


def _length_reward(response: str, gold: str) -> float:
    return float(len(response))


def test_math_verify_optional():
    try:
        import math_verify  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="math-verify"):
            R.make_reward_fn("math_verify")
    else:
        assert R.make_reward_fn("math_verify")(r"\boxed{\frac{1}{2}}", "0.5") == 1.0


def test_task_reward_by_import_path_when_present():
    pytest.importorskip("ippo.tasks.gsm8k")
    fn = R.make_reward_fn("ippo.tasks.gsm8k:reward")
    assert fn("so 3*6=18\n#### 18", "18") == 1.0
    assert fn("#### 17", "18") == 0.0
