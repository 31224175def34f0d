"""What each rank stores besides its engine files (``ranks/rank_XXXXX.pt``): its RNG streams and the
SL support metadata of its shards.

``capture_rng_state`` / ``restore_rng_state``: python ``random``, numpy, torch CPU, CUDA and
megatron's model-parallel RNG tracker, as tensors and plain lists (loadable with ``weights_only``).
They are per rank and are restored only when the checkpoint is resumed on the layout that wrote
it (see ``reshard`` for what a changed layout carries instead).

``sl_support_metadata`` / ``check_sl_support``: ``{module name: get_extra_state()}`` of every SL
layer (seed, density, shapes, index hash, TP shard), compared with the model before loading.
"""

from __future__ import annotations

import random
import sys
from typing import Dict, Optional

import numpy as np
import torch

from .errors import CheckpointError

def _megatron_tracker():
    mrandom = sys.modules.get("megatron.core.tensor_parallel.random")
    if mrandom is None:  # megatron never imported here: its tracker cannot hold state
        return None
    if not getattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    return mrandom.get_cuda_rng_tracker()


def capture_rng_state() -> dict:
    """This process's RNG streams, as tensors and plain lists (loadable with ``weights_only``):
    python ``random``, numpy's global generator, torch CPU, every CUDA device (if CUDA is in use)
    and megatron's model-parallel RNG tracker (if initialised)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    tracker = _megatron_tracker()
    if tracker is not None:
        tstates = {}
        for name, st in tracker.get_states().items():
            if isinstance(st, torch.Generator):
                st = st.get_state()
            tstates[name] = st.clone()
        state["megatron_tracker"] = tstates
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise CheckpointError("checkpoint holds CUDA RNG states but this process has no CUDA device")
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        tracker = _megatron_tracker()
        if tracker is None:
            raise CheckpointError("checkpoint holds megatron RNG tracker states but the tracker is not "
                                  "initialised in this process (initialise model parallel first)")
        current = tracker.get_states()
        if set(current) != set(state["megatron_tracker"]):
            raise CheckpointError(f"megatron RNG tracker streams differ: checkpoint {sorted(state['megatron_tracker'])} "
                                  f"vs this process {sorted(current)}")
        new = {}
        for name, st in state["megatron_tracker"].items():
            if isinstance(current[name], torch.Generator):
                gen = current[name]
                gen.set_state(st)
                new[name] = gen
            else:
                new[name] = st.clone()
        tracker.set_states(new)


def sl_support_metadata(model: Optional[torch.nn.Module]) -> Dict[str, dict]:
    """``{module name: get_extra_state()}`` of every SL layer in ``model`` (the layers whose extra
    state carries an ``index_hash``): seed, density, shapes, index hash, TP shard."""
    if model is None:
        return {}
    out = {}
    for name, mod in model.named_modules():
        get = getattr(type(mod), "get_extra_state", None)
        if get is None or get is torch.nn.Module.get_extra_state:
            continue
        meta = mod.get_extra_state()
        if isinstance(meta, dict) and "index_hash" in meta:
            out[name] = meta
    return out


def check_sl_support(model: Optional[torch.nn.Module], saved: Dict[str, dict], where: str) -> None:
    """Raise ``CheckpointError`` if the model's SL layers differ from the checkpoint's (a different
    seed, density, shape, TP layout or support index), naming the first differing layer."""
    if model is None:
        return
    mine = sl_support_metadata(model)
    if set(mine) != set(saved):
        only_ckpt, only_model = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
        raise CheckpointError(f"{where}: SL layers differ from the model: only in the checkpoint {only_ckpt[:5]}, "
                              f"only in the model {only_model[:5]}")
    for name in sorted(mine):
        if mine[name] != saved[name]:
            diff = sorted(k for k in set(mine[name]) | set(saved[name]) if mine[name].get(k) != saved[name].get(k))
            raise CheckpointError(f"{where}: SL support metadata of layer {name!r} differs in {diff}: "
                                  f"checkpoint {saved[name]} vs model {mine[name]}")

