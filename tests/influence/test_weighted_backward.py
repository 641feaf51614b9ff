"""engine.weighted_backward: one backward that scores, selects and leaves the weighted gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ippo
from ippo import InfluenceEngine, Selection
from tests.influence.test_engine import make_batch, val_loss_fn
from tests.influence.test_engine import token_logprobs as _token_logprobs
from tests.models import tiny_gpt2, tiny_llama


def token_logprobs(model, tokens, **kw):
    """Log-probs with per-row position ids ([B, T], the default positions): weighted_backward needs every
    per-token module to see the batch's rows, and GPT-2 otherwise broadcasts a [1, T] position embedding."""
    B, T = tokens.shape
    return _token_logprobs(model, tokens, position_ids=torch.arange(T).expand(B, T), **kw)


def fixed_selection(weights: torch.Tensor):
    """A `select` callable that ignores the scores and applies given episode weights."""
    def select(scores):
        keep = weights != 0
        return Selection(keep, weights.to(scores.dtype), int(keep.sum()), int((~keep).sum()), float("nan"))
    return select


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def reference_grads(model, tokens, mask, tok_weights, ids, episode_weights):
    """autograd's gradient of sum_e w_e L_e for every trainable parameter."""
    row_w = episode_weights[ids]
    loss = (token_logprobs(model, tokens, attention_mask=mask) * tok_weights * row_w[:, None]).sum()
    params = trainable(model)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)}


def run_weighted(model, tokens, mask, tok_weights, ids, **kw):
    engine = InfluenceEngine(model)
    with engine.recording(weighted=True):
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * tok_weights).sum()
    target = engine.target(vl)
    for p in model.parameters():
        p.grad = None
    return engine.weighted_backward(tl, ids, target, **kw)


def assert_grads_match(model, ref, tol=1e-10):
    for n, p in trainable(model):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        denom = ref[n].norm().clamp_min(1e-300)
        assert float((g - ref[n]).norm() / denom) <= tol or float(ref[n].norm()) == 0 and float(g.norm()) == 0, n


def lora_llama():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(torch.float64),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    return model


def tied_llama():
    model = tiny_llama(torch.float64)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: both uses must be weighted
    return model


def padded_llama():
    model = tiny_llama(torch.float64)
    model.model.embed_tokens.padding_idx = 3  # its row gets no gradient (make_batch's tokens include 3)
    return model


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2, lora_llama, tied_llama, padded_llama],
                         ids=["llama", "gpt2", "lora", "tied-llama", "padding-idx"])
def test_deferred_gradients_equal_autograd(make_model):
    model = make_model()
    tokens, mask, tok_weights = make_batch(B=6)
    if make_model is padded_llama:
        tokens[:, ::3] = 3
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    episode_weights = torch.tensor([1.7, 0.0, -0.3, 0.0, 2.5], dtype=torch.float64)  # zeros included
    ref = reference_grads(model, tokens, mask, tok_weights, ids, episode_weights)
    run_weighted(model, tokens, mask, tok_weights, ids, select=fixed_selection(episode_weights))
    assert any(float(g.norm()) > 0 for g in ref.values())
    assert_grads_match(model, ref)


def test_keep_mask_without_reweighting_and_grad_accumulation():
    model = tiny_llama(torch.float64)
    tokens, mask, tok_weights = make_batch()
    ids = torch.arange(5)
    w = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    ref = reference_grads(model, tokens, mask, tok_weights, ids, (w != 0).double())
    engine = InfluenceEngine(model)
    with engine.recording(weighted=True):
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * tok_weights).sum()
    target = engine.target(vl)
    prior = {n: torch.randn_like(p) for n, p in trainable(model)}
    for n, p in trainable(model):
        p.grad = prior[n].clone()
    engine.weighted_backward(tl, ids, target, reweight=False, select=fixed_selection(w))
    for n, p in trainable(model):  # .grad accumulates, as after loss.backward()
        assert torch.allclose(p.grad - prior[n], ref[n], rtol=1e-10, atol=1e-13), n


def test_packed_token_ids_weighting():
    model = tiny_llama(torch.float64)
    tokens, mask, tok_weights = make_batch(B=2, T=10)
    mask = torch.ones_like(mask)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, -1, -1, -1]])
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    attn = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    tok_weights = tok_weights * (seg[:, 1:] == seg[:, :-1]) * (seg[:, 1:] >= 0)
    w = torch.tensor([0.7, 0.0, 1.9], dtype=torch.float64)
    tok_w = torch.where(seg[:, 1:] >= 0, w[seg[:, 1:].clamp(min=0)], 0.0)
    loss = (token_logprobs(model, tokens, attention_mask=attn) * tok_weights * tok_w).sum()
    params = trainable(model)
    ref = dict(zip([n for n, _ in params], torch.autograd.grad(loss, [p for _, p in params])))
    engine = InfluenceEngine(model)
    with engine.recording(weighted=True):
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=attn) * tok_weights).sum()
    engine.weighted_backward(tl, seg, engine.target(vl), select=fixed_selection(w))
    assert_grads_match(model, ref)


