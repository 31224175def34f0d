"""Reading JSONL corpora: input path checks and a streaming document reader.

Owns :func:`resolve_inputs` (expand globs, check each file exists, is a readable regular file of a
supported kind and that its first record is a JSON object holding the text key -- all before any
work starts) and :func:`iter_texts` (stream the non-empty texts, in file order, with ``file:line``
in every error). ``.jsonl``/``.json`` files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator

from megatron_sl.training.data.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for each non-blank line; DataError names ``file:line``."""
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
    except (OSError, EOFError, UnicodeDecodeError) as err:  # gzip/utf-8 corruption, I/O errors
        raise DataError(f"input {str(path)!r} is unreadable: {err}") from err


def resolve_inputs(patterns: list[str], json_key: str) -> list[Path]:
    """Expand ``patterns`` and check every file up front; :class:`DataError` names the bad one."""
    if not json_key:
        raise DataError("--json-key must be a non-empty string")
    if not patterns:
        raise DataError("no --input files given")
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"input pattern {pattern!r} matches no file")
        paths += [Path(m) for m in matches]
    for path in paths:
        if not path.exists():
            raise DataError(f"input {str(path)!r} does not exist")
        if not path.is_file():
            raise DataError(f"input {str(path)!r} is not a regular file")
        if not path.name.endswith(SUPPORTED_SUFFIXES):
            raise DataError(f"input {str(path)!r} is not JSONL: expected one of {', '.join(SUPPORTED_SUFFIXES)}")
        first = next(_records(path), None)
        if first is None:
            raise DataError(f"input {str(path)!r} is empty (no JSON records)")
        number, record = first
        if json_key not in record:
            keys = ", ".join(sorted(record)[:10]) or "none"
            raise DataError(f"json key {json_key!r} not found in {path}:{number} (keys there: {keys})")
        if not isinstance(record[json_key], str):
            raise DataError(f"json key {json_key!r} in {path}:{number} holds {type(record[json_key]).__name__}, "
                            "not a string")
    return paths


class TextStream:
    """Iterates the non-empty ``json_key`` texts of ``paths``; counts what it skipped."""

    def __init__(self, paths: list[Path], json_key: str, max_docs: int | None = None):
        self.paths, self.json_key, self.max_docs = paths, json_key, max_docs
        self.skipped_missing = self.skipped_empty = self.emitted = 0

    def __iter__(self) -> Iterator[str]:
        self.skipped_missing = self.skipped_empty = self.emitted = 0
        for path in self.paths:
            for number, record in _records(path):
                text = record.get(self.json_key)
                if text is None:
                    self.skipped_missing += 1
                    continue
                if not isinstance(text, str):
                    raise DataError(f"json key {self.json_key!r} in {path}:{number} holds "
                                    f"{type(text).__name__}, not a string")
                if not text.strip():
                    self.skipped_empty += 1
                    continue
                self.emitted += 1
                yield text
                if self.max_docs is not None and self.emitted >= self.max_docs:
                    return  # before reading (and possibly failing on) a record we do not need
