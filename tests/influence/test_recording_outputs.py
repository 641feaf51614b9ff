"""engine.recording() never changes what a module returns (issue 15, item 1).

The engine's forward hooks only tap a module's output (an identity autograd node), so every output and
every loss inside ``recording()`` / ``recording(weighted=True)`` equals the one outside it, bit for bit,
whatever batch sizes come one after another.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ippo import InfluenceEngine, Selection
from tests.models import VOCAB as GPT2_VOCAB
from tests.models import tiny_gpt2

VOCAB, T, D = 11, 4, 8


class EmbeddingMLP(nn.Module):
    """Token + position embeddings, a norm and two linears: the per-token modules weighted_backward weights.
    ``positions`` [1, T] broadcasts the position embedding over the batch (as GPT-2 does); [B, T] does not."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, VOCAB)

    def forward(self, tokens, positions):
        h = self.tok(tokens) + self.pos(positions)
        return self.fc2(torch.tanh(self.fc1(self.norm(h))))


def _loss(logits, tokens):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens.reshape(-1), reduction="sum")


def _inputs(batch_sizes, broadcast, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batch_sizes:
        tokens = torch.randint(0, VOCAB, (b, T), generator=g)
        positions = torch.arange(T)[None] if broadcast else torch.arange(T).expand(b, T)
        out.append((tokens, positions))
    return out


torch.manual_seed(0)
MODEL = EmbeddingMLP()
ENGINE = InfluenceEngine(MODEL)  # one engine for every example: state left by one sequence must not leak


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(batch_sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6),
       weighted=st.booleans(), broadcast=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_recording_never_changes_outputs_or_losses(batch_sizes, weighted, broadcast, seed):
    batches = _inputs(batch_sizes, broadcast, seed)
    outside = [MODEL(tokens, pos) for tokens, pos in batches]
    with ENGINE.recording(weighted=weighted):
        inside = [MODEL(tokens, pos) for tokens, pos in batches]
    for (tokens, _), a, b in zip(batches, outside, inside):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
        assert torch.equal(_loss(a, tokens), _loss(b, tokens))


def _fixed(weights):
    def select(scores):
        keep = weights != 0
        return Selection(keep, weights.to(scores.dtype), int(keep.sum()), int((~keep).sum()), float("nan"))
    return select


@pytest.mark.parametrize("batch_sizes", [[3, 1], [1, 4, 2], [5, 5, 1, 3]])
def test_weighted_backward_after_other_batch_sizes_equals_autograd(batch_sizes):
    """The issue's case: a batch-1 forward after a batch-3 one came back [3, T, V] and its weighted backward
    failed with a shape error. Each recorded forward's weighted gradient equals autograd's of sum_e w_e L_e."""
    model = EmbeddingMLP().double()
    engine = InfluenceEngine(model)
    batches = _inputs(batch_sizes, broadcast=False, seed=1)
    with engine.recording(weighted=True):
        val = model(*batches[0])
        target = engine.target(_loss(val, batches[0][0]))
        losses = [_loss(model(tokens, pos), tokens) for tokens, pos in batches]
    for (tokens, pos), loss in zip(batches, losses):
        b = tokens.shape[0]
        w = torch.linspace(-1.0, 2.0, b, dtype=torch.float64)
        per_row = nn.functional.cross_entropy(model(tokens, pos).reshape(-1, VOCAB), tokens.reshape(-1),
                                              reduction="none").view(b, T).sum(1)
        params = [p for p in model.parameters()]
        ref = torch.autograd.grad((w * per_row).sum(), params)
        for p in params:
            p.grad = None
        engine.weighted_backward(loss, torch.arange(b), target, select=_fixed(w))
        for p, r in zip(params, ref):
            assert torch.allclose(p.grad, r, rtol=1e-10, atol=1e-12)


def test_broadcast_output_names_the_module_and_two_pass_still_works():
    """A module whose output the model broadcasts over the batch (GPT-2's position embedding on [1, T]
    positions) only gets the sum of the rows' gradients: weighted_backward names it instead of guessing."""
    model = tiny_gpt2(torch.float64)
    engine = InfluenceEngine(model)
    tokens = torch.randint(3, GPT2_VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    with engine.recording(weighted=True):
        target = engine.target(model(tokens[:2], labels=tokens[:2]).loss)
        logits = model(tokens).logits  # no position_ids: wpe returns [1, 6, d]
    assert logits.shape == (4, 6, GPT2_VOCAB)
    with pytest.raises(ValueError, match=r"'transformer.wpe'.*broadcasts over the batch of 4 rows.*position_ids"):
        engine.weighted_backward(logits.sum(), torch.arange(4), target)
    with engine.recording():
        per_row = model(tokens).logits.sum((1, 2))
    engine.weighted_backward(per_row, torch.arange(4), target, strategy="two_pass")
    with engine.recording(weighted=True):  # per-row positions: the deferred strategy weights every module
        pos = torch.arange(6).expand(4, 6)
        loss = model(tokens, position_ids=pos).logits.sum()
    engine.weighted_backward(loss, torch.arange(4), target)