@pytest.mark.parametrize("mode", ["exact", "target"])
def test_selection_equals_separate_pass_at_theta_old(mode):
    model = tiny_gpt2(torch.float64)
    tokens, mask, tok_weights = make_batch(B=8)
    ids = torch.arange(8)

    def losses(engine, weighted):
        with engine.recording(weighted=weighted):
            vl = val_loss_fn(model)
            tl = (token_logprobs(model, tokens, attention_mask=mask) * tok_weights).sum()
        return engine.target(vl, rank=8), tl

    engine = InfluenceEngine(model)
    target, tl = losses(engine, False)
    separate = engine.scores(tl, ids, target, mode=mode)
    expected = ippo.select_episodes(separate)
    target, tl = losses(engine, True)
    out = engine.weighted_backward(tl, ids, target, mode=mode)
    assert torch.allclose(out.scores, separate, rtol=1e-10, atol=1e-14)
    assert torch.equal(out.selection.keep, expected.keep)
    assert torch.allclose(out.selection.weights, expected.weights, rtol=1e-10)
    assert 0 < expected.num_kept < 8  # the check has something to distinguish
    # and the gradient is that of the kept episodes weighted by score / mean(kept score)
    for p in model.parameters():
        p.grad = None
    ref = reference_grads(model, tokens, mask, tok_weights, ids, expected.weights)
    target, tl = losses(engine, True)
    engine.weighted_backward(tl, ids, target, mode=mode)
    assert_grads_match(model, ref, tol=1e-9)


def test_unweightable_parameter_raises_before_backward():
    model = tiny_llama(torch.float64)
    model.model.layers[0].self_attn.gate = nn.Parameter(torch.ones(1, dtype=torch.float64))
    engine = InfluenceEngine(model)
    tokens, mask, tok_weights = make_batch()
    with engine.recording(weighted=True):
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * tok_weights).sum()
    target = engine.target(vl)
    with pytest.raises(NotImplementedError, match="model.layers.0.self_attn.gate"):
        engine.weighted_backward(tl, torch.arange(5), target)
    assert all(p.grad is None for p in model.parameters())


def test_needs_weighted_recording():
    model = tiny_llama(torch.float64)
    engine = InfluenceEngine(model)
    tokens, mask, tok_weights = make_batch()
    with engine.recording():
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * tok_weights).sum()
    target = engine.target(vl)
    with pytest.raises(ValueError, match="cannot score inside a backward"):
        engine.weighted_backward(tl, torch.arange(5), target, mode="sketch")
    with pytest.raises(RuntimeError, match="weighted=True"):
        engine.weighted_backward(tl, torch.arange(5), target)


def test_two_pass_strategy_matches_deferred_and_keeps_no_dy():
    model = tiny_gpt2(torch.float64)
    tokens, mask, tok_weights = make_batch(B=6)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    w = torch.tensor([1.7, 0.0, -0.3, 0.0, 2.5], dtype=torch.float64)
    ref = reference_grads(model, tokens, mask, tok_weights, ids, w)
    out = run_weighted(model, tokens, mask, tok_weights, ids, select=fixed_selection(w))
    assert out.retained_bytes > 0
    deferred_scores = out.scores
    engine = InfluenceEngine(model)
    with engine.recording():  # two_pass needs no weighted recording
        vl = val_loss_fn(model)
        per_row = (token_logprobs(model, tokens, attention_mask=mask) * tok_weights).sum(1)
        losses = torch.zeros(5, dtype=torch.float64).index_add(0, ids, per_row)
    target = engine.target(vl)
    for p in model.parameters():
        p.grad = None
    out = engine.weighted_backward(losses, ids, target, select=fixed_selection(w), strategy="two_pass")
    assert out.retained_bytes == 0
    assert torch.allclose(out.scores, deferred_scores, rtol=1e-10)
    assert_grads_match(model, ref)
    with pytest.raises(ValueError, match="per-episode losses"):
        engine.weighted_backward(losses.sum(), ids, target, strategy="two_pass")
    with pytest.raises(ValueError, match="unknown strategy"):
        engine.weighted_backward(losses, ids, target, strategy="fast")
