"""The checkpoint package's exception and warning (importable without torch)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or none can be resumed; the message names the file."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, truncated, incomplete); an older one is used."""
