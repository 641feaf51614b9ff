"""A character-level tokenizer built locally, as a Hugging Face ``PreTrainedTokenizerFast``.

Why: the bundled tiny model must load and train with no hub access, and the trainer
should not care that it is tiny -- it uses the same ``tokenizer(...)``, ``decode``,
``pad_token_id``, ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` calls it would
use for a real model. One token per character keeps arithmetic digit-aligned (easy for a
1-5M-parameter model); ``<<``, ``>>`` and ``####`` get tokens of their own because they
structure every solution.

Every encoding starts with ``<s>`` (added by the post-processor); generation pads on the
left; ``<pad>`` differs from ``</s>`` so padding never teaches the model to stop.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "VOCAB", "build_tokenizer"]

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
_MULTI = ["<<", ">>", "####"]
# Printable ASCII (space .. ~) and newline: every character of the task and of GSM8K's
# ASCII text. Other characters map to <unk>.
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB: list[str] = list(SPECIAL_TOKENS.values()) + _MULTI + _CHARS
assert len(set(VOCAB)) == len(VOCAB)
assert set(string.digits) <= set(VOCAB)


def _pattern() -> str:
    # Longest multi-character tokens first, then any single character (newline included).
    return "####|<<|>>|[\\s\\S]"


def build_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the character tokenizer from scratch (no files, no network)."""
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_pattern()), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
