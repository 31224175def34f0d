"""Resume guard: compare a run's new config with the one stored in the checkpoint it resumes from.

Every checkpoint holds ``run_config.json`` (``RUN_CONFIG``: the resolved config and the world
size, written by ``Trainer.save_checkpoint`` through ``CheckpointManager.save``), readable without
torch. Before anything is launched or written, ``check_resume`` compares it with the new config:

* a change to a key that alters what training means or breaks the checkpoint (``protected``: the
  model and SL settings, data prefix/tokenizer/split, seed, global batch, precision, optimizer
  name/hyperparameters other than the schedule, sequence parallelism, DeepSpeed settings) is
  refused with one ``ConfigError`` unless ``run.allow_config_change`` (the CLI's
  ``--allow-config-change KEY[,KEY]``) names the key or its section;
* a change of the parallel layout (``LAYOUT_KEYS``: TP size, ZeRO stage, world size and so DP size)
  is allowed: the checkpoint is resharded on resume (``training.checkpoint.reshard``) and the
  returned lines say "resharding from TP=a DP=b ZeRO=z to ..." (any ZeRO stage 0-3 on either side);
  when the padded vocabulary (``model.make_vocab_size_divisible_by`` x TP) changes with it, the
  line says how its rows are re-padded and which divisor would keep it;
* any other change (lr, schedule, train_iters, clipping, intervals, keep_last, eval.*, ...) is
  allowed; the returned lines describe it and the trainer logs them.
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
UNPROTECTED_KEYS = frozenset({"model.recompute", "sl.save_xa"})
# how the state is split over ranks: changed by resharding the checkpoint on resume
LAYOUT_KEYS = frozenset({"parallel.tensor_parallel", "deepspeed.zero_stage", "world_size"})


def is_protected(key: str) -> bool:
    if key in UNPROTECTED_KEYS or key in LAYOUT_KEYS:
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


def check_resume(cfg: TrainConfig, world_size: int, base_vocab: Optional[int] = None) -> List[str]:
    """Raise ``ConfigError`` for a protected change not allowed by ``run.allow_config_change``;
    return one line per allowed change (empty when nothing changed or nothing is resumed).
    ``base_vocab``: the unpadded vocabulary, to describe a layout change that changes its padding."""
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
    refused = [(k, o, n) for k, o, n in changes if is_protected(k) and not _allowed(k, allow)]
    if refused:
        what = ", ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused)
        hint = (f"rerun with --allow-config-change {','.join(k for k, _, _ in refused)} to accept "
                f"{'it' if len(refused) == 1 else 'them'}")
        raise ConfigError(f"resume from {path}: the config changes what training means ({what}); {hint}, use "
                          "another run.output_dir, or set run.overwrite=true to start over")
    lines = [f"{k}: {o!r} -> {n!r}" for k, o, n in changes
             if k not in LAYOUT_KEYS and not k.startswith("run.allow_config_change")]
    before, after = _layout(old), _layout(new)
    note = _padding_change(old, new, base_vocab) if base_vocab is not None and changes else None
    if before != after:
        lines.insert(0, f"resharding from {before} to {after}" + (f"; {note}" if note else ""))
    elif note:  # e.g. an accepted model.make_vocab_size_divisible_by change: loaded through resharding too
        lines.insert(0, f"resharding at {after}: {note}")
    return lines


def _padding_change(old: dict, new: dict, base_vocab: int) -> Optional[str]:
    """None when the new layout keeps the padded vocabulary; else what resharding does to it
    (``checkpoint.reshard.repad_vocab``) and the ``model.make_vocab_size_divisible_by`` that keeps it."""
    from .config_checks import divisor_keeping_vocab, padded_vocab, vocab_change_note

    def rows(config):
        return padded_vocab(base_vocab, int(config["model"]["make_vocab_size_divisible_by"]),
                            int(config["parallel"]["tensor_parallel"]))

    before, after = rows(old), rows(new)
    if before == after:
        return None
    tp = int(new["parallel"]["tensor_parallel"])
    old_multiple = int(old["model"]["make_vocab_size_divisible_by"]) * int(old["parallel"]["tensor_parallel"])
    keep = divisor_keeping_vocab(base_vocab, before, tp, old_multiple, int(new["model"]["make_vocab_size_divisible_by"]))
    fix = (f"model.make_vocab_size_divisible_by={keep} --allow-config-change model.make_vocab_size_divisible_by "
           f"keeps it exactly" if keep else "no model.make_vocab_size_divisible_by keeps it at this TP size")
    return f"{vocab_change_note(before, after)} ({fix})"


def _layout(config: dict) -> str:
    """``TP=a DP=b ZeRO=z`` (or ``per-layer``) of a config dict plus its ``world_size``."""
    tp = int(config.get("parallel", {}).get("tensor_parallel", 1))
    world = int(config.get("world_size") or tp)
    optim, ds = config.get("optim", {}), config.get("deepspeed", {})
    engine = "per-layer" if optim.get("per_layer") else f"ZeRO={ds.get('zero_stage')}"
    return f"TP={tp} DP={world // tp} {engine}"
