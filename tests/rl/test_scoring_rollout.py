"""The trainer's I-PPO scoring pass against brute-force per-episode gradients; rollout layout."""

import pytest
import torch

import ippo
from ippo.rl.batches import episode_batch, response_logits
from ippo.rl.config import load_config
from ippo.rl.data import PromptFormatter, load_jsonl
from ippo.rl.losses import aggregate_per_episode, logprobs_from_logits, scoring_loss_per_episode, sft_loss_sum
from ippo.rl.models import SharedValueHead, causal_lm_logits, load_policy, load_tokenizer
from ippo.rl.rollout import Episodes, collate, cut_at_stop, generate
from ippo.rl.scoring import InfluenceScorer

from .conftest import DATA


@pytest.fixture
def setup(tiny_model_dir):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.train_path={DATA / 'arith_train.jsonl'}",
                             "data.val_holdout=8", "rollout.forward_batch=3"])
    tok = load_tokenizer(cfg.model, str(tiny_model_dir))
    policy = load_policy(cfg.model, str(tiny_model_dir), torch.device("cpu")).double()
    fmt = PromptFormatter(tok, "q: {question}\na:")
    return cfg, tok, policy, fmt


def _episodes(tok, fmt, rows, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ep = Episodes([], [], [], [], [])
    for i in range(n):
        p = fmt.prompt_ids(rows[i % 3].question)
        L = int(torch.randint(1, 9, (1,), generator=g))
        r = torch.randint(4, 40, (L,), generator=g).tolist()
        ep.prompt_tokens.append(p)
        ep.response_tokens.append(r)
        ep.truncated.append(True)
        ep.prompt_rows.append(i % 3)
        ep.group.append(i)
    return ep


@pytest.mark.parametrize("episode_loss", ["pg", "policy", "all"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_scores_equal_brute_force_gradient_dot_products(setup, agg, episode_loss):
    """<grad L_e, G_val> against full per-episode autograd gradients; with episode_loss=policy,
    L_e also holds the episode's KL-penalty and entropy terms; with episode_loss=all also the value
    loss of a shared critic head (which reaches the policy's trunk)."""
    cfg, tok, policy, fmt = setup
    cfg.ppo.loss_agg = agg
    cfg.influence.episode_loss = episode_loss
    cfg.ppo.kl_coef, cfg.ppo.entropy_coef = 0.3, 0.05
    cfg.ppo.vf_coef, cfg.ppo.value_clip = 0.7, 0.2
    rows = load_jsonl(DATA / "arith_train.jsonl")
    val_rows, val_idx = rows[-8:], [0, 2, 5]
    ep = _episodes(tok, fmt, rows)
    E = len(ep)
    T = max(len(r) for r in ep.response_tokens)
    lengths = torch.tensor([len(r) for r in ep.response_tokens])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    adv = torch.randn(E, T, dtype=torch.float64) * mask
    old_logp = torch.zeros(E, T, dtype=torch.float64)
    ref_logp = -torch.rand(E, T, dtype=torch.float64) * 3 * mask  # a reference policy unlike the current one
    critic = None
    if episode_loss == "all":  # a non-zero head (a zero one passes no gradient to the trunk)
        head = SharedValueHead(policy.config.hidden_size).double()
        with torch.no_grad():
            head.head.weight.copy_(torch.randn(head.head.weight.shape, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(3)))
        old_values = torch.randn(E, T, dtype=torch.float64) * mask
        returns = torch.randn(E, T, dtype=torch.float64) * mask
        critic = (head, old_values, returns)
    engine = ippo.InfluenceEngine(policy)
    cfg.influence.val_batch = 2  # 2 chunks
    scorer = InfluenceScorer(engine, cfg)
    target = scorer.validation_target(policy, tok, fmt, val_rows, val_idx, torch.device("cpu"))
    tn, sn = float(lengths.sum()), float(E)
    scores = scorer.score_episodes(policy, ep, adv, old_logp, ref_logp, target, tok.pad_token_id,
                                   torch.device("cpu"), token_norm=tn, seq_norm=sn, critic=critic)
    if critic is not None:  # the value term changes the scores (the check below is not vacuous)
        without = scorer.score_episodes(policy, ep, adv, old_logp.clone(), ref_logp, target, tok.pad_token_id,
                                        torch.device("cpu"), token_norm=tn, seq_norm=sn)
        assert float((scores - without).abs().max()) > 1e-3 * float(scores.abs().max())

    # brute force: full parameter gradients of the hooked layers, one episode at a time
    params = dict(policy.named_parameters())
    names = [f"{m}.weight" for m in engine.module_names] + [f"{m}.bias" for m in engine.module_names
                                                               if f"{m}.bias" in params]
    plist = [params[n] for n in names]
    seqs = [fmt.sft_ids(val_rows[i].question, val_rows[i].solution) for i in val_idx]
    total, count = 0.0, 0
    for s, lab in seqs:
        ls, c = sft_loss_sum(causal_lm_logits(policy, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)),
                             torch.tensor([lab]))
        total, count = total + ls, count + c
    g_val = torch.autograd.grad(total / count, plist)
    for e in range(E):
        ids, attn, rmask, P = episode_batch(ep, [e], tok.pad_token_id, torch.device("cpu"))
        hidden = []
        if critic is not None:  # the head reads lm_head's input: the final hidden state
            hook = policy.lm_head.register_forward_pre_hook(lambda m, a, _h=hidden: _h.append(a[0]))
        logits = response_logits(policy, ids, attn, P, cfg.rollout.temperature)
        if critic is not None:
            hook.remove()
        logp = logprobs_from_logits(logits, ids[:, P:])
        # unpadded single-episode forward gives the same old log-probs as the batched scoring pass
        torch.testing.assert_close(logp.detach()[0], old_logp[e, :lengths[e]])
        le = scoring_loss_per_episode(logp, adv[e:e + 1, :lengths[e]], rmask.double(), agg, tn, sn).sum()
        if episode_loss == "policy":  # written out independently of the trainer's helper
            r = ref_logp[e:e + 1, :lengths[e]] - logp
            k3 = torch.exp(r) - 1 - r
            ent = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
            le = le + aggregate_per_episode(0.3 * k3 - 0.05 * ent, rmask.double(), agg, tn, sn).sum()
        if episode_loss == "all":
            r = ref_logp[e:e + 1, :lengths[e]] - logp
            k3 = torch.exp(r) - 1 - r
            ent = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
            v = (hidden[0][:, P - 1:-1] @ head.head.weight.T + head.head.bias).squeeze(-1)
            v_old, ret = old_values[e:e + 1, :lengths[e]], returns[e:e + 1, :lengths[e]]
            v_clip = v_old + (v - v_old).clamp(-0.2, 0.2)
            vf = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
            le = le + aggregate_per_episode(0.3 * k3 - 0.05 * ent + 0.7 * vf, rmask.double(), agg, tn, sn).sum()
        g_e = torch.autograd.grad(le, plist)
        brute = sum((a * b).sum() for a, b in zip(g_e, g_val))
        assert scores[e].item() == pytest.approx(brute.item(), rel=1e-6, abs=1e-12)
    assert scores.abs().max() > 0


def test_target_mode_factor_basis_scores_like_dense(setup):
    """influence.target_basis=factor (the default of target mode): validation_target keeps the
    (X, dY) of its two chunks, builds the rank-q basis from them and frees them; G is never formed.
    The target-mode scores equal those of the basis of the dense G (float64), and with q above
    rank(G) both equal the exact scores."""
    cfg, tok, policy, fmt = setup
    cfg.influence.mode = "target"
    rows = load_jsonl(DATA / "arith_train.jsonl")
    val_rows, val_idx = rows[-8:], [0, 2, 5]
    ep = _episodes(tok, fmt, rows)
    T = max(len(r) for r in ep.response_tokens)
    lengths = torch.tensor([len(r) for r in ep.response_tokens])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    adv = torch.randn(len(ep), T, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * mask
    old_logp = torch.zeros(len(ep), T, dtype=torch.float64)
    out = {}
    for q in (4, 256):  # 256 > the validation tokens: rank(G) <= q, the basis is exact
        cfg.influence.rank = q
        engine = ippo.InfluenceEngine(policy, rank=q)
        cfg.influence.val_batch = 2
        cfg.influence.target_basis = "dense"
        scorer = InfluenceScorer(engine, cfg)
        dense = scorer.validation_target(policy, tok, fmt, val_rows, val_idx, torch.device("cpu"))
        cfg.influence.target_basis = "factor"
        factor = scorer.validation_target(policy, tok, fmt, val_rows, val_idx, torch.device("cpu"))
        assert dense.kind == "dense" and factor.kind == "factor"
        assert factor.factors is None and factor._weights is None and q in factor._bases  # freed, never dense
        for name, target in (("dense", dense), ("factor", factor)):
            out[name, q] = scorer.score_episodes(policy, ep, adv, old_logp.clone(), None, target, tok.pad_token_id,
                                                 torch.device("cpu"), token_norm=float(lengths.sum()), seq_norm=7.0)
        cfg.influence.mode = "exact"
        out["exact", q] = scorer.score_episodes(policy, ep, adv, old_logp.clone(), None, dense, tok.pad_token_id,
                                                torch.device("cpu"), token_norm=float(lengths.sum()), seq_norm=7.0)
        cfg.influence.mode = "target"
    torch.testing.assert_close(out["factor", 4], out["dense", 4], rtol=1e-7, atol=1e-12)
    assert float((out["factor", 4] - out["exact", 4]).abs().max()) > 1e-6 * float(out["exact", 4].abs().max())
    torch.testing.assert_close(out["factor", 256], out["exact", 256], rtol=1e-8, atol=1e-12)


def test_cut_at_stop_and_pad_equals_eos():
    assert cut_at_stop([5, 6, 2, 2, 2], {2}) == ([5, 6, 2], False)  # pad = eos trailing copies dropped
    assert cut_at_stop([5, 6, 7], {2}) == ([5, 6, 7], True)
    assert cut_at_stop([2, 5], {2, 9}) == ([2], False)


def test_collate_alignment_matches_unpadded_forward(setup):
    _, tok, policy, _fmt = setup
    prompts = [[5, 6, 7, 8], [9, 10]]
    responses = [[11, 12], [13, 14, 15, 2]]
    ids, attn, rmask, P = collate(prompts, responses, tok.pad_token_id)
    assert P == 4 and ids.shape == (2, 8) and rmask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    lp = logprobs_from_logits(response_logits(policy, ids, attn, P), ids[:, P:])
    for i in range(2):
        full = torch.tensor([prompts[i] + responses[i]])
        ref = logprobs_from_logits(causal_lm_logits(policy, full, torch.ones_like(full))[:, len(prompts[i]) - 1:-1],
                                   full[:, len(prompts[i]):])
        torch.testing.assert_close(lp[i, :len(responses[i])], ref[0])


def test_generate_left_padding_and_eos_handling(setup):
    _, tok, policy, fmt = setup
    tok.pad_token = tok.eos_token  # a pad = eos tokenizer
    prompts = [fmt.prompt_ids("what is 1+1?"), fmt.prompt_ids("hi")]
    resp, trunc = generate(policy, tok, prompts, 3, max_new_tokens=6, do_sample=True, temperature=1.0, seed=0)
    assert len(resp) == 6
    for r, t in zip(resp, trunc):
        assert 1 <= len(r) <= 6
        assert (tok.eos_token_id in r) == (not t)
        if not t:
            assert r.index(tok.eos_token_id) == len(r) - 1  # nothing after the first eos
    again, _ = generate(policy, tok, prompts, 3, max_new_tokens=6, do_sample=True, temperature=1.0, seed=0)
    assert again == resp  # seeded
    # left padding does not change what a prompt generates (greedy, alone vs in a batch)
    alone, _ = generate(policy, tok, prompts[1:], 1, max_new_tokens=6, do_sample=False)
    batch, _ = generate(policy, tok, prompts, 1, max_new_tokens=6, do_sample=False)
    assert batch[1] == alone[0]


def test_response_logits_are_those_of_the_sampling_temperature(setup):
    """Responses are drawn from softmax(logits / T): the PPO log-probs must be of that policy."""
    policy = setup[2]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    attn = torch.ones_like(ids)
    plain = response_logits(policy, ids, attn, 2)
    assert torch.allclose(response_logits(policy, ids, attn, 2, temperature=0.5), plain / 0.5)
    assert torch.equal(response_logits(policy, ids, attn, 2, temperature=1.0), plain)
