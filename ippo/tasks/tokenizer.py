"""A character-level tokenizer built locally, as a Hugging Face ``PreTrainedTokenizerFast``,
optionally with whole-word and whole-number tokens.

Why: the bundled tiny model must load and train with no hub access, and the trainer
should not care that it is tiny -- it uses the same ``tokenizer(...)``, ``decode``,
``pad_token_id``, ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` calls it would
use for a real model. One token per character keeps arithmetic digit-aligned (easy for a
1-5M-parameter model); ``<<``, ``>>`` and ``####`` get tokens of their own because they
structure every solution.

``build_tokenizer(words=..., max_number=...)`` adds tokens for the given words (with and without
a leading space) and the numbers 0..max_number: the bundled model uses the task's ~55 words and
numbers up to its ``max_value``, which makes prompts 4x shorter than characters (generation, the
update and scoring cost per token) and turns each arithmetic step into one token to predict.
Anything else still falls back to characters, so every ASCII text round-trips exactly.

Every encoding starts with ``<s>`` (added by the post-processor); generation pads on the
left; ``<pad>`` differs from ``</s>`` so padding never teaches the model to stop.
"""

from __future__ import annotations

import re
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


def _pattern(extra: list[str] = ()) -> str:
    # Longest multi-character tokens first (regex alternation takes the first that matches), then any
    # single character (newline included).
    multi = sorted(set(_MULTI) | set(extra), key=lambda t: (-len(t), t))
    return "|".join(re.escape(t) for t in multi) + "|[\\s\\S]"


def word_tokens(words: list[str], max_number: int) -> list[str]:
    """The extra tokens of a word-level vocabulary: each word and number, bare and after a space."""
    pieces = list(dict.fromkeys(list(words) + [str(n) for n in range(max_number + 1)]))
    return [t for w in pieces for t in (w, " " + w) if len(t) > 1]


def build_tokenizer(model_max_length: int = 512, words: list[str] | None = None,
                    max_number: int = -1) -> PreTrainedTokenizerFast:
    """Build the tokenizer from scratch (no files, no network): characters, plus whole ``words`` and the
    numbers 0..``max_number`` when given (``-1``: none)."""
    extra = word_tokens(words or [], max_number) if (words or max_number >= 0) else []
    extra = [t for t in extra if t not in VOCAB]
    vocab = {tok: i for i, tok in enumerate(VOCAB + extra)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_pattern(extra)), behavior="isolated")
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
