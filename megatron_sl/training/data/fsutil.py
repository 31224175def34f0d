"""Filesystem helpers of the data pipeline: inter-process locks and writable-directory checks.

All-or-nothing writes (``atomic_write``, ``temp_path_for``, ``remove_quietly``) are the checkpoint
package's (``training.checkpoint.atomic``), one rule for both. Owns :func:`file_lock` (an exclusive
``fcntl`` lock that serialises concurrent processes doing the same one-off work, e.g. two ranks
fetching the corpus) and
:func:`check_writable_dir` (can a directory, possibly not yet created, be written?).
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from pathlib import Path
from typing import Iterator

from megatron_sl.training.data.errors import DataError


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
