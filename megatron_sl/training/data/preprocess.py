"""JSONL -> sentencepiece -> megatron indexed ``.bin/.idx``: the work behind ``megatron-sl prepare-data``.

Owns :func:`prepare_indexed_dataset` (the demo corpus is prepared through it by
``megatron_sl.corpus.prepare_demo_data``). Outputs for ``--output-prefix
out/name``:

* ``out/name_text_document.{bin,idx}`` -- one sequence per document, ``eod`` appended
  (megatron's GPT convention), uint16 when the vocabulary has fewer than 65 500 pieces;
* ``out/name_tokenizer.model`` -- only when the tokenizer was trained here;
* ``out/name_text_document.meta.json`` -- counts, tokenizer path and sha256 (checked by
  ``build_datasets``), inputs, timings.

Every argument is checked before any work; everything is written under hidden temporary names,
verified by reopening with megatron's ``IndexedDataset``, then renamed into place, so a failure
leaves nothing behind (directories this call created are removed again when empty).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from megatron_sl.training.data.errors import DataError
from megatron_sl.training.checkpoint.atomic import atomic_write, remove_quietly, temp_path_for
from megatron_sl.training.data.fsutil import check_writable_dir, file_lock
from megatron_sl.training.data.indexed_format import inspect_indexed_dataset, max_token_id
from megatron_sl.training.data.jsonl import TextStream, resolve_inputs
from megatron_sl.training.data.mcore import megatron_datasets
from megatron_sl.training.data.tokenizer import (DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE, SentencePieceTokenizer,
                                                 load_tokenizer, train_bpe_tokenizer)

logger = logging.getLogger(__name__)

META_FORMAT = "megatron-sl/indexed-text/v1"
ENCODE_BATCH_CHARS = 4 << 20  # texts handed to sentencepiece per batch


@dataclass(frozen=True)
class PreparedData:
    """What ``prepare-data`` wrote; ``prefix`` is what ``build_datasets`` takes."""

    prefix: Path  # <output-prefix>_text_document (no extension)
    tokenizer_model: Path
    documents: int
    tokens: int
    text_bytes: int
    dtype: str
    vocab_size: int
    seconds: float  # whole call, imports and tokenizer training included
    encode_seconds: float  # tokenizing and writing only

    @property
    def bytes_per_token(self) -> float:
        return self.text_bytes / max(self.tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.encode_seconds, 1e-9)

    def summary(self) -> str:
        return (f"{self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}, vocab {self.vocab_size}), "
                f"{self.bytes_per_token:.2f} bytes/token, {self.tokens_per_s:,.0f} tokens/s encoding, "
                f"{self.seconds:.1f} s in all -> {self.prefix}.{{bin,idx}}")

    @classmethod
    def from_meta(cls, meta_path: Path) -> "PreparedData":
        meta = json.loads(Path(meta_path).read_text())
        prefix = Path(str(meta_path)[: -len(".meta.json")])
        return cls(prefix=prefix, tokenizer_model=(prefix.parent / meta["tokenizer_model"]).resolve(),
                   documents=meta["documents"], tokens=meta["tokens"], text_bytes=meta["text_bytes"],
                   dtype=meta["dtype"], vocab_size=meta["vocab_size"], seconds=meta["seconds"],
                   encode_seconds=meta["encode_seconds"])


def output_paths(output_prefix: str | Path) -> dict[str, Path]:
    """The files ``prepare-data --output-prefix output_prefix`` writes."""
    base = str(output_prefix)
    return {"bin": Path(f"{base}_text_document.bin"), "idx": Path(f"{base}_text_document.idx"),
            "meta": Path(f"{base}_text_document.meta.json"), "tokenizer": Path(f"{base}_tokenizer.model")}


def _check_output_prefix(output_prefix: str | Path) -> Path:
    text = str(output_prefix)
    if not text or text.endswith(os.sep) or Path(text).is_dir() or Path(text).name in ("", ".", ".."):
        raise DataError(f"output prefix {text!r} must end in a file-name stem, e.g. out/corpus")
    prefix = Path(text)
    check_writable_dir(prefix.parent, "output directory of prefix")
    return prefix


def _batches(texts: Iterable[str], max_chars: int) -> Iterable[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _verify(tmp_prefix: Path, tokenizer: SentencePieceTokenizer, documents: int, tokens: int,
            first_text: str, append_eod: bool) -> int:
    """Reopen with megatron's IndexedDataset and check counts, id range and the first document."""
    info = inspect_indexed_dataset(tmp_prefix)
    dataset = megatron_datasets().IndexedDataset(str(tmp_prefix))
    problems = []
    if len(dataset) != documents or info.documents != documents:
        problems.append(f"{len(dataset)} sequences / {info.documents} documents, expected {documents}")
    if int(dataset.sequence_lengths.sum()) != tokens:
        problems.append(f"{int(dataset.sequence_lengths.sum())} tokens, expected {tokens}")
    top = max_token_id(info)
    if top >= tokenizer.vocab_size:
        problems.append(f"token id {top} >= vocab size {tokenizer.vocab_size}")
    first = dataset[0].tolist()
    if append_eod:
        if first[-1] != tokenizer.eod:
            problems.append("first document does not end with eod")
        first = first[:-1]
    if tokenizer.decode(first) != first_text:
        problems.append("first document does not decode back to its text")
    if problems:
        raise DataError(f"verification of {tmp_prefix}.{{bin,idx}} failed: " + "; ".join(problems))
    return top


