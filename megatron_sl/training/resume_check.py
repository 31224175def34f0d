"""Resume guard: compare a run's new config with the one stored in the checkpoint it resumes from.

Every checkpoint holds ``run_config.json`` (``RUN_CONFIG``: the resolved config and the world
size, written by ``Trainer.save_checkpoint`` through ``CheckpointManager.save``), readable without
torch. Before anything is launched or written, ``check_resume`` compares it with the new config:

* a change to a key that alters what training means or breaks the checkpoint (``protected``: the
  model and SL settings, data prefix/tokenizer/split, seed, global batch, precision, optimizer
  name/hyperparameters other than the schedule, parallel layout, ZeRO stage, DeepSpeed settings,
  world size) is refused with one ``ConfigError`` unless ``run.allow_config_change`` (the CLI's
  ``--allow-config-change KEY[,KEY]``) names the key or its section;
* any other change (lr, schedule, train_iters, clipping, intervals, keep_last, eval.*, ...) is
  allowed; the returned lines describe it and the trainer logs them.

A changed world size can never be allowed (the per-rank checkpoint files would not match).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .checkpoint.names import CHECKPOINTS_DIR, MANIFEST, RUN_CONFIG, STEP_RE
from .config import ConfigError, TrainConfig

PROTECTED_SECTIONS = ("model", "sl", "parallel", "deepspeed")
PROTECTED_KEYS = frozenset({
    "data.prefix", "data.tokenizer", "data.split", "train.seed", "train.global_batch_size", "train.precision",
    "optim.name", "optim.per_layer", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps",
    "optim.min_8bit_size", "world_size"})
# keys inside a protected section that change no result (memory/speed only)
UNPROTECTED_KEYS = frozenset({"model.recompute"})
NEVER_ALLOWED = frozenset({"world_size"})


def is_protected(key: str) -> bool:
    if key in UNPROTECTED_KEYS:
        return False
    return key in PROTECTED_KEYS or key.split(".", 1)[0] in PROTECTED_SECTIONS


def flatten(d: dict) -> Dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (one level: sections and their keys)."""
    out: Dict[str, Any] = {}
    for section, values in d.items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        else:
            out[section] = values
    return out


def run_config_record(cfg: TrainConfig, world_size: int) -> dict:
    """What a checkpoint stores about the run that wrote it."""
    return {"config": cfg.to_dict(), "world_size": world_size}


def newest_checkpoint(run_dir: str | Path) -> Optional[Tuple[Path, dict]]:
    """(directory, its run_config.json) of the newest committed checkpoint (a readable manifest) that
    resume would consider first; None if there is none or it predates run_config.json."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))),
                   reverse=True)
    for _, path in steps:
        try:
            json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # incomplete or corrupt: resume skips it too
        try:
            return path, json.loads((path / RUN_CONFIG).read_text())
        except (OSError, ValueError):
            return None
    return None


def _allowed(key: str, allow: List[str]) -> bool:
    return any(key == a or key.startswith(a.rstrip(".*") + ".") for a in allow)


def diff_configs(old: dict, new: dict) -> List[Tuple[str, Any, Any]]:
    """(key, old, new) for every differing leaf; keys present on one side only (a newer or older
    version of the config) are not compared."""
    a, b = flatten(old), flatten(new)
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def check_resume(cfg: TrainConfig, world_size: int) -> List[str]:
    """Raise ``ConfigError`` for a protected change not allowed by ``run.allow_config_change``;
    return one line per allowed change (empty when nothing changed or nothing is resumed)."""
    if not cfg.run.resume or cfg.run.overwrite:
        return []
    found = newest_checkpoint(cfg.run.output_dir)
    if found is None:
        return []
    path, record = found
    old = dict(record.get("config", {}), world_size=record.get("world_size"))
    new = dict(run_config_record(cfg, world_size)["config"], world_size=world_size)
    allow = list(cfg.run.allow_config_change)
    changes = diff_configs(old, new)
    refused = [(k, o, n) for k, o, n in changes
               if is_protected(k) and (k in NEVER_ALLOWED or not _allowed(k, allow))]
    if refused:
        what = ", ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused)
        if any(k in NEVER_ALLOWED for k, _, _ in refused):
            hint = "resuming with a different world size is not supported"
        else:
            hint = (f"rerun with --allow-config-change {','.join(k for k, _, _ in refused)} to accept "
                    f"{'it' if len(refused) == 1 else 'them'}")
        raise ConfigError(f"resume from {path}: the config changes what training means ({what}); {hint}, use "
                          "another run.output_dir, or set run.overwrite=true to start over")
    return [f"{k}: {o!r} -> {n!r}" for k, o, n in changes
            if not k.startswith("run.allow_config_change")]
