"""InfluenceEngine against exact per-episode gradients from a plain loop of autograd backwards."""

from __future__ import annotations

import gc

import pytest
import torch

import ippo
from ippo import InfluenceEngine
from tests.models import VOCAB, tiny_gpt2, tiny_llama

AVAILABLE = [name for name, info in ippo.influence.backends().items() if info and name in ("torch", "cpp", "triton")]


# ---------------------------------------------------------------------------- helpers
def hooked_params(model, engine):
    mods = dict(model.named_modules())
    params = []
    for name in engine.module_names:
        params.append(mods[name].weight)
        if mods[name].bias is not None:
            params.append(mods[name].bias)
    return params


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def token_logprobs(model, tokens, **kw):
    logits = model(tokens, **kw).logits[:, :-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def make_batch(B=5, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # left padding, rows of different lengths
    tokens = torch.where(mask, tokens, torch.zeros_like(tokens))
    weights = torch.randn(B, T - 1, generator=g, dtype=torch.float64) * mask[:, 1:]  # like advantages
    return tokens, mask.long(), weights


def val_loss_fn(model, seed=2, n=3, T=8):
    g = torch.Generator().manual_seed(seed)
    val = torch.randint(3, VOCAB, (n, T), generator=g)
    return model(val, labels=val).loss


def rowwise_reference(model, engine, tokens, mask, weights, episode_of_row, n_ep):
    params = hooked_params(model, engine)
    gv = flat_grad(val_loss_fn(model), params)
    ref = torch.zeros(n_ep, dtype=torch.float64)
    for e in range(n_ep):
        rows = (episode_of_row == e).to(torch.float64)[:, None]
        if rows.sum() == 0:
            continue
        lp = token_logprobs(model, tokens, attention_mask=mask)
        ref[e] = flat_grad((lp * weights * rows).sum(), params).double() @ gv.double()
    return ref


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_exact_matches_per_episode_autograd_float64(make_model, backend):
    model = make_model(torch.float64)
    engine = InfluenceEngine(model, backend=backend)
    tokens, mask, weights = make_batch()
    episode_of_row = torch.tensor([0, 1, 1, 3, 2])  # rows 1 and 2 form one episode; ids not in row order
    with engine.recording():
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    target = engine.target(vl)
    scores, per_token = engine.scores(tl, episode_of_row, target, mode="exact", per_token=True)
    ref = rowwise_reference(model, engine, tokens, mask, weights, episode_of_row, 4)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    assert rel_err(scores, ref) <= 1e-10
    assert per_token.shape == tokens.shape
    row_sums = per_token.sum(1)
    for e in range(4):
        assert torch.allclose(row_sums[episode_of_row == e].sum(), scores[e], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_exact_float32_model(backend):
    model64 = tiny_llama(torch.float64)
    model32 = tiny_llama(torch.float32)
    tokens, mask, weights = make_batch()
    ids = torch.arange(5)
    ref = rowwise_reference(model64, InfluenceEngine(model64), tokens, mask, weights, ids, 5)
    engine = InfluenceEngine(model32, backend=backend)
    with engine.recording():
        vl = val_loss_fn(model32)
        tl = (token_logprobs(model32, tokens, attention_mask=mask) * weights).sum()
    scores = engine.scores(tl, ids, engine.target(vl))
    assert scores.dtype == torch.float32
    assert rel_err(scores, ref) <= 1e-4


def test_packed_sequences_with_token_ids():
    """[B, T] ids: several episodes packed in one row with a block-diagonal causal mask."""
    model = tiny_llama(torch.float64)
    engine = InfluenceEngine(model)
    g = torch.Generator().manual_seed(5)
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2, 4, 4, 4, 4]])
    B, T = seg.shape
    tokens = torch.randint(3, VOCAB, (B, T), generator=g)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    attn = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    weights = torch.randn(B, T - 1, generator=g, dtype=torch.float64)
    same_next = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)  # predict only within a segment
    weights = weights * same_next

    def train_loss(ep=None):
        lp = token_logprobs(model, tokens, attention_mask=attn, position_ids=pos)
        w = weights if ep is None else weights * (seg[:, 1:] == ep)
        return (lp * w).sum()

    with engine.recording():
        vl = val_loss_fn(model)
        tl = train_loss()
    scores = engine.scores(tl, seg, engine.target(vl))
    params = hooked_params(model, engine)
    gv = flat_grad(val_loss_fn(model), params)
    ref = torch.stack([flat_grad(train_loss(e), params) @ gv for e in range(5)])
    assert scores.shape == (5,)
    assert scores[3] == 0  # an episode with no tokens scores 0
    assert rel_err(scores, ref) <= 1e-10


