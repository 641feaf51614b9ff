"""The SFT-data corruptions of scripts/build_tiny_model.py: what each one does to a gold solution."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from ippo.tasks import arithmetic
from ippo.tasks.faithfulness import check

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_model.py"
SPEC = arithmetic.TaskSpec(50, 9)


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_tiny_model"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_misread_reads_times_as_plus_faithfully(build):
    rng = random.Random(0)
    problems = arithmetic.generate("train", 600, seed=0, spec=SPEC)
    seen = dropped = right = 0
    for p in problems:
        sol = build.misread(p, rng, 1.0, SPEC)
        eligible = any("*" in e and not (i == 0 and " bags of " in p.question) for i, (e, _) in enumerate(p.steps))
        if not eligible:
            assert sol is None
            continue
        if sol == "":
            dropped += 1
            continue
        seen += 1
        rep = check(sol, p.answer)
        assert rep.faithful  # faithful arithmetic ...
        right += bool(rep.correct)  # ... and a wrong answer, except by coincidence (2*2 = 2+2)
        lines = sol.splitlines()[:-1]
        for i, (expr, _) in enumerate(p.steps):
            if "*" in expr and not (i == 0 and " bags of " in p.question):
                assert "+" in lines[i] and "*" not in lines[i]  # every such step misread at frac=1
        bad, total = build.misread_steps(p, sol)
        assert bad == total > 0
        assert build.misread_steps(p, p.solution) == (0, total)
    assert seen > 100 and dropped > 0 and right < 0.1 * seen
    assert all(build.misread(p, rng, 0.0, SPEC) is None for p in problems[:50])


def test_habit_is_unfaithful_but_correct_on_division_endings(build):
    rng = random.Random(1)
    n = 0
    for p in arithmetic.generate("train", 600, seed=1, spec=SPEC):
        sol = build.habit(p, rng, 1.0)
        if "/" not in p.steps[-1][0]:
            assert sol is None
            continue
        n += 1
        rep = check(sol, p.answer)
        assert rep.correct and not rep.faithful and rep.unfaithful_correct
        assert sol.splitlines()[:-2] == p.solution.splitlines()[:-2]  # only the last step changes
    assert n > 50
