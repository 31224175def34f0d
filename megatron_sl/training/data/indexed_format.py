"""Checks of megatron's indexed-dataset files (``<prefix>.idx`` / ``<prefix>.bin``) without megatron.

Owns :func:`inspect_indexed_dataset`, which reads the ``.idx`` header and arrays with numpy and
checks that the two files agree, raising :class:`DataError` naming the path on any mismatch, and
:func:`max_token_id`, a chunked scan of the ``.bin``. Cheap enough to run on every rank before a
collective dataset build (so that all ranks fail alike instead of hanging in a barrier).

``.idx`` layout (megatron-core ``indexed_dataset.py``): ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1,
``<B`` dtype code, ``<Q`` sequence count S, ``<Q`` document count D, ``int32[S]`` sequence lengths,
``int64[S]`` byte offsets, ``int64[D]`` document boundaries (starting at 0).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_sl.training.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")


@dataclass(frozen=True)
class IndexedInfo:
    prefix: Path
    dtype: type
    sequences: int
    documents: int  # number of documents (the boundary array has documents + 1 entries)
    tokens: int
    index_sha256: str  # of the .idx bytes: changes whenever any sequence length changes
    sequence_lengths: np.ndarray = field(repr=False, compare=False)

    @property
    def bin_path(self) -> Path:
        return Path(f"{self.prefix}.bin")


def inspect_indexed_dataset(prefix: str | Path) -> IndexedInfo:
    """Header and consistency check of ``prefix.{idx,bin}``; :class:`DataError` names what is wrong."""
    prefix = Path(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"indexed dataset file {str(path)!r} does not exist")
    raw = idx.read_bytes()
    if len(raw) < _HEADER.size:
        raise DataError(f"{str(idx)!r} is corrupt: {len(raw)} bytes, shorter than the header")
    magic, version, code, sequences, boundaries = _HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC or version != 1:
        raise DataError(f"{str(idx)!r} is not a megatron indexed-dataset index (magic {magic!r}, version {version})")
    if code not in DTYPE_CODES:
        raise DataError(f"{str(idx)!r} is corrupt: unknown dtype code {code}")
    expected = _HEADER.size + 4 * sequences + 8 * sequences + 8 * boundaries
    if len(raw) < expected or boundaries < 1:
        raise DataError(f"{str(idx)!r} is corrupt: {len(raw)} bytes, header implies {expected}")
    lengths = np.frombuffer(raw, np.int32, sequences, _HEADER.size)
    doc_index = np.frombuffer(raw, np.int64, boundaries, _HEADER.size + 12 * sequences)
    if (lengths < 0).any() or doc_index[0] != 0 or doc_index[-1] != sequences or (np.diff(doc_index) < 0).any():
        raise DataError(f"{str(idx)!r} is corrupt: inconsistent sequence lengths or document boundaries")
    dtype = DTYPE_CODES[code]
    tokens = int(lengths.sum(dtype=np.int64))
    size = bin_.stat().st_size
    if size != tokens * np.dtype(dtype).itemsize:
        raise DataError(f"{str(bin_)!r} holds {size} bytes but {str(idx)!r} describes {tokens} tokens of "
                        f"{np.dtype(dtype).name} ({tokens * np.dtype(dtype).itemsize} bytes): the pair is "
                        "truncated or mismatched")
    return IndexedInfo(prefix=prefix, dtype=dtype, sequences=int(sequences), documents=int(boundaries) - 1,
                       tokens=tokens, index_sha256=hashlib.sha256(raw).hexdigest(), sequence_lengths=lengths)


def max_token_id(info: IndexedInfo, chunk_tokens: int = 1 << 24) -> int:
    """Largest token id in the ``.bin`` (chunked memory-mapped scan); -1 when empty."""
    if info.tokens == 0:
        return -1
    data = np.memmap(info.bin_path, dtype=info.dtype, mode="r")
    return int(max(data[i : i + chunk_tokens].max() for i in range(0, len(data), chunk_tokens)))