def test_lora_model_scores_adapters_only():
    peft = pytest.importorskip("peft")
    base = tiny_llama(torch.float64)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                              "down_proj"]))
    # LoRA B starts at zero; randomise so every adapter has a non-trivial gradient path.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    engine = InfluenceEngine(model)
    assert engine.module_names and all("lora_" in n for n in engine.module_names)
    tokens, mask, weights = make_batch(B=4)
    ids = torch.tensor([0, 1, 2, 1])
    with engine.recording():
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    scores = engine.scores(tl, ids, engine.target(vl))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    gv = flat_grad(val_loss_fn(model), params)
    ref = torch.stack([flat_grad((token_logprobs(model, tokens, attention_mask=mask) * weights
                                  * (ids == e)[:, None]).sum(), params) @ gv for e in range(3)])
    assert rel_err(scores, ref) <= 1e-10


def test_gradient_checkpointing_gives_same_scores():
    model = tiny_llama(torch.float64).train()
    tokens, mask, weights = make_batch()
    ids = torch.arange(5)

    def run():
        engine = InfluenceEngine(model)
        with engine.recording():
            vl = val_loss_fn(model)
            tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
        return engine.scores(tl, ids, engine.target(vl))

    plain = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = run()
    assert rel_err(ckpt, plain) <= 1e-12


def test_bf16_model_accumulates_in_float32():
    model = tiny_llama(torch.bfloat16, bias=False)
    ref_model = tiny_llama(torch.float64, bias=False)
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    tokens, mask, weights = make_batch()
    ids = torch.arange(5)
    out = []
    for m in (model, ref_model):
        engine = InfluenceEngine(m)
        with engine.recording():
            vl = val_loss_fn(m)
            tl = (token_logprobs(m, tokens, attention_mask=mask) * weights).sum()
        out.append(engine.scores(tl, ids, engine.target(vl)))
    assert out[0].dtype == torch.float32
    assert rel_err(out[0], out[1]) <= 0.1  # bf16 activations: a few percent, not exact


# ---------------------------------------------------------------------------- target and sketch modes
@pytest.mark.parametrize("basis", ["factor", "dense"])
@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_target_mode_exact_when_rank_covers_target(make_model, backend, basis):
    model = make_model(torch.float64)  # GPT-2: Conv1D layers with biases (the appended 1 column)
    engine = InfluenceEngine(model, backend=backend)
    tokens, mask, weights = make_batch()
    ids = torch.arange(5)
    with engine.recording():
        vl = val_loss_fn(model, n=1, T=6)  # 6 validation tokens: every layer's target has rank <= 6
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    target = engine.target(vl, rank=6, basis=basis)
    assert target.kind == basis and (target._weights is None) == (basis == "factor")
    low, per_token = engine.scores(tl, ids, target, mode="target", per_token=True, retain_graph=True)
    exact = engine.scores(tl, ids, target, mode="exact")  # a factor target forms G only now
    assert rel_err(low, exact) <= 1e-9
    assert torch.allclose(per_token.sum(1), low, rtol=1e-9)


@pytest.mark.parametrize("basis", ["factor", "dense"])
def test_target_mode_far_above_rank_ranks_like_exact(basis):
    """Hundreds of validation tokens, hidden 256, q = 64: Spearman >= 0.99 with exact scores, for
    the basis built from the validation factors and for the one from the dense gradient."""
    scipy_stats = pytest.importorskip("scipy.stats")
    model = tiny_llama(torch.float32, hidden=256, layers=2, bias=False)
    engine = InfluenceEngine(model, rank=64)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, VOCAB, (48, 24), generator=g)
    weights = torch.randn(48, 23, generator=g)
    with engine.recording():
        vl = val_loss_fn(model, n=16, T=32)  # 512 validation tokens: rank(G_val) far above 64
        tl = (token_logprobs(model, tokens) * weights).sum()
    target = engine.target(vl, rank=64, basis=basis)
    low = engine.scores(tl, torch.arange(48), target, mode="target", retain_graph=True)
    exact = engine.scores(tl, torch.arange(48), target, mode="exact")
    rho = scipy_stats.spearmanr(exact.numpy(), low.numpy()).statistic
    assert rho >= 0.99, rho


