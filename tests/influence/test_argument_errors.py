"""Bad arguments of the public functions get an error that names the argument, the same on every backend
(issue 15, item 5): ``ippo.select_episodes`` and the engine's own arguments (ranks, ``num_episodes``).
The ops' arguments are ``ippo.influence.ops.contract``'s, fed to every backend in
tests/influence/ops/test_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ippo
from ippo import InfluenceEngine
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


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_value_accepts_numbers(backend):
    scores = torch.tensor([0.5, -0.2, 0.9])
    expected = [True, False, True]
    for value in (0.3, 0, np.float32(0.3), np.float64(0.3)):
        assert ippo.select_episodes(scores, value=value, backend=backend).keep.tolist() == expected


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


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_engine_episode_ids(model, backend):
    """[B] or [B, T] ids of any accepted integer dtype (``contract.ID_DTYPES``), in [-1, num_episodes)."""
    engine = InfluenceEngine(model, backend=backend)
    target, tl = _recorded(model, engine)
    with pytest.raises(TypeError, match=r"^episode_ids must be a torch\.Tensor, got list"):
        engine.scores(tl, [0, 1, 2, 3, 4], target, retain_graph=True)
    with pytest.raises(ValueError, match=r"^episode_ids must be an integer tensor \(int8/"):
        engine.scores(tl, torch.ones(5, dtype=torch.bool), target, retain_graph=True)
    with pytest.raises(ValueError, match=r"^episode_ids must lie in \[-1, 3\) .* out of range at tokens \[3, 4\]"):
        engine.sketches(tl, torch.arange(5), num_episodes=3, retain_graph=True)
    want = engine.scores(tl, torch.arange(5), target, retain_graph=True)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        assert torch.equal(engine.scores(tl, torch.arange(5, dtype=dtype), target, retain_graph=True), want)
