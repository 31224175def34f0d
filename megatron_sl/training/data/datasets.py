"""Train/validation GPT datasets from prepared ``.bin/.idx`` data, through megatron-core.

Owns :func:`build_datasets` (megatron ``GPTDataset`` splits via ``BlendedMegatronDatasetBuilder``
and ``GPTDatasetConfig``) and re-exports :func:`load_tokenizer`.

Samples are megatron's dicts: ``tokens``/``labels`` ``[S]`` int64 (labels = tokens shifted by
one), ``loss_mask`` ``[S]`` float, ``position_ids`` ``[S]`` and, by default, an explicit causal
``attention_mask`` ``[1, S, S]`` bool (True = masked), which spares GPTModel's CUDA-only default
mask on CPU.

Multi-rank use: call it on every rank. Every rank first runs the same cheap checks, and the ranks
agree on the outcome (an all-gather), so bad data fails everywhere with one message instead of
hanging a barrier. With torch.distributed initialised, megatron builds the index caches on rank 0,
barriers, then the other ranks load them (the cache directory must be on storage all ranks see).
Without it, an exclusive file lock lets concurrent processes build one after another, the later
ones hitting the cache. Index caches live in ``<cache_dir>/<sha of the .idx>``, so re-prepared
data never reuses stale indices.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_sl.training.data.errors import DataError
from megatron_sl.training.data.fsutil import check_writable_dir, file_lock
from megatron_sl.training.data.indexed_format import IndexedInfo, inspect_indexed_dataset, max_token_id
from megatron_sl.training.data.mcore import megatron_datasets
from megatron_sl.training.data.tokenizer import SentencePieceTokenizer, load_tokenizer

__all__ = ["DatasetPlan", "build_datasets", "load_tokenizer", "plan_datasets", "resolve_data_prefix"]

logger = logging.getLogger(__name__)

MAX_TOKENS_TO_SCAN = 1 << 28  # without a meta file, token ids are range-checked up to this size


@dataclass(frozen=True)
class DatasetPlan:
    """The checked inputs of a dataset build (see :func:`plan_datasets`)."""

    prefix: Path
    tokenizer: Any
    info: IndexedInfo
    cache_dir: Path
    has_valid: bool


def resolve_data_prefix(data_prefix: str | Path) -> Path:
    """``path/name_text_document`` from that prefix, from ``path/name`` or from a ``.bin``/``.idx`` path."""
    text = re.sub(r"\.(bin|idx)$", "", str(data_prefix))
    for candidate in (Path(text), Path(f"{text}_text_document")):
        if Path(f"{candidate}.idx").is_file() or Path(f"{candidate}.bin").is_file():
            return candidate.absolute()
    raise DataError(f"no indexed dataset at {str(data_prefix)!r}: neither {text}.{{bin,idx}} nor "
                    f"{text}_text_document.{{bin,idx}} exists (run `megatron-sl prepare-data` first)")


def _split_shares(split: str) -> list[float]:
    parts = [p.strip() for p in str(split).split(",")]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(s < 0 for s in shares) or sum(shares) <= 0 or shares[0] <= 0:
        raise DataError(f"split {split!r} must be 1-3 non-negative comma-separated shares with a positive "
                        "train share, e.g. '95,5,0'")
    return shares + [0.0] * (3 - len(shares))


def _check_tokenizer_matches(prefix: Path, info: IndexedInfo, tokenizer: Any) -> None:
    """The data's meta file names the tokenizer it was made with (sha256): it must be this one; and
    every token id must be below the vocabulary size (a scan of the ``.bin`` up to
    ``MAX_TOKENS_TO_SCAN`` tokens, so corrupt bytes are caught before training, not as an
    IndexError in the embedding; larger data relies on the meta file and ``check_token_range``)."""
    meta_path = Path(f"{prefix}.meta.json")
    sha = getattr(tokenizer, "sha256", None)
    if not meta_path.is_file():
        if sha is not None:  # without a fingerprint a same-size tokenizer would train on garbage
            raise DataError(f"{prefix} has no meta file {meta_path.name!r} recording its tokenizer; run "
                            f"`megatron-sl prepare-data --fingerprint {prefix} --tokenizer-model "
                            f"{getattr(tokenizer, 'path', 'TOKENIZER.model')}` once to record the tokenizer it "
                            "was made with (or prepare the data again)")
        top = max_token_id(info) if info.tokens <= MAX_TOKENS_TO_SCAN else -1
    else:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"meta file {str(meta_path)!r} is unreadable: {err}") from None
        if sha is not None and meta.get("tokenizer_sha256") not in (None, sha):
            raise DataError(f"{prefix} was tokenized with {meta.get('tokenizer_model')!r} "
                            f"(sha256 {meta['tokenizer_sha256'][:12]}...) but the tokenizer given is "
                            f"{str(getattr(tokenizer, 'path', tokenizer))!r} (sha256 {sha[:12]}...)")
        top = meta.get("max_token_id", -1)
        if info.tokens <= MAX_TOKENS_TO_SCAN:
            scanned = max_token_id(info)
            if scanned > top >= 0 or scanned >= tokenizer.vocab_size:
                raise DataError(f"{info.bin_path} is corrupt: it holds token id {scanned} but {meta_path.name} "
                                f"records {top} as the largest and the tokenizer has {tokenizer.vocab_size} pieces "
                                "(prepare the data again)")
    if top >= tokenizer.vocab_size:
        raise DataError(f"{prefix} holds token id {top} but the tokenizer has only {tokenizer.vocab_size} pieces")


def plan_datasets(data_prefix: str | Path, tokenizer: Any, seq_length: int, seed: int = 1234,
                  split: str = "95,5,0", train_samples: int | None = None, valid_samples: int | None = None,
                  cache_dir: str | Path | None = None) -> DatasetPlan:
    """Every check of :func:`build_datasets` that can fail on bad input, without building anything.

    Cheap (reads the ``.idx`` and the meta file, imports no megatron) and identical on every
    rank; a launcher can call it before starting ranks. Raises :class:`DataError`.
    """
    for name, value, optional in (("seq_length", seq_length, False), ("seed", seed, False),
                                  ("train_samples", train_samples, True), ("valid_samples", valid_samples, True)):
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise DataError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                            f"got {value!r}")
    shares = _split_shares(split)
    prefix = resolve_data_prefix(data_prefix)
    info = inspect_indexed_dataset(prefix)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    missing = [a for a in ("vocab_size", "eod", "unique_identifiers") if not hasattr(tokenizer, a)]
    if missing:
        raise DataError(f"tokenizer {tokenizer!r} lacks {', '.join(missing)} (use load_tokenizer(path))")
    _check_tokenizer_matches(prefix, info, tokenizer)

    # megatron splits by contiguous sequence ranges, rounding the book-ends
    total, bounds, start = sum(shares), [], 0.0
    for share in shares:
        bounds.append((start, start + share / total))
        start += share / total
    for name, (beg, end), share in zip(("train", "validation"), bounds, shares):
        if share == 0:
            continue
        lo, hi = int(round(beg * info.sequences)), int(round(end * info.sequences))
        tokens = int(info.sequence_lengths[lo:hi].sum())
        if hi <= lo or tokens < seq_length + 1:
            raise DataError(f"the {name} split of {prefix} (split {split!r}: documents {lo}..{hi} of "
                            f"{info.sequences}, {tokens} tokens) is too small for one sequence of "
                            f"{seq_length}+1 tokens; use more data, a larger share or a shorter seq_length")
    cache_dir = Path(cache_dir) if cache_dir is not None else prefix.parent / "index_cache"
    check_writable_dir(cache_dir, "dataset index cache directory")
    return DatasetPlan(prefix=prefix, tokenizer=tokenizer, info=info, cache_dir=cache_dir.absolute(),
                       has_valid=shares[1] > 0)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _agree(error: DataError | None) -> None:
    """Raise on every rank if any rank failed its checks (no rank is left waiting in a barrier)."""
    if not _distributed():
        if error is not None:
            raise error
        return
    messages = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        raise DataError(f"rank {failed[0][0]}: {failed[0][1]}")


def build_datasets(data_prefix: str | Path, tokenizer: SentencePieceTokenizer | str | Path, seq_length: int,
                   seed: int = 1234, split: str = "95,5,0", train_samples: int | None = None,
                   valid_samples: int | None = None, cache_dir: str | Path | None = None, *,
                   create_attention_mask: bool = True, eod_mask_loss: bool = False):
    """``(train, valid)`` megatron ``GPTDataset`` objects over ``data_prefix``; ``valid`` is None when
    the split gives validation no share.

    ``train_samples`` / ``valid_samples``: samples to draw (megatron repeats epochs as needed);
    None means one pass over the split. ``tokenizer``: a :class:`SentencePieceTokenizer`, a path to
    a ``.model``, or any object with ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers``.
    ``cache_dir`` defaults to ``<data dir>/index_cache``. A collective when torch.distributed is
    initialised: call it on every rank. Raises :class:`DataError` naming the bad path or value.
    """
    error, plan = None, None
    try:
        plan = plan_datasets(data_prefix, tokenizer, seq_length, seed, split, train_samples, valid_samples, cache_dir)
    except DataError as err:
        error = err
    _agree(error)

    mc = megatron_datasets()
    cache = plan.cache_dir / plan.info.index_sha256[:16]
    config = mc.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([str(plan.prefix)], None), split=split,
        path_to_cache=str(cache), tokenizer=plan.tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=eod_mask_loss, create_attention_mask=create_attention_mask)
    builder = mc.BlendedMegatronDatasetBuilder(mc.GPTDataset, [train_samples, valid_samples, None],
                                               lambda: True, config)
    try:
        if _distributed():
            train, valid, _ = builder.build()  # megatron: rank 0 builds the caches, barrier, the rest load
        else:
            cache.mkdir(parents=True, exist_ok=True)
            with file_lock(cache / ".build.lock"):
                train, valid, _ = builder.build()
    except FileNotFoundError as err:
        raise DataError(f"dataset index cache {str(cache)!r} is missing files on this rank ({err.filename}); "
                        "cache_dir must be on storage every rank can see") from err
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"dataset index cache {str(cache)!r} is unreadable ({err}); delete it and retry") from err
    if not plan.has_valid:
        valid = None
    logger.info("datasets over %s: %d train samples, %s validation samples of %d tokens", plan.prefix,
                len(train), "no" if valid is None else len(valid), seq_length)
    return train, valid
