"""One run per run directory: an exclusive ``fcntl.flock`` on ``<run_dir>/.megatron-sl.lock``.

The lock is taken before anything else is written to the run directory and held for the whole
run; the kernel releases it when the holder dies (kill -9 included), so a stale lock never
blocks a rerun. The lock file holds ``pid host`` of the holder, so a second run on the same
directory fails at once with one line naming them (``RunLockError``, exit code 2).

Who holds it: ``megatron-sl train`` (the launching process) for the ranks it starts, exporting
``MSL_RUN_LOCK=<path>`` so the ranks know it is held; under an external launcher (torchrun,
srun, deepspeed) rank 0 takes it itself (``training.trainer``).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from .config import ConfigError

LOCK_NAME = ".megatron-sl.lock"
HELD_ENV = "MSL_RUN_LOCK"


class RunLockError(ConfigError):
    """The run directory is locked by another run (or the lock cannot be taken)."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Create the run directory if needed and lock it; raises ``RunLockError`` naming the holder."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RunLockError(f"config key run.output_dir={str(self.run_dir)!r} is not writable (cannot create its "
                               f"lock file: {e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            finally:
                os.close(fd)
            who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunLockError(f"run directory {str(self.run_dir)!r} is in use by another run ({who}; lock file "
                               f"{str(self.path)!r}); wait for it to finish or choose another run.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_by_launcher(run_dir: str | Path) -> bool:
    """True when the process that started this rank holds the lock of ``run_dir``."""
    held = os.environ.get(HELD_ENV)
    return bool(held) and Path(held).resolve() == (Path(run_dir) / LOCK_NAME).resolve()
