"""Filesystem helpers of the data pipeline: all-or-nothing writes and inter-process locks.

Owns :func:`temp_path_for` (a hidden sibling name to write to before an ``os.replace``),
:func:`atomic_write` (write a file so readers see the old file or the whole new one, never half),
:func:`remove_quietly`, :func:`file_lock` (an exclusive ``fcntl`` lock that serialises concurrent
processes doing the same one-off work, e.g. two ranks fetching the corpus) and
:func:`check_writable_dir` (can a directory, possibly not yet created, be written?).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from megatron_sl.training.data.errors import DataError


def temp_path_for(path: Path) -> Path:
    """A hidden, process-unique sibling of ``path`` (same directory, so renaming is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temp sibling of ``path`` for writing; rename it onto ``path`` only on success."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_writable_dir(directory: Path, what: str) -> None:
    """Raise :class:`DataError` unless ``directory`` exists as a writable directory or can be created.

    Nothing is left behind: the probe file in the nearest existing ancestor is removed at once,
    and no directory is created.
    """
    directory = Path(directory).absolute()
    ancestor = directory
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DataError(f"{what} {str(directory)!r} is not writable: {str(ancestor)!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise DataError(f"{what} {str(directory)!r} is not writable: {err.strerror} ({str(ancestor)!r})") from err