def prepare_indexed_dataset(inputs: list[str], output_prefix: str | Path, json_key: str = "text",
                            tokenizer_model: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                            append_eod: bool = True, workers: int = 1, max_docs: int | None = None,
                            extra_meta: dict | None = None) -> PreparedData:
    """Tokenize the ``json_key`` texts of JSONL ``inputs`` into ``<output_prefix>_text_document.{bin,idx}``.

    Trains a ``vocab_size`` BPE on the inputs unless ``tokenizer_model`` is given. ``workers`` is
    the number of sentencepiece threads. Raises :class:`DataError` (naming the bad value) for bad
    arguments before any work, and for an empty corpus or failed verification after it; in every
    failure case nothing is left on disk.
    """
    start = time.perf_counter()
    # ---- all checks first ----------------------------------------------------------------
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers must be a positive integer, got {workers!r}")
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise DataError(f"--max-docs must be a positive integer, got {max_docs!r}")
    if tokenizer_model is None and (not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE):
        raise DataError(f"--vocab-size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    paths = resolve_inputs(list(inputs), json_key)
    prefix = _check_output_prefix(output_prefix)
    tokenizer = load_tokenizer(tokenizer_model) if tokenizer_model is not None else None
    outputs = output_paths(prefix)

    # ---- work, under temporary names -----------------------------------------------------
    created_dirs = [d for d in [prefix.parent, *prefix.parent.parents] if not d.exists()]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = temp_path_for(prefix.parent / f"{prefix.name}_text_document")
    tmp = {"bin": Path(f"{tmp_prefix}.bin"), "idx": Path(f"{tmp_prefix}.idx"),
           "tokenizer": temp_path_for(outputs["tokenizer"]), "meta": temp_path_for(outputs["meta"])}
    try:
        texts = TextStream(paths, json_key, max_docs)
        if tokenizer is None:
            t0 = time.perf_counter()
            try:
                tokenizer = train_bpe_tokenizer(texts, tmp["tokenizer"], vocab_size, num_threads=workers)
            except DataError:
                if texts.emitted == 0:
                    raise DataError(f"no non-empty {json_key!r} texts in {', '.join(map(str, paths))}") from None
                raise
            logger.info("trained a %d-piece BPE tokenizer in %.1f s", vocab_size, time.perf_counter() - t0)
        mc = megatron_datasets()
        dtype = mc.DType.optimal_dtype(tokenizer.vocab_size)
        t_encode = time.perf_counter()
        builder = mc.IndexedDatasetBuilder(str(tmp["bin"]), dtype=dtype)
        documents = tokens = text_bytes = 0
        first_text = None
        for batch in _batches(texts, ENCODE_BATCH_CHARS):
            for text, ids in zip(batch, tokenizer.encode_batch(batch, num_threads=workers)):
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                documents += 1
                tokens += len(ids)
                text_bytes += len(text.encode("utf-8"))
                first_text = text if first_text is None else first_text
        builder.finalize(str(tmp["idx"]))
        encode_seconds = time.perf_counter() - t_encode
        if documents == 0:
            raise DataError(f"no non-empty {json_key!r} texts in {', '.join(map(str, paths))}")
        top_id = _verify(tmp_prefix, tokenizer, documents, tokens, first_text, append_eod)

        trained = tokenizer_model is None
        tokenizer_path = outputs["tokenizer"] if trained else Path(tokenizer_model).resolve()
        seconds = time.perf_counter() - start
        meta = {
            "format": META_FORMAT, "documents": documents, "tokens": tokens, "text_bytes": text_bytes,
            "bytes_per_token": round(text_bytes / tokens, 4), "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod, "append_eod": append_eod,
            "max_token_id": top_id, "json_key": json_key, "inputs": [str(p.resolve()) for p in paths],
            "max_docs": max_docs, "skipped_missing_key": texts.skipped_missing,
            "skipped_empty": texts.skipped_empty,
            "tokenizer_model": tokenizer_path.name if trained else str(tokenizer_path),
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_trained": trained, "seconds": round(seconds, 3),
            "encode_seconds": round(encode_seconds, 3),
            **(extra_meta or {}),
        }
        with atomic_write(tmp["meta"], "w") as handle:
            json.dump(meta, handle, indent=1)
        # ---- publish: tokenizer first, then data, the meta file last ---------------------
        if trained:
            os.replace(tmp["tokenizer"], outputs["tokenizer"])
        os.replace(tmp["bin"], outputs["bin"])
        os.replace(tmp["idx"], outputs["idx"])
        os.replace(tmp["meta"], outputs["meta"])
    except BaseException:
        remove_quietly(*tmp.values())
        for directory in created_dirs:  # innermost first
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    if texts.skipped_missing or texts.skipped_empty:
        logger.warning("skipped %d records without %r and %d with empty text", texts.skipped_missing,
                       json_key, texts.skipped_empty)
    result = PreparedData(prefix=Path(str(outputs["bin"])[: -len(".bin")]), tokenizer_model=tokenizer_path,
                          documents=documents, tokens=tokens, text_bytes=text_bytes, dtype=np.dtype(dtype).name,
                          vocab_size=tokenizer.vocab_size, seconds=seconds, encode_seconds=encode_seconds)
    logger.info("prepared %s", result.summary())
    return result


def prepared_to_dict(prepared: PreparedData) -> dict:
    out = asdict(prepared)
    out.update(prefix=str(prepared.prefix), tokenizer_model=str(prepared.tokenizer_model),
               bytes_per_token=prepared.bytes_per_token, tokens_per_s=prepared.tokens_per_s)
    return out


def fingerprint_existing(data_prefix: str | Path, tokenizer_model: str | Path) -> Path:
    """Write the meta file of indexed data prepared elsewhere (without one): the tokenizer's path and
    sha256, its vocabulary and the data's counts and largest token id (a full scan of the ``.bin``,
    which must be below the vocabulary). Training then checks the tokenizer against it. Returns the
    meta path; refuses to overwrite an existing meta file."""
    from megatron_sl.training.data.datasets import resolve_data_prefix

    prefix = resolve_data_prefix(data_prefix)
    meta_path = Path(f"{prefix}.meta.json")
    if meta_path.exists():
        raise DataError(f"{str(meta_path)!r} already exists; it records the tokenizer the data was made with")
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    info = inspect_indexed_dataset(prefix)
    top = max_token_id(info)
    if top >= tokenizer.vocab_size:
        raise DataError(f"{info.bin_path} holds token id {top} but tokenizer {str(tokenizer_model)!r} has only "
                        f"{tokenizer.vocab_size} pieces: it is not the tokenizer of this data (or the data is corrupt)")
    meta = {"format": META_FORMAT, "documents": info.documents, "tokens": info.tokens, "text_bytes": None,
            "dtype": np.dtype(info.dtype).name, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
            "max_token_id": top, "tokenizer_model": str(Path(tokenizer_model).resolve()),
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_trained": False, "fingerprinted": True}
    with atomic_write(meta_path, "w") as handle:
        json.dump(meta, handle, indent=1)
    return meta_path
