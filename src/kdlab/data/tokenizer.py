"""Train a small tokenizer on task text, offline, with the `tokenizers` library.

Models trained from scratch on the arith task (and GSM8K-like text) need a vocabulary of their own: a few hundred
tokens keep the embedding tables small and the sequences short enough. Two kinds:

``"bpe"`` (default): byte-level BPE. Text is first split so that every digit is its own piece
    (``Digits(individual_digits=True)``: numbers are read digit by digit, which is what makes multi-digit
    arithmetic learnable), then mapped to bytes (``ByteLevel(add_prefix_space=False, use_regex=True)``). All 256
    byte symbols are in the vocabulary, so *any* UTF-8 text encodes without an unknown token and
    ``decode(encode(text)) == text`` exactly.
``"unigram"``: a Unigram language model over characters, with the same digit split and a ``Metaspace``
    pre-tokenizer/decoder (spaces become ``▁`` and come back on decoding; newlines and tabs are kept as ordinary
    characters, so they round-trip too). Printable ASCII is always in the vocabulary, so ASCII text round-trips;
    characters that were absent from the training text and are not ASCII become ``<unk>``.

Special tokens ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` get ids 0, 1, 2, 3. Nothing is inserted automatically:
``encode`` returns just the text's tokens and the caller appends ``eos_token_id`` where it wants one. Padding is
on the left (decoder-only generation). Training is deterministic: the same texts give the same vocabulary and ids
(the Unigram trainer is not, by itself: see `_canonical_unigram`).
"""

from __future__ import annotations

import itertools
import json
import string
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["KINDS", "SPECIAL_TOKENS", "train_tokenizer"]

KINDS = ("bpe", "unigram")
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order

METASPACE = "\u2581"
# Characters the unigram model always knows: printable ASCII with tab and newline (space is written as METASPACE).
_UNIGRAM_ALPHABET = sorted((set(string.printable) - {"\x0b", "\x0c", "\r", " "}) | {METASPACE})
# Fed to the Unigram trainer as one extra text, so that every alphabet character is a learned piece.
_ALPHABET_TEXT = " ".join(_UNIGRAM_ALPHABET)
_SCORE_DECIMALS = 6  # unigram log-probabilities are kept to this many decimals (see `_canonical_unigram`)
_FILLER_DELTA = 1e-4  # score step the Unigram trainer uses for characters it re-adds after pruning


def _bpe(vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    tokenizer = Tokenizer(models.BPE())  # byte-level: every byte has a token, so no unk_token is needed
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def _unigram(vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    tokenizer = Tokenizer(models.Unigram())
    # prepend_scheme="never": no space is invented before the first word, so decoding gives the text back exactly
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="never"),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        unk_token=UNK,
        show_progress=False,
    )
    return tokenizer, trainer


_BUILDERS = {"bpe": _bpe, "unigram": _unigram}


def _canonical_unigram(tokenizer: Tokenizer) -> None:
    """Give a trained Unigram model a reproducible set of scores and order of pieces (that is, of ids).

    `tokenizers`' Unigram trainer is not reproducible across processes, in two ways:
    1. it sums float scores in hash-map order, so the same pieces come out with scores that differ in the last
       bits, and so in a different order;
    2. single characters pruned during training are added back at the end with scores `min + k * 1e-4`, k taken
       in hash-set order, so *which* rare character gets which score changes from run to run.
    Here scores are rounded (1), the rare single characters at the bottom of the vocabulary, whose scores are
    within that `1e-4` ladder of the minimum, all get the minimum score (2), and pieces are sorted by
    (score descending, text). The set of pieces itself is the trainer's, which is the same on every run.
    """
    pieces = json.loads(tokenizer.to_str())["model"]["vocab"]
    special = {token: score for token, score in pieces if token in SPECIAL_TOKENS}
    rest = {token: score for token, score in pieces if token not in SPECIAL_TOKENS}
    lowest = min(rest.values())
    # The ladder: ascending single-character scores s_1 <= s_2 <= ... stay on it while s_j <= lowest + (j-1)*delta.
    # Its length depends only on the multiset of scores (the same on every run), so the threshold does too.
    threshold = lowest
    singles = sorted(score for token, score in rest.items() if len(token) == 1)
    for j, score in enumerate(singles):
        if score > lowest + j * _FILLER_DELTA + 1e-7:
            break
        threshold = score
    canonical = []
    for token, score in rest.items():
        if len(token) == 1 and score <= threshold + 1e-9:
            score = lowest
        canonical.append((token, round(score, _SCORE_DECIMALS)))
    canonical.sort(key=lambda item: (-item[1], item[0]))
    vocab = [(token, special[token]) for token in SPECIAL_TOKENS] + canonical
    tokenizer.model = models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384, kind: str = "bpe") -> PreTrainedTokenizerFast:
    """A tokenizer of `kind` ("bpe" or "unigram") with at most `vocab_size` tokens, trained on `texts`.

    The result is a `transformers.PreTrainedTokenizerFast` (pad/bos/eos/unk = ids 0/1/2/3, left padding, no
    automatic special tokens) that `save_pretrained` writes and `AutoTokenizer.from_pretrained` reloads offline.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    floor = len(SPECIAL_TOKENS) + (256 if kind == "bpe" else len(_UNIGRAM_ALPHABET))
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size} is too small for kind={kind!r}: it needs at least {floor} "
                         f"(special tokens plus the base alphabet)")
    tokenizer, trainer = _BUILDERS[kind](vocab_size)
    if kind == "unigram":
        texts = itertools.chain(texts, [_ALPHABET_TEXT])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if kind == "unigram":
        _canonical_unigram(tokenizer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        if actual != expected_id:  # the trainers put special tokens first; make a silent change loud
            raise RuntimeError(f"special token {token!r} got id {actual}, expected {expected_id}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )
