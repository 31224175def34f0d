"""Offline resharding (``megatron-sl checkpoint convert``): a committed checkpoint, written at any
layout, into a new run directory holding it in the layout-free form (``reshard.write_universal``),
recorded for the target TP size.

The source is verified against its manifest first; its engine files are merged over TP and ZeRO
shards in this one process (no ranks, no DeepSpeed engine); the result is written with the same
atomic save protocol as training (``CheckpointManager.save`` in a temp directory, manifest,
rename, ``latest``). Its ``run_config.json`` / client state carry the source config with
``parallel.tensor_parallel`` (and the world size) of the target, so ``megatron-sl train`` with the
target TP and ``run.output_dir=OUT`` resumes from it like from its own checkpoint; any other layout
resumes from it too (the form is layout-free).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Tuple

from .errors import CheckpointError
from .names import CHECKPOINTS_DIR, MANIFEST, UNIVERSAL_DIR, recorded_world_size, resolve_checkpoint


def convert(src, out, tp: int, dp: Optional[int] = None, *, overwrite: bool = False) -> Tuple[Path, str]:
    """Write checkpoint ``src`` layout-free into run directory ``out``, recorded for TP=``tp`` (and DP=``dp``,
    default: the source's). Returns (the new checkpoint directory, a one-line description).
    ``CheckpointError`` / ``ConfigError`` name what is wrong; nothing is written then."""
    from ...parallel.variants import variant_sl_config
    from ..config import ConfigError, from_dict
    from ..config_checks import divisor_keeping_vocab, make_plan, padded_vocab, vocab_change_note
    from .adapters import StateFns
    from .manager import LOCAL, CheckpointManager, read_client_state
    from .reshard import Layout, read_engine_state, saved_layout, write_universal

    src = resolve_checkpoint(src)
    if not (src / MANIFEST).is_file():
        raise CheckpointError(f"{src} is not a committed megatron-sl checkpoint (no {MANIFEST}); pass a "
                              f"<run>/checkpoints/step_XXXXXXXX directory or a run directory")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"--tp {tp!r} must be a positive integer")
    out = Path(out)
    if (out / CHECKPOINTS_DIR).exists() and any((out / CHECKPOINTS_DIR).iterdir()) and not overwrite:
        raise CheckpointError(f"{out / CHECKPOINTS_DIR} exists and is not empty (pass --overwrite to replace it)")
    info = CheckpointManager(src.parent.parent, group=LOCAL).verify_checkpoint(src)
    client = read_client_state(src)
    if "config" not in client:
        raise CheckpointError(f"{src}: the client state holds no resolved config")
    cfg = from_dict(client["config"], source=str(src))
    world = recorded_world_size(src)
    source = saved_layout(client, world)
    if source is None:  # already layout-free: its recorded config is the layout to start from
        source = Layout.of(cfg, world)
    dp = source.dp if dp is None else dp
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ConfigError(f"--dp {dp!r} must be a positive integer")
    try:
        old_plan = make_plan(cfg, world, check_outputs=False, check_inputs=False)
    except ConfigError as e:
        raise CheckpointError(f"{src}: the checkpoint's config does not validate: {e}") from None
    d = cfg.model.make_vocab_size_divisible_by
    new_cfg = from_dict(dict(cfg.to_dict(), parallel=dict(cfg.to_dict()["parallel"], tensor_parallel=tp)),
                        source="--tp")
    make_plan(new_cfg, tp * dp, check_outputs=False, check_inputs=False)  # ConfigError: not a valid TP size
    state = read_engine_state(src, source, old_plan.preset, variant_sl_config(old_plan.sl_config, cfg.model.variant))
    rows = state.tensors["fp32"].vocab_size
    base = cfg.model.vocab_size or _tokenizer_vocab(cfg.data.tokenizer) or rows
    # keep the padded vocabulary when a make_vocab_size_divisible_by does at the new TP size (its
    # extra rows are in the output softmax); else the resume re-pads it (reshard.repad_vocab)
    keep = divisor_keeping_vocab(base, rows, tp, d * source.tp, d)
    note = ""
    if keep is None:
        note = f" ({vocab_change_note(rows, padded_vocab(base, d, tp))} on resume)"
    elif keep != d:
        new_cfg = from_dict(dict(new_cfg.to_dict(), model=dict(new_cfg.to_dict()["model"],
                                                               make_vocab_size_divisible_by=keep)), source="--tp")
        note = f" model.make_vocab_size_divisible_by={keep} (keeps the {rows}-row padded vocabulary)"
    target = Layout(tp, dp, source.zero_stage)
    new_client = {k: v for k, v in client.items() if k not in ("layout", "format")}
    new_client.update(config=new_cfg.to_dict(), universal=True, converted_from={"path": str(src),
                                                                               "layout": source.to_dict()})
    record = {"config": new_cfg.to_dict(), "world_size": tp * dp, "universal": True}
    tmp_out = out.with_name(f".{out.name}.convert-tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    try:
        mgr = CheckpointManager(tmp_out, keep_last=1, group=LOCAL)
        path = mgr.save(info.step, StateFns(save=lambda d: write_universal(state, Path(d) / UNIVERSAL_DIR),
                                            load=_not_loadable),
                        new_client, run_config=record)
        if (out / CHECKPOINTS_DIR).exists():
            shutil.rmtree(out / CHECKPOINTS_DIR)
        out.mkdir(parents=True, exist_ok=True)
        (tmp_out / CHECKPOINTS_DIR).rename(out / CHECKPOINTS_DIR)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    final = out / CHECKPOINTS_DIR / path.name
    return final, (f"{src} (step {info.step}, {source}) -> {final}: layout-free, recorded for {target}; resume with "
                   f"parallel.tensor_parallel={tp}{note} run.output_dir={out} (any other TP / DP / ZeRO stage works "
                   f"too)")


def _tokenizer_vocab(path) -> Optional[int]:
    """The tokenizer's vocabulary size, None when it cannot be read here (then the padded size is
    checked again when a run resumes)."""
    try:
        from ..data import load_tokenizer

        return int(load_tokenizer(path).vocab_size)
    except Exception:  # noqa: BLE001 -- any unreadable tokenizer: fall back to the stored rows
        return None


def _not_loadable(directory) -> None:
    raise CheckpointError(f"{directory}: a layout-free checkpoint is loaded through resharding, not as engine files")