def test_factor_and_dense_targets_agree():
    """The two ways of holding a target give the same gradient (weights, biases), the same rank-q
    basis up to rounding, and the same target-mode scores; chunks added with add_ equal one backward;
    auto picks factor exactly when a rank is given; a bad basis name is refused."""
    model = tiny_gpt2(torch.float64)
    engine = InfluenceEngine(model)
    tokens, mask, weights = make_batch()

    def val_chunk(seed):
        g = torch.Generator().manual_seed(seed)
        val = torch.randint(3, VOCAB, (2, 8), generator=g)
        return model(val, labels=val).loss

    with engine.recording():
        parts = [val_chunk(11), val_chunk(12)]
        whole = val_chunk(11) + val_chunk(12)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    dense = engine.target(whole, basis="dense")
    factor = engine.target(parts[0], basis="factor").add_(engine.target(parts[1], basis="factor"))
    assert dense.kind == "dense" and factor.kind == "factor" and factor.names == dense.names
    for name, g in dense.grads.items():
        torch.testing.assert_close(factor.grads[name], g, rtol=1e-10, atol=1e-14)
    def low_rank(entry):  # U S V^T, free of the singular vectors' signs
        p_in, p_in_bias, p_out, s = entry
        vh = p_in if p_in_bias is None else torch.cat([p_in, p_in_bias[:, None]], 1)
        return (p_out.T * s) @ vh

    for name, entry in dense.basis(4).items():
        torch.testing.assert_close(factor.basis(4)[name][3], entry[3], rtol=1e-8, atol=1e-14)
        torch.testing.assert_close(low_rank(factor.basis(4)[name]), low_rank(entry), rtol=1e-8, atol=1e-12)
    with engine.recording():
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    a = engine.scores(tl, torch.arange(5), dense, mode="target", rank=4, retain_graph=True)
    b = engine.scores(tl, torch.arange(5), factor, mode="target", rank=4)
    assert rel_err(b, a) <= 1e-8
    with engine.recording():
        vl, vl2 = val_chunk(13), val_chunk(13)
    assert engine.target(vl, rank=2).kind == "factor" and engine.target(vl2).kind == "dense"
    with pytest.raises(ValueError, match="unknown basis 'svd'"):
        engine.target(val_chunk(14), basis="svd")


def test_sketch_is_unbiased_over_seeds():
    model = tiny_llama(torch.float64, hidden=16, layers=1)
    tokens, mask, weights = make_batch(B=3, T=6)
    ids = torch.arange(3)
    base = InfluenceEngine(model)
    with base.recording():
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    target = base.target(vl)
    exact = base.scores(tl, ids, target)
    draws = []
    for seed in range(300):
        engine = InfluenceEngine(model, rank=4, seed=seed)
        with engine.recording():
            tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
        draws.append(engine.scores_from_sketches(engine.sketches(tl, ids), target))
    draws = torch.stack(draws)
    mean, sem = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    scale = exact.norm()
    assert draws.std(0).norm() > 0.2 * scale  # a single rank-4 sketch really is noisy...
    assert ((mean - exact).abs() <= 4 * sem).all(), (mean, exact, sem)  # ...but its mean is exact
    assert sem.norm() < 0.25 * scale  # so the check above has the power to fail


