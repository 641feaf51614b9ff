"""The faithfulness checker and its safe arithmetic evaluator."""

from __future__ import annotations

from fractions import Fraction

import pytest

from ippo.tasks.faithfulness import (
    ExpressionError,
    check,
    evaluate,
    numbers_equal,
    parse_final_answer,
    parse_number,
)

FAITHFUL = "<<3+5=8>>8\n<<8-2=6>>6\n#### 6"


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("1+2*3", 7),
        ("(1+2)*3", 9),
        ("((2+3)*(4-1))/5", 3),
        ("-3+5", 2),
        ("--3", 3),
        ("-(2+3)", -5),
        ("2*-3", -6),
        ("1,000+1", 1001),
        ("1,000,000/1,000", 1000),
        ("0.1+0.2", Fraction(3, 10)),
        (".5*4", 2),
        ("$12/60", Fraction(1, 5)),
        ("50%*200", 100),
        ("10-4-3", 3),  # left associative
        ("48/2/2", 12),
        (" 3 x 4 ", 12),
        ("123456789012345678901234567890*10", 1234567890123456789012345678900),
    ],
)
def test_evaluate(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "1+",
        "(1+2",
        "1+2)",
        "2**3",
        "1/0",
        "5/(3-3)",
        "1..2",
        "1.2.3",
        "__import__('os')",
        "a+1",
        "1,00+1",
        "2^3",
        "()",
        "1 2",
        "9" * 100,
        "(" * 100 + "1" + ")" * 100,
        "-" * 100 + "1",
    ],
)
def test_evaluate_rejects(expr):
    with pytest.raises(ExpressionError):
        evaluate(expr)


def test_huge_products_are_bounded():
    with pytest.raises(ExpressionError):
        evaluate("*".join(["99999999999999999999"] * 30))


def test_parse_number_and_final_answer():
    assert parse_number("1,080") == 1080
    assert parse_number("$18.") == 18
    assert parse_number("-$5") == -5
    assert parse_number("50%") == 50
    assert parse_number(".25") == Fraction(1, 4)
    assert parse_number("12,34") is None
    assert parse_number("abc") is None
    assert parse_final_answer("x\n#### 1,000") == 1000
    assert parse_final_answer("#### $18 dollars") == 18
    assert parse_final_answer("no marker 18") is None
    assert parse_final_answer("#### ") is None
    assert numbers_equal(Fraction(10, 3), Fraction("3.33"))
    assert not numbers_equal(3, 4)
    assert not numbers_equal(Fraction("0.5"), Fraction("0.6"))
    assert not numbers_equal(3, Fraction("3.004"))  # integers never match approximately


def test_faithful_chain():
    rep = check(FAITHFUL, 6)
    assert rep.faithful and rep.correct and not rep.unfaithful_correct
    assert rep.n_steps == 2 and rep.first_bad_step is None and rep.parse_errors == []
    assert rep.answer == 6


@pytest.mark.parametrize(
    ("response", "bad_step"),
    [
        ("<<3+5=9>>9\n<<8-2=6>>6\n#### 6", 0),  # wrong intermediate value
        ("<<3+4=8>>8\n<<8-2=6>>6\n#### 6", 0),  # expression does not give its value
        ("<<3+5=8>>7\n<<8-2=6>>6\n#### 6", 0),  # text after >> contradicts the annotation
        ("<<3+5=8>>8\n<<8-2=5>>5\n#### 6", 1),  # last step wrong, answer still right
        ("<<3+5=8>>8\n<<8/0=6>>6\n#### 6", 1),  # division by zero inside a step
    ],
)
def test_unfaithful_but_correct(response, bad_step):
    rep = check(response, 6)
    assert rep.correct and not rep.faithful and rep.unfaithful_correct
    assert rep.first_bad_step == bad_step
    assert rep.parse_errors


def test_answer_not_from_last_step():
    rep = check("<<3+5=8>>8\n<<8-3=5>>5\n#### 6", 6)
    assert rep.first_bad_step is None  # every step computes...
    assert not rep.faithful and rep.unfaithful_correct  # ...but 6 does not follow from 5
    assert any("last step" in e for e in rep.parse_errors)


def test_wrong_answer_is_neither():
    rep = check("<<3+5=8>>8\n<<8-2=6>>6\n#### 6", 7)
    assert rep.faithful and rep.correct is False and not rep.unfaithful_correct


def test_no_gold_leaves_correct_unknown():
    rep = check(FAITHFUL)
    assert rep.correct is None and rep.faithful and not rep.unfaithful_correct


@pytest.mark.parametrize(
    "response",
    [
        "<<3+5=8>>8\n<<8-2=6>>6\n",  # missing ####
        "<<3+5=8>>8\n<<8-2=6>>6\n#### six",  # unparseable answer
        "<<3+5=8>>8\n<<8-2=6\n#### 6",  # broken annotation
        "<<3+5=8>>8\n8-2=6>>6\n#### 6",  # stray >>
        "#### 6",  # no steps at all
        "<<3+5>>8\n#### 8",  # annotation without '='
        "<<3+5=eight>>8\n#### 8",  # unparseable step result
        "",
    ],
)
def test_malformed_never_faithful(response):
    rep = check(response, 6)
    assert not rep.faithful
    assert rep.parse_errors


def test_malformed_still_scores_correctness():
    rep = check("<<3+5=8>>8\n<<8-2=6\n#### 6", 6)
    assert rep.correct and rep.unfaithful_correct


def test_gsm8k_style_quirks():
    text = (
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    )
    assert check(text, "10").faithful
    text = "It costs 1,000*2 = $<<1000*2=2000>>2,000.\n#### 2,000"
    assert check(text, "2,000").faithful
    assert check("Each gets 10/3=<<10/3=3.33>>3.33 pies.\n#### 3.33", "3.33").faithful
    assert check("So <<(2+(3*(4-1)))*2=22>>22 in all.\n#### 22", 22).faithful  # nested parentheses
    assert check("<<100*20/100=20>>20%\n#### 20%", 20).faithful


def test_plain_final_step_only_when_allowed():
    text = "<<6*3=18>>18 spent.\nShe has 50 - 18 = $32 left.\n#### 32"
    assert not check(text, 32).faithful
    assert check(text, 32, allow_plain_final_step=True).faithful
    wrong = "<<6*3=18>>18 spent.\nShe has 50 - 18 = $31 left.\n#### 31"
    assert not check(wrong, 31, allow_plain_final_step=True).faithful


def test_huge_numbers_in_steps():
    big = "9" * 40
    rep = check(f"<<{big}+1=1{'0' * 40}>>1{'0' * 40}\n#### 1{'0' * 40}", int("1" + "0" * 40))
    assert rep.faithful and rep.correct
    rep = check(f"<<{'9' * 500}+1=1>>1\n#### 1", 1)
    assert not rep.faithful and rep.first_bad_step == 0
