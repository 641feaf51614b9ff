"""Write a random-weight Hugging Face model directory shaped like a real checkpoint, for timing runs offline.

No hub is reachable from the machines this project runs on, so the GPU check (benchmarks/gpu_check.sh)
times ``configs/gsm8k_qwen0.5b_ippo.yaml`` on a model with Qwen2.5-0.5B's architecture and random
weights. The tokenizer is a stand-in with the real vocabulary size: one token per character for
text, the chat special tokens and a chat template (the config formats prompts as chat), and filler
tokens ``<tN>`` for the rest of the vocabulary, so any id the random model samples decodes.

    python scripts/write_random_model.py /tmp/qwen-random                      # Qwen2.5-0.5B shape, bf16
    python scripts/write_random_model.py /tmp/tiny --preset tiny-qwen --dtype float32   # CPU rehearsal
    python scripts/write_random_model.py /tmp/llama --preset llama-3-8b        # 16 GB of random weights

The weights are random (seeded) and the tokenizer is not the model's: useful for speed and memory,
meaningless for accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# Architectures as in the public config.json files (no weights involved).
PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500_000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False},
    # the same code path at CPU size (GPU_CHECK_CPU=1 rehearsals, tests)
    "tiny-qwen": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 2048, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True},
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad / bos, chat turn start, end of turn = eos
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ #+-*/=.,:;?!()$%'\"<>_\n")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def stand_in_tokenizer(vocab_size: int):
    """Characters + chat specials + fillers up to ``vocab_size`` ids; eos = <|im_end|>, pad = <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + ["<unk>"])}
    if vocab_size < len(vocab):
        raise SystemExit(f"vocab_size={vocab_size} is smaller than the stand-in's {len(vocab)} base tokens")
    vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                 pad_token=SPECIALS[0], unk_token="<unk>",
                                 additional_special_tokens=SPECIALS[1:2])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def write(out_dir: str | Path, preset: str = "qwen2.5-0.5b", dtype: str = "bfloat16", seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    arch = dict(PRESETS[preset])
    tok = stand_in_tokenizer(arch["vocab_size"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    cfg = AutoConfig.for_model(arch.pop("model_type"), **arch, bos_token_id=ids["<|endoftext|>"],
                               eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 0.5B params: seconds on a GPU
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = write(args.out_dir, args.preset, args.dtype, args.seed)
    print(f"wrote a random {args.preset} ({args.dtype}) to {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