def test_sketches_shape_and_determinism():
    model = tiny_llama(torch.float64)
    tokens, mask, weights = make_batch()
    out = []
    for _ in range(2):
        engine = InfluenceEngine(model, rank=8, seed=7)
        with engine.recording():
            tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
        out.append(engine.sketches(tl, torch.arange(5)))
    d = sum(min(8, m.in_features + (m.bias is not None)) * min(8, m.out_features)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert out[0].shape == (5, d)
    assert torch.equal(out[0], out[1])


# ---------------------------------------------------------------------------- side effects and memory
def test_param_grad_untouched_and_memory_flat():
    from ippo.influence.recording import Record

    model = tiny_llama(torch.float64)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    engine = InfluenceEngine(model)
    tokens, mask, weights = make_batch()
    live = []
    for _ in range(4):
        with engine.recording():
            vl = val_loss_fn(model)
            tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
            tl2 = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
        target = engine.target(vl, rank=4)
        engine.scores(tl, torch.arange(5), target, mode="target")
        engine.sketches(tl2, torch.arange(5), rank=4)
        del vl, tl, tl2, target
        gc.collect()
        live.append(sum(isinstance(o, Record) for o in gc.get_objects()))
    assert live == [0, 0, 0, 0]
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def recorded():
    model = tiny_llama(torch.float64)
    engine = InfluenceEngine(model)
    tokens, mask, weights = make_batch()
    with engine.recording():
        vl = val_loss_fn(model)
        tl = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    return model, engine, engine.target(vl), tl, tokens


def test_bad_episode_ids(recorded):
    _, engine, target, tl, _ = recorded
    with pytest.raises(ValueError, match="integer"):
        engine.scores(tl, torch.zeros(5), target, retain_graph=True)
    with pytest.raises(ValueError, match=">= -1"):
        engine.scores(tl, torch.tensor([0, 1, -2, 3, 4]), target, retain_graph=True)
    with pytest.raises(ValueError, match="out of range"):
        engine.scores(tl, torch.arange(5), target, num_episodes=3, retain_graph=True)
    with pytest.raises(ValueError, match="does not match the batch shape"):
        engine.scores(tl, torch.arange(4), target, retain_graph=True)
    with pytest.raises(ValueError, match="does not match the batch shape"):
        engine.scores(tl, torch.zeros(5, 3, dtype=torch.long), target, retain_graph=True)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, T\]"):
        engine.scores(tl, torch.zeros(5, 3, 2, dtype=torch.long), target, retain_graph=True)
    with pytest.raises(ValueError, match="is on meta"):
        engine.scores(tl, torch.arange(5, device="meta"), target, retain_graph=True)
    with pytest.raises(ValueError, match="unknown mode"):
        engine.scores(tl, torch.arange(5), target, mode="fast")


def test_backward_outside_recording_and_unreached_modules():
    model = tiny_llama(torch.float64)
    engine = InfluenceEngine(model)
    tokens, mask, weights = make_batch()
    with engine.recording():
        target = engine.target(val_loss_fn(model))
    unrecorded = (token_logprobs(model, tokens, attention_mask=mask) * weights).sum()
    with pytest.raises(RuntimeError, match="reaches no hooked module"):
        engine.scores(unrecorded, torch.arange(5), target)
    with engine.recording():
        emb_only = model.model.embed_tokens(tokens).sum()
    with pytest.raises(RuntimeError, match="reaches no hooked module"):
        engine.scores(emb_only, torch.arange(5), target)
    with engine.recording(), torch.no_grad():
        no_grad = model(tokens).logits.sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        engine.scores(no_grad, torch.arange(5), target)


def test_nan_loss_and_bad_arguments(recorded):
    model, engine, target, tl, _ = recorded
    with pytest.raises(ValueError, match="not finite"):
        engine.scores(tl * float("nan"), torch.arange(5), target)
    with pytest.raises(ValueError, match="scalar"):
        engine.scores(tl.expand(3), torch.arange(5), target)
    with pytest.raises(TypeError, match="ippo.Target"):
        engine.scores(tl, torch.arange(5), {"w": 1})
    with pytest.raises(ValueError, match="not in the model"):
        InfluenceEngine(model, modules=["model.nope"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        InfluenceEngine(model, modules=["model.norm"])
    with pytest.raises(ValueError, match="rank"):
        InfluenceEngine(model, rank=0)
    with pytest.raises(RuntimeError, match="not available"):
        InfluenceEngine(model, backend="cuda")
    with engine.recording(), pytest.raises(RuntimeError, match="does not nest"), engine.recording():
        pass


def test_module_selection_defaults():
    model = tiny_llama(torch.float64)
    model.lm_head.weight.requires_grad_(False)
    names = InfluenceEngine(model).module_names
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names
    assert len(names) == 7 * 2
    only = InfluenceEngine(model, modules=lambda n, m: n.endswith("down_proj")).module_names
    assert only == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_backends_report():
    info = ippo.influence.backends()
    assert set(info) == {"torch", "cpp", "triton", "cuda"}
    assert info["torch"].available
    for name, i in info.items():
        assert i.reason, name


def test_check_finite_catches_nan_inf_but_not_an_overflowing_sum():
    from ippo.influence.engine import _check_finite

    big = torch.full((4, 4), 3e38)  # finite entries whose float32 sum overflows: must pass
    _check_finite(big, "layer", "validation gradient")
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(4, 4)
        t[2, 1] = bad
        with pytest.raises(ValueError, match="validation gradient of module 'layer' contains NaN/Inf"):
            _check_finite(t, "layer", "validation gradient")
        big[0, 0] = bad
        with pytest.raises(ValueError, match="contains NaN/Inf"):
            _check_finite(big, "layer", "validation gradient")
        big[0, 0] = 3e38
