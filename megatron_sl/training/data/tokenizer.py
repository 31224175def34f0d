"""Sentencepiece tokenizer: train a BPE on a corpus, or load a given ``.model``.

Owns :class:`SentencePieceTokenizer` (the small object megatron's ``GPTDataset`` needs --
``vocab_size``, ``eod``, ``pad``, ``unique_identifiers`` -- plus encode/decode),
:func:`train_bpe_tokenizer` and :func:`load_tokenizer`.

Trained models use the LLaMA id layout (``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece, so
``pad`` is -1) with byte fallback, identity normalisation and whitespace kept as is, so
``decode(encode(text)) == text`` for any UTF-8 text and a real LLaMA ``tokenizer.model`` goes
through the same code. ``eod`` (end of document, appended between documents) is the eos id.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from megatron_sl.training.data.errors import DataError
from megatron_sl.training.checkpoint.atomic import atomic_write

DEFAULT_VOCAB_SIZE = 8000
MIN_VOCAB_SIZE = 300  # 3 specials + 256 byte-fallback pieces + some merges
LLAMA_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
BPE_TRAINER_OPTIONS = {
    "model_type": "bpe",
    "character_coverage": 1.0,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "input_sentence_size": 2_000_000,
    "shuffle_input_sentence": True,
    "max_sentence_length": 1 << 16,  # re-flowed paragraphs exceed the default 4192 bytes
    "minloglevel": 2,
}


class SentencePieceTokenizer:
    """A loaded sentencepiece model with the attributes megatron's datasets read."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model {str(self.path)!r} does not exist")
        payload = self.path.read_bytes()
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(payload)
        except (RuntimeError, OSError) as err:
            raise DataError(f"tokenizer model {str(self.path)!r} is not a sentencepiece model: {err}") from err
        self.sha256 = hashlib.sha256(payload).hexdigest()
        self.vocab_size = self.processor.GetPieceSize()
        self.bos, self.eos, self.unk = self.processor.bos_id(), self.processor.eos_id(), self.processor.unk_id()
        self.pad = self.processor.pad_id()
        if self.eos < 0:
            raise DataError(f"tokenizer model {str(self.path)!r} has no eos piece, needed as end-of-document")
        self.eod = self.eos
        # hashed by megatron into its index-cache key: different tokenizers never share a cache
        self.unique_identifiers = {"class": type(self).__name__, "sha256": self.sha256,
                                   "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return self.processor.Encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.processor.Encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.Decode([int(i) for i in ids])

    # megatron's tokenizer method names
    tokenize = encode
    detokenize = decode

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer:
    """Load a sentencepiece ``.model`` (ours, LLaMA's, T5's); :class:`DataError` names a bad path."""
    return SentencePieceTokenizer(path)


class _SentenceFeed:
    """Non-empty lines of ``texts``; an exception while reading is kept (sentencepiece would wrap
    it into an opaque RuntimeError) and the feed just ends, for the caller to re-raise."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.error = texts, None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self.texts:
                for line in text.split("\n"):
                    if line.strip():
                        yield line
        except Exception as err:  # noqa: BLE001 - re-raised by train_bpe_tokenizer
            self.error = err


def train_bpe_tokenizer(texts: Iterable[str], output_path: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                        num_threads: int = 2, seed: int = 1234) -> SentencePieceTokenizer:
    """Train a byte-fallback BPE with LLaMA special ids on ``texts``; write ``output_path`` atomically.

    Each non-empty line of each text is one training sentence (so paragraph breaks are encoded
    with the byte pieces of ``\\n``).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE}")
    output_path = Path(output_path)
    spm.set_random_generator_seed(seed)
    model, feed = io.BytesIO(), _SentenceFeed(texts)
    try:
        spm.SentencePieceTrainer.Train(sentence_iterator=iter(feed), model_writer=model,
                                       vocab_size=vocab_size, num_threads=num_threads,
                                       **LLAMA_SPECIAL_IDS, **BPE_TRAINER_OPTIONS)
    except RuntimeError as err:
        if feed.error is not None:
            raise feed.error from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece BPE on this corpus: {reason}") from err
    if feed.error is not None:
        raise feed.error
    with atomic_write(output_path, "wb") as handle:
        handle.write(model.getvalue())
    return SentencePieceTokenizer(output_path)
