"""All-or-nothing file writes, shared by checkpoints and the data pipeline.

Owns the one rule for writing a file that readers may see at any moment: write a hidden,
process-unique sibling (``temp_path_for``), flush and fsync it, ``os.replace`` it onto the final
name, fsync the directory. ``atomic_write`` is that rule as a context manager (data pipeline,
pointers); ``replace_durable`` writes given bytes that way (``latest``, ``last_good``);
``write_durable`` / ``torch_save_durable`` write and fsync in place, for files inside a checkpoint's
temporary directory (the directory rename is the atomic step there). ``file_checksum`` hashes (and
optionally fsyncs) a file for manifests. Imports nothing heavy: torch only inside
``torch_save_durable``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from pathlib import Path
from typing import IO, Iterator, List, Optional

HASHES = ("sha256", "crc32")
_CHUNK = 8 << 20


def temp_path_for(path: Path) -> Path:
    """A hidden, process-unique sibling of ``path`` (same directory, so renaming is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", *, sync_dir: bool = False, **open_kwargs) -> Iterator[IO]:
    """Open a temp sibling of ``path`` for writing; fsync and rename it onto ``path`` only on success
    (and fsync the directory with ``sync_dir``, so the rename survives a power loss)."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    finally:
        remove_quietly(tmp)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync the file (not atomic; used inside a temp dir)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_durable(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` by a file holding ``data``: temp file, fsync, os.replace, fsync dir."""
    with atomic_write(path, "wb", sync_dir=True) as f:
        f.write(data)


def torch_save_durable(obj, path: Path) -> None:
    """``torch.save`` into ``path`` (parents created) and fsync it (not atomic; used inside a temp dir)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def file_checksum(path: Path, algo: str, fsync: bool = False) -> str:
    """Checksum of a file's bytes (``sha256`` hex or ``crc32`` as 8 hex digits); optionally fsync it."""
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        if algo == "sha256":
            h = hashlib.sha256()
            while chunk := f.read(_CHUNK):
                h.update(chunk)
            return h.hexdigest()
        if algo == "crc32":
            c = 0
            while chunk := f.read(_CHUNK):
                c = zlib.crc32(chunk, c)
            return f"{c:08x}"
    raise ValueError(f"unknown checksum {algo!r}; expected one of {HASHES}")


def human_bytes(n: Optional[float]) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def list_files(root: Path) -> List[str]:
    """Every file under ``root``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())
