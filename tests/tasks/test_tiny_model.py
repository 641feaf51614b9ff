"""The character tokenizer and the bundled tiny arithmetic policy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from ippo.tasks import TINY_MODEL_DIR, arithmetic, load_tiny_model, model_task_spec, tiny_model_info
from ippo.tasks.gsm8k import load_gsm8k
from ippo.tasks.tokenizer import SPECIAL_TOKENS, VOCAB, build_tokenizer, word_tokens


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _task_text() -> str:
    ps = [p for s in arithmetic.SPLITS for p in arithmetic.generate(s, 300, seed=0)]
    return "".join(arithmetic.prompt(p) + p.solution for p in ps)


def test_round_trips_every_task_character(tok):
    text = _task_text()
    chars = "".join(sorted(set(text))) + "0123456789+-*/=<>#.,$%()"
    for s in (chars, text[:5000], "<<12*3=36>>36\n#### 36", "<<<a>>>", "##### 5"):
        ids = tok(s).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids, s
        assert tok.decode(ids, skip_special_tokens=True) == s


def test_round_trips_gsm8k_sample(tok):
    rows = load_gsm8k(TINY_MODEL_DIR.parent / "gsm8k_sample.jsonl")
    ascii_rows = [r for r in rows if (r.question + r.answer).isascii()]
    assert len(ascii_rows) >= 15  # the vocabulary is ASCII; typographic quotes become <unk>
    for r in ascii_rows:
        text = r.question + "\n" + r.answer
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_structure_tokens_and_specials(tok):
    ids = tok("<<1+2=3>>3\n#### 3", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[:1] == ["<<"] and "####" in tok.convert_ids_to_tokens(ids)
    assert len(ids) == len("<<1+2=3>>3\n#### 3") - 1 - 1 - 3
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert len(tok) == len(VOCAB)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS["eos"]) == tok.eos_token_id
    assert tok.decode(tok("\u00e9").input_ids, skip_special_tokens=True) == ""  # unknown -> <unk>


def test_save_and_reload_offline(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    s = "Q: Tom has 3 pens.\nA:\n<<3+1=4>>4\n#### 4"
    assert again(s).input_ids == tok(s).input_ids
    assert again.pad_token_id == tok.pad_token_id and again.padding_side == "left"
    batch = again(["ab", "abcd"], padding=True)
    assert batch.input_ids[0][:2] == [tok.pad_token_id] * 2  # left padding


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_tiny_model()


def test_bundled_files_are_safetensors_and_small():
    files = {f.name: f.stat().st_size for f in TINY_MODEL_DIR.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    assert sum(files.values()) < 10_000_000
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    tok_cfg = json.loads((TINY_MODEL_DIR / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too


def test_model_matches_build_info(tiny):
    model, tokenizer = tiny
    info = tiny_model_info()
    assert sum(p.numel() for p in model.parameters()) == info["param_count"]
    assert 1_000_000 <= info["param_count"] <= 5_000_000
    assert model.config.vocab_size == len(tokenizer)
    for key in ("seed", "settings", "train_time_s", "test_accuracy", "test_unfaithful_correct_rate"):
        assert key in info
    assert 0.0 < info["test_accuracy"] < 1.0
    assert info["test_unfaithful_correct_rate"] > 0.0


def test_model_generates_task_text(tiny):
    model, tokenizer = tiny
    problems = arithmetic.generate("test", 4, seed=0, spec=model_task_spec())
    enc = tokenizer([arithmetic.prompt(p) for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(texts) == 4
    # The SFT'd policy writes calculator steps; most greedy answers at least start one.
    assert sum("<<" in t for t in texts) >= 3, texts


def test_word_tokenizer_round_trips_and_shortens():
    spec = model_task_spec()
    tok = build_tokenizer(words=arithmetic.words(), max_number=spec.max_value)
    char = build_tokenizer()
    assert len(tok) == len(VOCAB) + len([t for t in word_tokens(arithmetic.words(), spec.max_value) if t not in VOCAB])
    ps = arithmetic.generate("test", 200, seed=0, spec=spec)
    n_word = n_char = 0
    for p in ps:
        text = arithmetic.prompt(p) + p.solution
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        n_word, n_char = n_word + len(ids), n_char + len(char(text).input_ids)
    assert n_word < 0.45 * n_char  # words and numbers are single tokens
    # numbers are whole tokens; beyond max_number and unknown words fall back to characters, exactly
    assert tok.convert_ids_to_tokens(tok("<<12+3=15>>15", add_special_tokens=False).input_ids) == [
        "<<", "12", "+", "3", "=", "15", ">>", "15"]
    for s in ("#### 123", "Bob hasx 51 zebras!", "a\n\n  b", "<<<7>>>"):
        assert tok.decode(tok(s).input_ids, skip_special_tokens=True) == s


def test_bundled_tokenizer_is_the_word_tokenizer(tiny):
    _, tokenizer = tiny
    spec = model_task_spec()
    want = build_tokenizer(words=arithmetic.words(), max_number=spec.max_value)
    assert tokenizer.get_vocab() == want.get_vocab()
    p = arithmetic.generate("test", 1, seed=0, spec=spec)[0]
    assert tokenizer(arithmetic.prompt(p)).input_ids == want(arithmetic.prompt(p)).input_ids


def test_bundled_model_has_headroom_and_a_habit():
    """What the demo relies on (scripts/build_tiny_model.py): greedy reads "times as many" as "+" most of
    the time while sampling often gets it right, and greedy answers carry the unfaithful habit."""
    info = tiny_model_info()
    assert info["task_spec"] == model_task_spec().to_dict()
    g, smp = info["test_greedy"], info["test_sampled"]
    assert 0.4 < g["accuracy"] < 0.75 and g["times_as_many_read_as_plus"] > 0.6
    assert smp["pass@8"] > 0.85 and smp["groups_with_reward_variance"] > 0.6
    assert g["unfaithful_correct_rate"] > 0.03
