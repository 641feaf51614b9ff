"""Bad arguments get an error that names the argument, the same on every backend (issue 15, item 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ippo
from ippo import InfluenceEngine
from ippo.influence.ops import cuda as cuda_ops
from ippo.influence.ops import reference
from tests.influence.test_engine import make_batch, token_logprobs, val_loss_fn
from tests.models import tiny_llama

SELECT_BACKENDS = [n for n, info in ippo.influence.backends().items() if info and n in ("torch", "cpp")]
ENGINE_BACKENDS = SELECT_BACKENDS


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
@pytest.mark.parametrize("value", ["0.3", None, True, [0.3], torch.tensor(0.3), 1j])
def test_select_value_must_be_a_number(backend, value):
    scores = torch.tensor([0.5, -0.2, 0.9])
    for rule in ("threshold", "bottom_fraction"):
        with pytest.raises(TypeError, match="value must be a number"):
            ippo.select_episodes(scores, rule=rule, value=value, backend=backend)
        with pytest.raises(TypeError, match="value must be a number"):  # the backend's own op checks it too
            ippo.influence.ops.get(backend).select_episodes(scores, rule, value)
    with pytest.raises(TypeError, match="value must be a number"):
        ippo.influence.ops.get(backend).score_and_select(torch.ones(3, 2), torch.ones(2), "threshold", value)


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_value_accepts_numbers(backend):
    scores = torch.tensor([0.5, -0.2, 0.9])
    expected = [True, False, True]
    for value in (0.3, 0, np.float32(0.3), np.float64(0.3)):
        assert ippo.select_episodes(scores, value=value, backend=backend).keep.tolist() == expected


def test_select_value_checks_of_the_cuda_and_triton_glue():
    """The CUDA glue checks ``value`` before it launches anything (so this runs without a GPU); the Triton
    backend has no select op of its own and dispatches to the reference, checked above."""
    with pytest.raises(TypeError, match="value must be a number"):
        cuda_ops._rule_value("threshold", "0.3", torch.float32)
    with pytest.raises(TypeError, match="value must be a number"):
        cuda_ops._rule_value("negative_bottom_fraction", None, torch.float32)
    assert cuda_ops._rule_value("bottom_fraction", 0.25, torch.float32) == ("bottom_fraction", 0.25)
    from ippo.influence.ops import triton as triton_ops

    assert not hasattr(triton_ops, "select_episodes")


@pytest.mark.parametrize("num_episodes", [3.0, 2.5, "3", True])
def test_num_episodes_must_be_an_int_on_every_op(num_episodes):
    values, ids = torch.ones(4), torch.tensor([0, 1, 1, 2])
    with pytest.raises(TypeError, match="num_episodes must be an int"):
        reference.segment_sum(values, ids, num_episodes)
    with pytest.raises(TypeError, match="num_episodes must be an int"):
        reference.segment_outer(torch.ones(4, 2), torch.ones(4, 3), ids, num_episodes)
    if ippo.influence.backends()["cpp"]:
        from ippo.influence.ops import cpp as cpp_ops

        with pytest.raises(TypeError, match="num_episodes must be an int"):
            cpp_ops.segment_sum(values, ids, num_episodes)
        with pytest.raises(TypeError, match="num_episodes must be an int"):
            cpp_ops.segment_sketch(torch.ones(4, 2), torch.ones(4, 3), torch.ones(2, 2), None, torch.ones(2, 3), ids,
                                   num_episodes)
    with pytest.raises(ValueError, match="num_episodes must be >= 0"):
        reference.segment_sum(values, ids, -1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(torch.float64)


def _recorded(model, engine):
    tokens, mask, weights = make_batch()
    with engine.recording():
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    return engine.target(vl), tl


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_engine_names_rank_and_num_episodes(model, backend):
    engine = InfluenceEngine(model, backend=backend)
    target, tl = _recorded(model, engine)
    ids = torch.arange(5)
    with pytest.raises(ValueError, match="rank must be >= 1, got -3"):
        engine.sketches(tl, ids, rank=-3, retain_graph=True)
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        engine.scores(tl, ids, target, mode="target", rank=0, retain_graph=True)
    with pytest.raises(TypeError, match="rank must be an int"):
        engine.scores(tl, ids, target, mode="sketch", rank=2.5, retain_graph=True)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        engine.scores_from_sketches(torch.zeros(5, 3), target, rank=-1)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        engine.target(tl, rank=-2, retain_graph=True)
    with pytest.raises(TypeError, match="num_episodes must be an int, got float"):
        engine.scores(tl, ids, target, num_episodes=5.0, retain_graph=True)
    with pytest.raises(TypeError, match="num_episodes must be an int"):
        engine.sketches(tl, ids, num_episodes="5", retain_graph=True)
    with pytest.raises(TypeError, match="rank must be an int"):
        InfluenceEngine(model, rank="8")
    assert engine.scores(tl, ids, target, num_episodes=6).shape == (6,)  # still fine with an int
