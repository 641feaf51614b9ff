"""ppo.critic=shared: a value head on the policy's final hidden state, fed by the policy's own forwards."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ippo.rl.batches import response_logits
from ippo.rl.config import ConfigError
from ippo.rl.data import Example, PromptFormatter
from ippo.rl.loop import train
from ippo.rl.models import SharedValueHead, load_policy, load_tokenizer
from ippo.rl.rollout import HFSampler, collate, sample_episodes


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _latest(run_dir, name):
    root = run_dir / "checkpoints"
    return load_file(str(root / (root / "latest").read_text() / name))


@pytest.fixture
def policy_and_head(make_cfg, tiny_model_dir):
    cfg = make_cfg()
    tok = load_tokenizer(cfg.model, str(tiny_model_dir))
    policy = load_policy(cfg.model, str(tiny_model_dir), torch.device("cpu")).train()
    head = SharedValueHead(policy.config.hidden_size)
    with torch.no_grad():  # a non-zero head, so that the values carry the hidden states
        head.head.weight.copy_(torch.randn_like(head.head.weight, generator=torch.Generator().manual_seed(0)))
        head.head.bias.fill_(0.25)
    return cfg, tok, policy, head


def test_rollout_values_equal_a_full_forward(policy_and_head):
    """The values read off generate's steps (KV cache, left-padded prompts of different lengths) are
    the values a full forward of the finished episodes gives at the positions that predict each token."""
    cfg, tok, policy, head = policy_and_head
    cfg.rollout.max_new_tokens = 12
    rows = [Example(i, q, "", "") for i, q in enumerate(["what is 1+2?", "what is 12+30 and then 4?", "7*8?"])]
    fmt = PromptFormatter(tok, cfg.data.prompt_template, cfg.data.chat_template)
    assert len({len(fmt.prompt_ids(r.question)) for r in rows}) == 3  # really left-padded
    ep = sample_episodes(HFSampler(policy, tok, cfg.rollout, head), tok, fmt, rows, [0, 1, 2], [0, 1, 2],
                         cfg.rollout.samples_per_prompt, cfg.seed, it=0)
    assert len(ep.values) == len(ep) == 3 * cfg.rollout.samples_per_prompt
    assert len({len(r) for r in ep.response_tokens}) > 1  # responses of different lengths too
    ids, attn, _, P = collate(ep.prompt_tokens, ep.response_tokens, tok.pad_token_id)
    with torch.no_grad(), head.reading(policy) as read:
        response_logits(policy, ids, attn, P)
    full = read[0][:, P - 1:-1]
    for i, v in enumerate(ep.values):
        assert v.shape == (len(ep.response_tokens[i]),)
        torch.testing.assert_close(v, full[i, :len(v)], rtol=1e-5, atol=1e-5)
    assert float(torch.cat(ep.values).std()) > 1e-3  # the check compared real, varying values


def test_reading_trains_through_the_policy(policy_and_head):
    """In the update the head reads the whole sequence with grad: the value loss reaches the trunk."""
    _, _, policy, head = policy_and_head
    ids = torch.randint(4, 50, (2, 7))
    with head.reading(policy) as read:
        policy(input_ids=ids)
    assert len(read) == 1 and read[0].shape == (2, 7)
    read[0].square().sum().backward()
    assert head.head.weight.grad is not None
    assert policy.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert policy.lm_head.weight.grad is None  # the values branch off before the output embedding
    # the hook is removed on exit
    with torch.no_grad():
        policy(input_ids=ids)
    assert len(read) == 1


def test_shared_critic_ppo_and_ippo_end_to_end(make_cfg, tmp_path, tiny_model_dir):
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    for timing in ("off", "before_update", "in_update"):
        run = tmp_path / timing
        extra = ["influence.enabled=false"] if timing == "off" else [f"influence.timing={timing}"]
        assert train(make_cfg("ppo.critic=shared", *extra, run_dir=run))["stopped"] is None
        m = _jsonl(run / "metrics.jsonl")
        assert len(m) == 2 and all(r["vf_loss"] > 0 for r in m)
        head = _latest(run, "value.safetensors")
        assert set(head) == {"head.weight", "head.bias"}  # the critic is the head alone, no second backbone
        assert head["head.weight"].abs().sum() > 0  # trained away from its zero initialisation
        policy = _latest(run, "policy.safetensors")
        assert any(not torch.equal(w0[k], policy[k]) for k in w0)
        assert "time_ref_old_logprobs" in m[0]


def test_shared_in_update_equals_separate_pass_at_theta_old(make_cfg, tmp_path, tiny_model_dir):
    """With a shared critic the value loss is an unweighted stream through the policy trunk in both
    timings; one mini-batch at theta_old gives the same scores, selection and update."""
    common = ("iterations=1", "ppo.epochs=1", "ppo.mini_batch_size=16", "ppo.micro_batch_size=16",
              "ppo.critic=shared", "influence.episode_loss=policy")
    runs = {t: tmp_path / t for t in ("before_update", "in_update")}
    for timing, run in runs.items():
        assert train(make_cfg(*common, f"influence.timing={timing}", run_dir=run))["stopped"] is None
    b, i = (_jsonl(runs[t] / "influence.jsonl") for t in runs)
    s_b = torch.tensor([r["score"] for r in b], dtype=torch.float64)
    s_i = torch.tensor([r["score"] for r in i], dtype=torch.float64)
    assert float((s_b - s_i).norm() / s_b.norm()) < 1e-4
    assert [r["kept"] for r in b] == [r["kept"] for r in i] and 0 < sum(r["kept"] for r in i) < 16
    # same update, relative to its size (as in test_in_update.py)
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    wb, wi = _latest(runs["before_update"], "policy.safetensors"), _latest(runs["in_update"], "policy.safetensors")
    for k, w in wb.items():
        step = w - w0[k]
        assert float((wi[k] - w).norm()) <= 1e-2 * float(step.norm()), k
    # the head starts at zero, so its single AdamW step is lr * sign(grad) per element: a gradient
    # element that is zero up to rounding may flip; nearly all elements must take the same step
    hb, hi = _latest(runs["before_update"], "value.safetensors"), _latest(runs["in_update"], "value.safetensors")
    for k, w in hb.items():
        differs = ~torch.isclose(hi[k], w, rtol=1e-2, atol=1e-6)
        assert float(w.abs().sum()) > 0 and float(differs.float().mean()) <= 0.1, k


@pytest.fixture
def nonzero_head(monkeypatch):
    """Shared heads start non-zero (seeded): a zero head passes no value gradient to the trunk."""
    init = SharedValueHead.__init__

    def seeded(self, hidden_size):
        init(self, hidden_size)
        with torch.no_grad():
            self.head.weight.copy_(0.5 * torch.randn(self.head.weight.shape, generator=torch.Generator().manual_seed(1)))

    monkeypatch.setattr(SharedValueHead, "__init__", seeded)


def test_episode_loss_all_in_update_equals_separate_pass_with_one_backward(make_cfg, tmp_path, tiny_model_dir,
                                                                          nonzero_head, monkeypatch):
    """influence.episode_loss=all scores and weights the value loss with its episode: at theta_old both
    timings give the same scores, selection and update (policy and head), and in_update runs one backward
    through the policy (the only other backward stops at the head)."""
    common = ("iterations=1", "ppo.epochs=1", "ppo.mini_batch_size=16", "ppo.micro_batch_size=16",
              "ppo.critic=shared", "ppo.vf_coef=2.0")
    runs = {t: tmp_path / t for t in ("before_update", "in_update", "policy")}
    backwards, head_grads = [], {}
    real_backward, real_clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    for name, run in runs.items():
        timing, loss = ("before_update", "policy") if name == "policy" else (name, "all")

        def clip(params, *a, _name=name, **k):  # the gradients the optimizer steps with; the head's come last
            head_grads[_name] = [p.grad.clone() for p in params[-2:]]
            return real_clip(params, *a, **k)

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        if name == "in_update":
            monkeypatch.setattr(torch.Tensor, "backward",
                                lambda self, *a, **k: backwards.append(k) or real_backward(self, *a, **k))
        assert train(make_cfg(*common, f"influence.timing={timing}", f"influence.episode_loss={loss}",
                              run_dir=run))["stopped"] is None
        monkeypatch.setattr(torch.Tensor, "backward", real_backward)
    assert len(backwards) == 1 and len(backwards[0]["inputs"]) == 2  # stops at the head's weight and bias
    for gb, gi in zip(head_grads["before_update"], head_grads["in_update"]):
        assert float(gb.norm()) > 0
        torch.testing.assert_close(gi, gb, rtol=1e-4, atol=1e-4 * float(gb.abs().max()))
    b, i, p = (_jsonl(runs[t] / "influence.jsonl") for t in runs)
    s_b, s_i, s_p = (torch.tensor([r["score"] for r in x], dtype=torch.float64) for x in (b, i, p))
    assert float((s_b - s_i).norm() / s_b.norm()) < 1e-4
    assert float((s_b - s_p).norm() / s_b.norm()) > 1e-2  # the value term really is in the scores
    assert [r["kept"] for r in b] == [r["kept"] for r in i] and 0 < sum(r["kept"] for r in i) < 16
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    wb, wi = _latest(runs["before_update"], "policy.safetensors"), _latest(runs["in_update"], "policy.safetensors")
    for k, w in wb.items():
        assert float((wi[k] - w).norm()) <= 1e-2 * float((w - w0[k]).norm()), k


def test_critic_choice_is_validated(make_cfg):
    with pytest.raises(ConfigError, match="ppo.critic"):
        make_cfg("ppo.critic=both")
    with pytest.raises(ConfigError, match="episode_loss=all"):
        make_cfg("influence.episode_loss=all")  # the default critic is separate
    make_cfg("influence.episode_loss=all", "ppo.critic=shared")
    make_cfg("influence.episode_loss=all", "ppo.advantage=grpo")  # no critic: the same as policy


def test_shared_critic_resumes_exactly(make_cfg, tmp_path):
    """Stop after one iteration, resume for the second: the same policy and head as one run of two."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(make_cfg("ppo.critic=shared", "influence.enabled=false", run_dir=full))
    train(make_cfg("ppo.critic=shared", "influence.enabled=false", "iterations=1", run_dir=cut))
    train(make_cfg("ppo.critic=shared", "influence.enabled=false", "resume=true", run_dir=cut))
    for name in ("policy.safetensors", "value.safetensors"):
        a, b = _latest(full, name), _latest(cut, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
