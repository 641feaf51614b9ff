"""LoRA's target modules default per architecture (PEFT's own mapping); names that match nothing are an
ippo error naming model.lora_target_modules, not PEFT's."""

from __future__ import annotations

import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

from ippo.rl.config import ConfigError, ModelConfig
from ippo.rl.models import load_policy, load_value_model, lora_target_modules

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(out)
    return out


def _adapted(model) -> set[str]:
    """Names of the modules that carry a LoRA adapter, without the PEFT prefix."""
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A")}


def test_default_targets_follow_the_architecture(tiny_gpt2_dir, tiny_model_dir):
    cfg = ModelConfig(path="x", lora=True, lora_r=2)
    assert cfg.lora_target_modules is None
    gpt2 = load_policy(cfg, str(tiny_gpt2_dir), CPU)
    assert _adapted(gpt2) == set(PEFT_DEFAULTS["gpt2"]) == {"c_attn"}
    assert _adapted(load_value_model(cfg, str(tiny_gpt2_dir), CPU).backbone) == {"c_attn"}
    llama = load_policy(cfg, str(tiny_model_dir), CPU)
    assert _adapted(llama) == set(PEFT_DEFAULTS["llama"])


def test_explicit_targets_that_match_nothing_name_the_option(tiny_gpt2_dir, tiny_model_dir):
    cfg = ModelConfig(path="x", lora=True, lora_r=2, lora_target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"model\.lora_target_modules=\['q_proj', 'v_proj'\] matches no module.*"
                                          r"c_attn, c_fc, c_proj"):
        load_policy(cfg, str(tiny_gpt2_dir), CPU)
    cfg.lora_target_modules = ["c_attn", "c_proj"]
    assert _adapted(load_policy(cfg, str(tiny_gpt2_dir), CPU)) == {"c_attn", "c_proj"}
    cfg.lora_target_modules = ["up_proj"]
    assert _adapted(load_policy(cfg, str(tiny_model_dir), CPU)) == {"up_proj"}


def test_architecture_without_a_peft_default_names_the_option():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Conf", (), {"model_type": "my-own-arch"})()
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.out_layer = torch.nn.Linear(4, 2)

    with pytest.raises(ConfigError, match=r"model\.lora_target_modules: PEFT has no default .*'my-own-arch'.*"
                                          r"0, out_layer"):
        lora_target_modules(Custom(), ModelConfig(path="x", lora=True))
