"""Tiny Hugging Face models built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 61


def tiny_llama(dtype=torch.float64, hidden=32, layers=2, bias=True, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 6,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    if dtype == torch.float64:
        _float64_norms(model)
    return model


def _float64_norms(model: torch.nn.Module) -> None:
    """HF's LlamaRMSNorm upcasts to float32 even in a float64 model, so fp32 rounding would leak
    into float64 exactness tests (it does not commute with per-episode weighting). Swap in
    torch's nn.RMSNorm, which computes in the input dtype, with the same weight and eps."""
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "LlamaRMSNorm":
            norm = torch.nn.RMSNorm(mod.weight.shape[0], eps=mod.variance_epsilon, dtype=torch.float64)
            norm.weight.data.copy_(mod.weight.data)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, norm)


def tiny_gpt2(dtype=torch.float64, hidden=32, layers=2, seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                     tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).to(dtype).eval()
