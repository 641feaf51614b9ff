"""The arithmetic task: deterministic, disjoint splits, gold solutions that check out."""

from __future__ import annotations

import random

import pytest

from ippo.tasks import arithmetic
from ippo.tasks.arithmetic import MAX_VALUE, SPLITS, generate, make_problem, prompt, reward, split_of
from ippo.tasks.faithfulness import check, evaluate


def test_same_seed_same_problems():
    assert generate("train", 50, seed=3) == generate("train", 50, seed=3)


def test_different_seeds_differ():
    a = {p.id for p in generate("train", 50, seed=1)}
    b = {p.id for p in generate("train", 50, seed=2)}
    assert a != b
    assert len(a & b) < 10


def test_splits_disjoint_and_labelled():
    by_split = {s: generate(s, 300, seed=0) for s in SPLITS}
    ids = {s: {p.id for p in ps} for s, ps in by_split.items()}
    questions = {s: {p.question for p in ps} for s, ps in by_split.items()}
    for i, a in enumerate(SPLITS):
        assert len(ids[a]) == 300  # no duplicates within a split
        for b in SPLITS[i + 1 :]:
            assert not ids[a] & ids[b]
            assert not questions[a] & questions[b]
        assert all(split_of(p.question) == a for p in by_split[a])
    # Different seeds cannot leak a problem across splits either.
    assert not {p.id for p in generate("test", 300, seed=7)} & ids["train"]


def test_split_is_a_function_of_the_question():
    rng = random.Random(0)
    for _ in range(200):
        p = make_problem(rng)
        assert split_of(p.question) == split_of(p.question)
        assert split_of(p.question) in SPLITS


def test_gold_solutions_faithful_and_correct():
    for split in SPLITS:
        for p in generate(split, 200, seed=5):
            rep = check(p.solution, p.answer)
            assert rep.faithful and rep.correct and not rep.unfaithful_correct, (p.solution, rep.parse_errors)
            assert rep.n_steps == len(p.steps)
            assert 2 <= len(p.steps) <= 4
            assert reward(p.solution, p) == 1.0


def test_steps_are_exact_and_small():
    for p in generate("train", 500, seed=11):
        for expr, value in p.steps:
            assert evaluate(expr) == value  # division only when exact
            assert 0 <= value <= MAX_VALUE
        assert p.steps[-1][1] == p.answer
        assert p.solution.splitlines()[-1] == f"#### {p.answer}"


def test_templates_vary():
    ps = generate("train", 300, seed=0)
    ops = {c for p in ps for e, _ in p.steps for c in "+-*/" if c in e}
    assert ops == set("+-*/")
    assert len({p.question.split(" ")[0] for p in ps}) >= 4  # names
    assert len({p.question.split(" ")[-4] for p in ps}) >= 4  # items


def test_prompt_and_reward():
    p = generate("test", 1, seed=0)[0]
    assert prompt(p) == f"Q: {p.question}\nA:\n"
    assert prompt(p.question) == prompt(p)
    assert reward(f"#### {p.answer}", p) == 1.0
    assert reward(f"<<1+1=2>>2\n#### {p.answer + 1}", p) == 0.0
    assert reward("no answer here", p) == 0.0
    assert reward("####", p) == 0.0
    assert reward("#### banana", p) == 0.0
    assert reward(f"#### {p.answer}", p.answer) == 1.0
    assert reward(f"#### {p.answer}", str(p.answer)) == 1.0  # the trainer passes gold as a string
    assert reward(f"#### {p.answer}", "n/a") == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate("dev", 3)
    with pytest.raises(ValueError):
        generate("train", -1)
    assert arithmetic.generate("validation", 0) == []


def test_task_spec_ranges_and_validation():
    spec = arithmetic.TaskSpec(max_value=30, max_operand=5)
    ps = generate("train", 400, seed=2, spec=spec)
    for p in ps:
        rep = check(p.solution, p.answer)
        assert rep.faithful and rep.correct
        for expr, value in p.steps:
            assert 0 <= value <= 30
            op = next(c for c in "+-*/" if c in expr)
            if op in "+-":
                assert int(expr.split(op)[1]) <= 5
    assert generate("train", 50, seed=2) == generate("train", 50, seed=2, spec=arithmetic.DEFAULT_SPEC)
    assert {p.id for p in generate("train", 50, seed=2, spec=spec)} != {p.id for p in generate("train", 50, seed=2)}
    assert arithmetic.TaskSpec.from_dict(spec.to_dict()) == spec
    assert arithmetic.TaskSpec.from_dict(None) == arithmetic.DEFAULT_SPEC
    for bad in ({"max_value": 10}, {"max_value": 200}, {"max_value": 50, "max_operand": 0}, {"colour": 1}):
        with pytest.raises(ValueError):
            arithmetic.TaskSpec.from_dict(bad)
