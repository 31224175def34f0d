"""training.data: the data pipeline -- sentencepiece tokenizer, JSONL -> megatron indexed ``.bin/.idx``
preparation, and megatron ``GPTDataset`` train/validation splits (the demo corpus is fetched and
prepared through it by ``megatron_sl.corpus``).

Depends only on megatron-core's datasets, sentencepiece, numpy and torch (no model or parallel
code). Public names are imported lazily so that argument checks and ``--help`` stay fast:

* :class:`SentencePieceTokenizer`, :func:`train_bpe_tokenizer`, :func:`load_tokenizer` (``tokenizer``).
* :func:`prepare_indexed_dataset`, :class:`PreparedData` (``preprocess``).
* :func:`build_datasets` (``datasets``): ``(train, valid)`` GPTDatasets, multi-rank safe;
  :func:`plan_datasets` runs all of its input checks without building (for launchers).
* :class:`DataError` (``errors``): every user-facing data problem.
"""

from __future__ import annotations

from megatron_sl.lazy import lazy_exports

_EXPORTS = {
    "DataError": "errors",
    "SentencePieceTokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "PreparedData": "preprocess",
    "prepare_indexed_dataset": "preprocess",
    "build_datasets": "datasets",
    "plan_datasets": "datasets",
    "resolve_data_prefix": "datasets",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
