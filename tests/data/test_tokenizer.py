"""Tokenizers trained on task text: exact round trips, single-digit tokens, special ids, save/reload, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.data.arith import make_splits
from kdlab.data.tokenizer import train_tokenizer

GSM8K_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


def _text(example: dict) -> str:
    return f"Question: {example['question']}\nAnswer: {example['answer']}"


@pytest.fixture(scope="module")
def arith_texts() -> list[str]:
    splits = make_splits(2000, 100, seed=0)
    return [_text(e) for e in splits["train"]]


@pytest.fixture(scope="module")
def held_out_texts() -> list[str]:
    return [_text(e) for e in make_splits(2000, 100, seed=0)["validation"]]


@pytest.fixture(scope="module")
def bpe(arith_texts):
    return train_tokenizer(arith_texts, vocab_size=384)


@pytest.fixture(scope="module")
def unigram(arith_texts):
    return train_tokenizer(arith_texts, vocab_size=300, kind="unigram")


def _gsm8k_texts(limit: int | None = None) -> list[str]:
    path = GSM8K_DIR / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with path.open(encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    return [_text(e) for e in examples[:limit]]


def test_bpe_vocab_and_special_ids(bpe):
    assert len(bpe) == 384
    assert [bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id, bpe.unk_token_id] == [0, 1, 2, 3]
    assert bpe.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert bpe.padding_side == "left"


def test_no_special_tokens_are_added(bpe, unigram):
    for tok in (bpe, unigram):
        ids = tok.encode("Mia has 12 apples.")
        assert not {0, 1, 2, 3} & set(ids)
        assert tok("Mia has 12 apples.")["input_ids"] == ids


def test_bpe_round_trip_on_arith_text(bpe, held_out_texts):
    for text in held_out_texts:
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_round_trip_on_any_utf8(bpe):
    for text in ["", " leading and trailing ", "tabs\tand\n\nnewlines\r\n", "Janet’s ducks: 16 × 2 = 32 €, 日本語 🙂",
                 "  two  spaces", "\x00\x7f"]:
        assert bpe.decode(bpe.encode(text)) == text
        assert bpe.unk_token_id not in bpe.encode(text)


def test_bpe_round_trip_on_real_gsm8k(bpe):
    texts = _gsm8k_texts()
    assert len(texts) > 1000
    for text in texts:
        assert bpe.decode(bpe.encode(text)) == text


def test_digits_are_single_tokens(bpe, unigram):
    for tok in (bpe, unigram):
        ids = tok.encode("She has 1234 + 56 = 1290 apples.")
        tokens = [tok.decode([i]) for i in ids]
        digit_tokens = [t for t in tokens if any(ch.isdigit() for ch in t)]
        assert all(len(t.strip()) == 1 for t in digit_tokens), digit_tokens
        assert "".join(t.strip() for t in digit_tokens) == "1234561290"


def test_padding_is_on_the_left_with_pad_id(bpe):
    batch = bpe(["a", "Mia has 12 apples."], padding=True)
    short = batch["input_ids"][0]
    assert short[0] == bpe.pad_token_id and short[-1] != bpe.pad_token_id
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_save_and_reload_offline(tmp_path, kind, bpe, unigram, held_out_texts):
    from transformers import AutoTokenizer

    tok = {"bpe": bpe, "unigram": unigram}[kind]
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tok.get_vocab()
    assert reloaded.padding_side == "left"
    assert [reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id, reloaded.unk_token_id] == [0, 1, 2, 3]
    for text in held_out_texts[:20]:
        ids = tok.encode(text)
        assert reloaded.encode(text) == ids
        assert reloaded.decode(ids) == text


@pytest.mark.parametrize("kind,size", [("bpe", 384), ("unigram", 300)])
def test_training_is_deterministic(arith_texts, kind, size):
    first = train_tokenizer(arith_texts[:500], vocab_size=size, kind=kind)
    second = train_tokenizer(arith_texts[:500], vocab_size=size, kind=kind)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_unigram_round_trip_on_arith_text(unigram, held_out_texts):
    assert len(unigram) == 300
    assert [unigram.pad_token_id, unigram.bos_token_id, unigram.eos_token_id, unigram.unk_token_id] == [0, 1, 2, 3]
    for text in held_out_texts + ["a\nb\n\n  c  ", " leading space", "odd ASCII: {~|^`}\t@"]:
        ids = unigram.encode(text)
        assert unigram.unk_token_id not in ids, text
        assert unigram.decode(ids) == text


def test_vocab_sizes_differ_between_kinds(arith_texts):
    bpe = train_tokenizer(arith_texts[:500], vocab_size=400, kind="bpe")
    unigram = train_tokenizer(arith_texts[:500], vocab_size=250, kind="unigram")
    assert len(bpe) == 400
    assert len(unigram) == 250


def test_unknown_kind_and_tiny_vocab_are_errors(arith_texts):
    with pytest.raises(ValueError, match="bpe, unigram"):
        train_tokenizer(arith_texts[:10], kind="wordpiece")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(arith_texts[:10], vocab_size=100, kind="bpe")
