"""Prompt datasets: JSONL rows with ``question`` and ``answer`` (GSM8K style), checked up front.

Also the seeded orders the trainer uses: which prompts an iteration trains on and which
validation examples it scores against are pure functions of (seed, iteration), so a resumed run
sees exactly the data an uninterrupted run would have seen, with no sampler state to restore.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ippo.rewards import gold_final_answer


class DataError(ValueError):
    """A dataset that cannot be used (missing file, bad rows); raised before any compute."""


@dataclass
class Example:
    idx: int  # row index in its split
    question: str
    solution: str  # full gold solution (SFT target for the validation gradient)
    gold: str  # final answer (reward target)


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (independent of PYTHONHASHSEED)."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def load_jsonl(path: str | Path, strip_calculator: bool = True, max_rows: int = 0) -> list[Example]:
    """Read and validate a question/answer JSONL file. All bad rows are reported at once."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    rows: list[Example] = []
    errors: list[str] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{p}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            bad = [k for k in ("question", "answer") if not isinstance(obj.get(k), str) or not obj[k].strip()]
            if bad:
                errors.append(f"{p}:{lineno}: missing or empty string field(s): {', '.join(bad)}")
                continue
            sol = obj["answer"]
            if strip_calculator:
                sol = re.sub(r"<<[^<>]*>>", "", sol)
            rows.append(Example(len(rows), obj["question"].strip(), sol.strip(), gold_final_answer(obj["answer"])))
            if max_rows and len(rows) >= max_rows:
                break
    if errors:
        more = f"\n... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} bad row(s) in {p}:\n" + "\n".join(errors[:10]) + more)
    if not rows:
        raise DataError(f"{p} has no rows")
    return rows


class PromptFormatter:
    """question -> prompt text / token ids; (question, solution) -> SFT ids with prompt labels masked."""

    def __init__(self, tokenizer, template: str, chat_template: bool = False):
        self.tok = tokenizer
        self.template = template
        self.chat = chat_template
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template=true but the tokenizer has no chat template")

    def prompt_text(self, question: str) -> str:
        text = self.template.replace("{question}", question)
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        return text

    def prompt_ids(self, question: str) -> list[int]:
        return self.tok(self.prompt_text(question), add_special_tokens=not self.chat).input_ids

    def sft_ids(self, question: str, solution: str) -> tuple[list[int], list[int]]:
        """input ids and labels (-100 on the prompt) for ``prompt + solution + eos``."""
        p = self.prompt_ids(question)
        sep = "" if self.prompt_text(question)[-1:].isspace() else " "
        s = self.tok(sep + solution, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
        return p + s, [-100] * len(p) + s


def check_prompt_lengths(examples: list[Example], fmt: PromptFormatter, max_tokens: int, split: str) -> None:
    too_long = [(e.idx, n) for e in examples if (n := len(fmt.prompt_ids(e.question))) > max_tokens]
    if too_long:
        show = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:5])
        raise DataError(f"{len(too_long)} {split} prompt(s) exceed data.max_prompt_tokens={max_tokens}: {show}")


def iteration_prompts(n_rows: int, batch: int, seed: int, iteration: int) -> list[int]:
    """Global row indices of iteration ``iteration``'s prompts: epochs of seeded permutations."""
    out, perms = [], {}
    for pos in range(iteration * batch, (iteration + 1) * batch):
        epoch, k = divmod(pos, n_rows)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng(derive_seed(seed, "data", epoch)).permutation(n_rows)
        out.append(int(perms[epoch][k]))
    return out


def iteration_val_indices(n_rows: int, n_val: int, seed: int, iteration: int) -> list[int]:
    """The validation examples drawn at random (without replacement) for this iteration."""
    rng = np.random.default_rng(derive_seed(seed, "val", iteration))
    return sorted(int(i) for i in rng.choice(n_rows, size=min(n_val, n_rows), replace=False))


def pad_batch(seqs: list[list[int]], pad: int, side: str = "right") -> torch.Tensor:
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, :len(s)] = torch.tensor(s)
        else:
            out[i, n - len(s):] = torch.tensor(s)
    return out
