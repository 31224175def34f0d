"""The demo data: the demo corpus fetched and prepared (8k BPE + megatron ``.bin/.idx``), cached.

Owns :func:`prepare_demo_data`, what ``megatron-sl demo`` and ``prepare-data --demo`` run. The
preparation itself is the data pipeline's (``megatron_sl.training.data.preprocess``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from megatron_sl.constants import DEFAULT_DATA_DIR
from megatron_sl.corpus.sources import DEFAULT_SEED, DEFAULT_SOURCES, fetch_demo_corpus
from megatron_sl.training.data.errors import DataError
from megatron_sl.training.data.fsutil import check_writable_dir, file_lock
from megatron_sl.training.data.indexed_format import inspect_indexed_dataset
from megatron_sl.training.data.preprocess import PreparedData, output_paths, prepare_indexed_dataset
from megatron_sl.training.data.tokenizer import DEFAULT_VOCAB_SIZE

logger = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_demo_data(data_dir: str | Path = DEFAULT_DATA_DIR, vocab_size: int = DEFAULT_VOCAB_SIZE, workers: int = 2,
                      sources: tuple[str, ...] = DEFAULT_SOURCES, seed: int = DEFAULT_SEED) -> PreparedData:
    """Fetch the demo corpus into ``data_dir/raw`` and prepare it under ``data_dir/demo`` (cached).

    A second call with the same corpus and vocabulary returns the existing files at once; safe to
    call from several processes at the same time (a file lock serialises them).
    """
    data_dir = Path(data_dir)
    check_writable_dir(data_dir, "data directory")
    corpus = fetch_demo_corpus(data_dir / "raw", sources=sources, seed=seed)
    corpus_sha = _sha256(corpus)
    prefix = data_dir / "demo" / f"{corpus.stem}_bpe{vocab_size}"
    outputs = output_paths(prefix)
    with file_lock(data_dir / "demo" / ".prepare.lock"):
        if outputs["meta"].is_file():
            meta = json.loads(outputs["meta"].read_text())
            if meta.get("corpus_sha256") == corpus_sha and all(outputs[k].is_file() for k in outputs):
                try:
                    inspect_indexed_dataset(Path(str(outputs["bin"])[: -len(".bin")]))
                    cached = PreparedData.from_meta(outputs["meta"])
                    logger.info("demo data cached: %s", cached.prefix)
                    return cached
                except DataError as err:
                    logger.warning("rebuilding demo data: %s", err)
        return prepare_indexed_dataset([str(corpus)], prefix, vocab_size=vocab_size, workers=workers,
                                       extra_meta={"corpus_sha256": corpus_sha, "corpus": str(corpus.resolve())})
