"""training.checkpoint: crash-safe training checkpoints -- atomic saves, verified resume,
keep-last-K, and resume on another parallel layout.

Modules (public names are imported lazily, so the torch-free ones stay cheap for the data
pipeline and the launcher's checks):

* ``atomic`` -- all-or-nothing file writes (temp sibling, fsync, ``os.replace``), checksums; shared
  with the data pipeline;
* ``names`` -- the on-disk names (``step_XXXXXXXX``, ``latest``, ...) and the two format versions,
  checked on read;
* ``errors`` -- ``CheckpointError`` / ``CheckpointWarning``;
* ``rank_state`` -- per-rank RNG streams and SL support metadata;
* ``adapters`` -- engine adapters (DeepSpeed engine, plain state dicts, ``save_state``/``load_state``);
* ``manager`` -- ``CheckpointManager``: the save protocol, verification, pruning and resume;
* ``reshard`` -- resume on another TP / DP / ZeRO layout through DeepSpeed's universal form with
  the SL layers' TP rule; ``convert`` -- the same offline (``megatron-sl checkpoint convert``).
"""

from __future__ import annotations

from megatron_sl.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "errors",
    "CheckpointWarning": "errors",
    "atomic_write": "atomic",
    "file_checksum": "atomic",
    "fsync_dir": "atomic",
    "replace_durable": "atomic",
    "temp_path_for": "atomic",
    "torch_save_durable": "atomic",
    "write_durable": "atomic",
    "HASHES": "atomic",
    "ABANDONED_RE": "names",
    "CLIENT_FORMAT": "names",
    "CLIENT_STATE": "names",
    "ENGINE_DIR": "names",
    "FORMAT": "names",
    "LAST_GOOD": "names",
    "LATEST": "names",
    "MANIFEST": "names",
    "RANKS_DIR": "names",
    "RUN_CONFIG": "names",
    "STEP_RE": "names",
    "TMP_PREFIX": "names",
    "TRASH_PREFIX": "names",
    "UNIVERSAL_DIR": "names",
    "rank_file": "names",
    "step_dirname": "names",
    "capture_rng_state": "rank_state",
    "restore_rng_state": "rank_state",
    "sl_support_metadata": "rank_state",
    "check_sl_support": "rank_state",
    "StateFns": "adapters",
    "DeepSpeedState": "adapters",
    "TorchState": "adapters",
    "as_state_io": "adapters",
    "CheckpointInfo": "manager",
    "CheckpointManager": "manager",
    "read_client_state": "manager",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
