"""Prompt datasets: question/answer rows (GSM8K style) from JSONL, parquet or ``datasets``, checked up front.

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

from ippo.rl.rewards import gold_final_answer


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


# single data files read through `datasets` (its packaged builders; no loading script ever runs)
DATASETS_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
ROLE_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # a DatasetDict's split per role


def load_split(data_cfg, role: str, max_rows: int = 0) -> list[Example]:
    """The ``role`` split ("train" | "val" | "test") that ``data_cfg`` (a ``DataConfig``) names."""
    if role not in ROLE_SPLITS:
        raise ValueError(f"role must be one of {sorted(ROLE_SPLITS)}, got {role!r}")
    return load_examples(getattr(data_cfg, f"{role}_path"), split=getattr(data_cfg, f"{role}_split"),
                         default_split=ROLE_SPLITS[role], question_field=data_cfg.question_field,
                         answer_field=data_cfg.answer_field, strip_calculator=data_cfg.strip_calculator,
                         max_rows=max_rows, streaming=data_cfg.streaming, key=f"data.{role}_path")


def load_examples(path: str | Path, split: str = "", default_split: str = "train", question_field: str = "question",
                  answer_field: str = "answer", strip_calculator: bool = True, max_rows: int = 0,
                  streaming: bool = False, key: str = "data path") -> list[Example]:
    """Read and validate question/answer rows from any supported source; all bad rows reported at once.

    ``path``: a JSONL file (any file whose suffix is not one of the next ones: read line by line,
    without importing ``datasets``); a ``.parquet``/``.json``/``.csv``/``.arrow`` file; a directory written by
    ``datasets``' ``save_to_disk`` (read with ``load_from_disk``); or any other directory, read as a
    script-free dataset repository (data files such as ``data/train-*.parquet``, splits inferred
    from the file names, by ``datasets.load_dataset(path)``, offline). ``split`` picks a split of a
    multi-split source ("" = the only one, else ``default_split``). ``question_field`` /
    ``answer_field`` name the columns. ``max_rows`` > 0 stops after that many rows.
    ``streaming``: rows are read lazily from the files (``load_dataset(..., streaming=True)``), so
    with ``max_rows`` only the first rows are ever read, and no Arrow cache copy of the data is
    written; without it, ``datasets`` first converts a file or repository into its Arrow cache
    (once; memory-mapped, reused by later runs). ``load_from_disk`` directories are memory-mapped
    either way. The rows kept are held in memory as ``Example``s (the sampler draws from all of them).
    Bad rows are named by line number (JSONL, from 1) or row index (``datasets`` sources, from 0).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p} ({key})")
    fields = (question_field, answer_field)
    if p.is_file() and p.suffix.lower() not in DATASETS_FILE_BUILDERS:  # JSONL (any other suffix too)
        return _build(p, _jsonl_rows(p), fields, strip_calculator, max_rows, f"{p}:")
    ds, where = _open_with_datasets(p, split, default_split, streaming, key)
    columns = getattr(ds, "column_names", None)
    if columns is not None:  # a column that is not there at all: name the config key, not every row
        missing = [(f, k) for f, k in zip(fields, ("data.question_field", "data.answer_field")) if f not in columns]
        if missing:
            raise DataError(f"{where} has no column(s) {', '.join(repr(f) for f, _ in missing)} "
                            f"(columns: {', '.join(columns)}): set {', '.join(k for _, k in missing)}")
        ds = ds.select_columns(list(dict.fromkeys(fields)))
    return _build(where, _dataset_rows(ds, where), fields, strip_calculator, max_rows, f"{where} row ")


def load_jsonl(path: str | Path, strip_calculator: bool = True, max_rows: int = 0, question_field: str = "question",
               answer_field: str = "answer") -> list[Example]:
    """Read and validate a question/answer JSONL file (the fast path of ``load_examples``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    return _build(p, _jsonl_rows(p), (question_field, answer_field), strip_calculator, max_rows, f"{p}:")


def _jsonl_rows(p: Path):
    """(line number, object or an error message) for every non-blank line."""
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, f"not UTF-8 text (byte {e.start + 1} of the line is {raw[e.start]:#04x})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, f"not valid JSON ({e.msg})"
                continue
            yield lineno, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"


def _dataset_rows(ds, where: str):
    """(row index, row dict) of a Dataset / IterableDataset; a read error names the source and row."""
    it, i = iter(ds), 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # a streamed file that turns out corrupt part-way
            raise DataError(f"cannot read {where} at row {i}: {_reason(e)}") from e
        yield i, row
        i += 1


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _build(source, rows, fields: tuple[str, str], strip_calculator: bool, max_rows: int, prefix: str) -> list[Example]:
    """Examples from (position, row dict | error message) pairs; every bad row listed in one DataError."""
    q_field, a_field = fields
    out: list[Example] = []
    errors: list[str] = []
    for pos, obj in rows:
        if isinstance(obj, str):
            errors.append(f"{prefix}{pos}: {obj}")
            continue
        bad = [k for k in fields if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if bad:
            errors.append(f"{prefix}{pos}: missing or empty string field(s): {', '.join(dict.fromkeys(bad))}")
            continue
        sol = obj[a_field]
        if strip_calculator:
            sol = re.sub(r"<<[^<>]*>>", "", sol)
        out.append(Example(len(out), obj[q_field].strip(), sol.strip(), gold_final_answer(obj[a_field])))
        if max_rows and len(out) >= max_rows:
            break
    if errors:
        more = f"\n... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} bad row(s) in {source}:\n" + "\n".join(errors[:10]) + more)
    if not out:
        raise DataError(f"{source} has no rows")
    return out


def _open_with_datasets(p: Path, split: str, default_split: str, streaming: bool, key: str):
    """(a datasets Dataset / IterableDataset, a description naming path and split) for a non-JSONL source."""
    try:
        import datasets
    except ImportError as e:  # datasets is a requirement, but the JSONL path runs without it
        raise DataError(f"{p} ({key}): reading parquet files and dataset directories needs `pip install datasets`") from e
    try:
        if p.is_file():
            ds = datasets.load_dataset(DATASETS_FILE_BUILDERS[p.suffix.lower()], data_files=str(p), streaming=streaming)
        elif (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(str(p), streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # a corrupt file, an empty directory...: name the source, keep the library's reason
        if "corresponds to no data" in str(e) or _zero_rows(p):  # how datasets reports a split without rows
            raise DataError(f"{p} ({key}) has no rows") from e
        raise DataError(f"cannot read {p} ({key}) with datasets: {_reason(e)}") from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds)
        chosen = split or (names[0] if len(names) == 1 else default_split)
        if chosen not in ds:
            which = key.replace("_path", "_split") if key.startswith("data.") else "split"
            raise DataError(f"{p} ({key}) has no split {chosen!r} (splits: {', '.join(names) or 'none'}): set {which}")
        return ds[chosen], f"{p} [{chosen}]"
    if split and split != getattr(ds, "split", None):
        raise DataError(f"{p} ({key}) is a single dataset without splits: leave the split empty, not {split!r}")
    return ds, str(p)


def _zero_rows(p: Path) -> bool:
    """A parquet file that holds a schema but no row (datasets fails on it with a batch-size error)."""
    if not (p.is_file() and p.suffix.lower() == ".parquet"):
        return False
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows == 0
    except Exception:  # noqa: BLE001  -- not readable as parquet at all: the caller reports datasets' reason
        return False


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
