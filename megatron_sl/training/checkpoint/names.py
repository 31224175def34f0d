"""The on-disk names and format versions of a run's checkpoints (no torch; read by the resume guard
and the export before any rank starts).

Layout under ``<run_dir>/checkpoints/``: ``latest`` / ``last_good`` pointers and one ``step_XXXXXXXX``
directory per checkpoint holding ``engine/`` (the writing layout's engine files, or
``engine/universal/``: the layout-free form written by ``megatron-sl checkpoint convert``),
``ranks/rank_XXXXX.pt``, ``client_state.pt``, ``run_config.json`` and ``manifest.json``.

Two format tags are written and checked on read: ``FORMAT`` in ``manifest.json`` (the directory
layout and manifest) and ``CLIENT_FORMAT`` in ``client_state.pt`` (the run position and what it
means). A checkpoint with another version of either is refused with one message naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

FORMAT = "megatron-sl-checkpoint/1"
FORMAT_FAMILY = FORMAT.rsplit("/", 1)[0]
CLIENT_FORMAT = "megatron-sl/2"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
LAST_GOOD = "last_good"   # pointer to the newest checkpoint saved before a run of bad steps (never pruned)
RUN_CONFIG = "run_config.json"
MANIFEST = "manifest.json"
CLIENT_STATE = "client_state.pt"
ENGINE_DIR = "engine"
UNIVERSAL_DIR = "universal"
RANKS_DIR = "ranks"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
STEP_RE = re.compile(r"^step_(\d{8,})$")
ABANDONED_RE = re.compile(r"^step_(\d{8,})\.abandoned-\d+$")


def step_dirname(step: int) -> str:
    """``step_00000120`` for step 120."""
    return f"step_{int(step):08d}"


def step_of(name: str) -> Optional[int]:
    """The step of a ``step_XXXXXXXX`` directory name, None for any other name."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def rank_file(checkpoint: Path, rank: int) -> Path:
    """``ranks/rank_XXXXX.pt`` of global rank ``rank``."""
    return Path(checkpoint) / RANKS_DIR / f"rank_{int(rank):05d}.pt"


def format_problem(found, expected: str, what: str) -> Optional[str]:
    """None when ``found`` is ``expected``; else why it cannot be read (another version or not ours)."""
    if found == expected:
        return None
    family = expected.rsplit("/", 1)[0]
    if isinstance(found, str) and found.startswith(family + "/"):
        return f"{what} has format version {found!r}; this version of megatron-sl reads {expected!r}"
    return f"{what} is not a {expected} file (format tag {found!r})"


def resolve_checkpoint(path) -> Path:
    """A ``step_*`` directory, or a run / ``checkpoints`` directory (then the one its ``latest`` names)."""
    path = Path(path)
    for cand in (path, path / CHECKPOINTS_DIR):
        latest = cand / LATEST
        if not (cand / MANIFEST).is_file() and latest.is_file():
            return cand / latest.read_text().strip()
    return path


def recorded_world_size(checkpoint: Path) -> int:
    """The world size a checkpoint is recorded for: ``run_config.json``'s (a converted checkpoint is
    written by one process for another layout), else the manifest's (the writing ranks)."""
    import json

    checkpoint = Path(checkpoint)
    for name in (RUN_CONFIG, MANIFEST):
        try:
            world = json.loads((checkpoint / name).read_text()).get("world_size")
        except (OSError, ValueError):
            continue
        if world is not None:
            return int(world)
    raise FileNotFoundError(f"{checkpoint} records no world size (no readable {RUN_CONFIG} or {MANIFEST})")
