"""The fused linear path (ippo.influence.fused): sketches from the layer's own GEMMs equal the hook path's."""

from __future__ import annotations

import pytest
import torch

import ippo
from ippo import InfluenceEngine
from tests.influence.test_engine import make_batch, token_logprobs, val_loss_fn
from tests.models import tiny_llama

BACKENDS = [n for n, info in ippo.influence.backends().items() if info and n in ("torch", "cpp", "triton")]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fused_sketches_equal_hook_path(backend, dtype):
    model = tiny_llama(dtype)
    tokens, mask, weights = make_batch()
    ids = torch.tensor([0, 2, 1, 2, 3])
    out = {}
    for fused in (False, True):
        engine = InfluenceEngine(model, rank=8, seed=3, backend=backend)
        with engine.recording(fused_sketch=fused):
            vl = val_loss_fn(model)
            tl = (token_logprobs(model, tokens, attention_mask=mask) * weights.to(dtype)).sum()
        target = engine.target(vl)
        sk = engine.sketches(tl, ids)
        out[fused] = (sk, engine.scores_from_sketches(sk, target), target)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(out[True][0], out[False][0]) <= tol
    assert rel_err(out[True][1], out[False][1]) <= tol
    # the validation target recorded through the fused forward is the same gradient
    for name, w in out[False][2].weights.items():
        assert rel_err(out[True][2].weights[name], w) <= tol


def test_fused_forward_and_training_gradients_unchanged():
    model = tiny_llama(torch.float64)
    tokens, mask, weights = make_batch()
    engine = InfluenceEngine(model, rank=4)
    ref_loss = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    with engine.recording(fused_sketch=True):
        loss = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    assert torch.allclose(loss, ref_loss, rtol=1e-13)
    got = torch.autograd.grad(loss, list(model.parameters()))  # a user's own backward through the fused path
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-13)
    assert "forward" not in vars(model.lm_head)  # the patched forward is removed on exit


def test_fused_recording_still_scores_exactly():
    model = tiny_llama(torch.float64)
    tokens, mask, weights = make_batch()
    scores = []
    for fused in (False, True):
        engine = InfluenceEngine(model, rank=4)
        with engine.recording(fused_sketch=fused):
            vl = val_loss_fn(model)
            tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
        scores.append(engine.scores(tl, torch.arange(5), engine.target(vl)))
    assert rel_err(scores[1], scores[0]) <= 1e-12


def test_two_source_gemm_kernel_matches_torch():
    triton_ops = pytest.importorskip("ippo.influence.ops.triton")
    if not ippo.influence.backends()["triton"]:
        pytest.skip(ippo.influence.backends()["triton"].reason)
    for m, k, n1, n2 in [(1, 5, 3, 3), (7, 37, 40, 5), (70, 33, 65, 17)]:
        a, w, p = torch.randn(m, k), torch.randn(n1, k), torch.randn(n2, k)
        b1, b2 = torch.randn(n1), torch.randn(n2)
        for bias in (True, False):
            c1, c2 = triton_ops.K.two_source_gemm(a, w.T, p.T, b1 if bias else None, b2 if bias else None)
            r1 = a.double() @ w.double().T + (b1.double() if bias else 0)
            r2 = a.double() @ p.double().T + (b2.double() if bias else 0)
            assert c1.dtype == torch.float32 and c2.dtype == torch.float32
            assert rel_err(c1, r1) <= 1e-5 and rel_err(c2, r2) <= 1e-5
        h1, h2 = triton_ops.K.two_source_gemm(a.half(), w.T.half(), p.T.half())
        assert h1.dtype == torch.float16 and rel_err(h2, a.half().double() @ p.half().double().T) <= 2e-3
