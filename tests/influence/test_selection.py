"""ippo.select_episodes on every available backend, against hand-computed answers."""

from __future__ import annotations

import pytest
import torch

import ippo
from ippo.influence.ops import reference

BACKENDS = [n for n, info in ippo.influence.backends().items() if info and n in ("torch", "cpp")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_keeps_positive_and_reweights(backend):
    scores = torch.tensor([0.5, -1.0, 0.0, 1.5, 2.0], dtype=torch.float64)
    sel = ippo.select_episodes(scores, backend=backend)
    assert sel.keep.tolist() == [True, False, False, True, True]
    assert sel.num_kept == 3 and sel.num_dropped == 2 and sel.kept_fraction == pytest.approx(0.6)
    mean = (0.5 + 1.5 + 2.0) / 3
    assert torch.allclose(sel.weights, torch.tensor([0.5, 0, 0, 1.5, 2.0], dtype=torch.float64) / mean)
    assert sel.mean_kept_score == pytest.approx(mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottom_fraction_ties_break_by_index(backend):
    scores = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0])
    sel = ippo.select_episodes(scores, rule="bottom_fraction", value=0.4, backend=backend)
    assert sel.keep.tolist() == [False, True, False, True, True]  # the two lowest by (score, index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_bottom_fraction_drops_only_negatives(backend):
    scores = torch.tensor([-2.0, 1.0, -0.5, 3.0, 0.5, 2.0])
    sel = ippo.select_episodes(scores, rule="negative_bottom_fraction", value=0.5, backend=backend)
    assert sel.keep.tolist() == [False, True, False, True, True, True]  # 3 lowest, but 0.5 is positive


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_keeps_nothing(backend):
    sel = ippo.select_episodes(-torch.rand(7) - 0.1, backend=backend)
    assert sel.num_kept == 0 and not sel.keep.any() and (sel.weights == 0).all()
    assert sel.mean_kept_score != sel.mean_kept_score  # nan


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_errors(backend):
    sel = ippo.select_episodes(torch.empty(0), backend=backend)
    assert sel.keep.shape == (0,) and sel.num_kept == 0
    with pytest.raises(ValueError, match="NaN"):
        ippo.select_episodes(torch.tensor([1.0, float("nan")]), backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        ippo.select_episodes(torch.tensor([float("inf"), 1.0]), backend=backend)
    with pytest.raises(ValueError, match="unknown rule"):
        ippo.select_episodes(torch.ones(3), rule="top", backend=backend)
    with pytest.raises(ValueError, match="fraction"):
        ippo.select_episodes(torch.ones(3), rule="bottom_fraction", value=1.5, backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        ippo.select_episodes(torch.ones(2, 2), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", ["0.3", None, True, [0.3]])
def test_non_numeric_value_is_a_type_error_naming_value(backend, value):
    with pytest.raises(TypeError, match=r"^value must be a number"):
        ippo.select_episodes(torch.ones(3), value=value, backend=backend)
    with pytest.raises(TypeError, match=r"^value must be a number"):
        ippo.select_episodes(torch.ones(3), rule="bottom_fraction", value=value, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,value", [("threshold", 0.0), ("threshold", 0.3), ("bottom_fraction", 0.29),
                                        ("negative_bottom_fraction", 0.6)])
def test_matches_reference_on_random_scores(backend, rule, value):
    for n in (1, 2, 17, 100):
        scores = torch.randn(n, dtype=torch.float64)
        scores[::3] = scores[0]  # plenty of ties
        keep, weights = reference.select_episodes(scores, rule, value)
        sel = ippo.select_episodes(scores, rule=rule, value=value, backend=backend)
        assert torch.equal(sel.keep, keep)
        assert torch.allclose(sel.weights, weights, rtol=1e-12, atol=0)


def test_drop_count_is_robust_to_float_noise():
    assert reference.drop_count(0.29, 100) == 29
    assert reference.drop_count(0.3, 10) == 3
    assert reference.drop_count(1.0, 5) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_and_select_matches_reference(backend):
    from ippo.influence import ops

    for e, d in ((0, 5), (1, 3), (37, 130)):
        sketches, target = torch.randn(e, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
        if e:
            sketches[::4] = sketches[0].clone()  # ties
        scores, keep, weights = ops.get(backend).score_and_select(sketches, target, "bottom_fraction", 0.3)
        r_scores, r_keep, r_weights = reference.score_and_select(sketches, target, "bottom_fraction", 0.3)
        assert torch.allclose(scores, r_scores, rtol=1e-12) and torch.equal(keep, r_keep)
        assert torch.allclose(weights, r_weights, rtol=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        ops.get(backend).score_and_select(torch.full((2, 3), float("nan")), torch.ones(3))
