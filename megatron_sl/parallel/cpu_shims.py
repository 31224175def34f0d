"""The only place megatron-core is adapted to run without CUDA (CPU demo, CI); no-op on GPUs.

megatron-core 0.16.1 assumes CUDA in three places on the paths we use:

* A. ``torch.cuda.current_device()`` picks the device of communication / activation buffers
  (global memory buffer, sequence-parallel gathers, RoPE ``inv_freq``): made to return the CPU
  (a constant under ``torch.compile``).
* B. the RNG tracker stores CUDA generator states (``model_parallel_cuda_manual_seed`` and every
  attention forward's ``fork()``): replaced by a tracker of CPU generator states, one stream per
  name as on GPU (so tensor-parallel dropout still differs per TP rank).
* C. the default causal mask (used when ``attention_mask=None``) is created with ``device="cuda"``:
  replaced by a CPU one.
* D. activation recompute (``tensor_parallel.checkpoint``: megatron's ``CheckpointFunction``, used by
  ``recompute_granularity`` full and selective) saves and restores the CUDA generator state around
  the recomputed forward through ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``: without CUDA
  there is no such state, so they become a placeholder and a no-op. The CPU generator and the
  tracker's states (shim B) are saved and restored by megatron itself (``torch.get_rng_state``,
  tracker ``get_states``/``set_states``), so a recomputed forward replays the same random streams.

Under ``torch.compile`` the tracker's ``fork`` cannot swap generator states inside the graph, so
there it is a no-op (the region draws from torch's default generator); the models built by
``megatron_sl.model`` have no dropout, so nothing in them draws.

``apply_cpu_shims()`` installs them once (idempotent) and does nothing when CUDA is available, so
the same code runs the CPU demo and the GPU cluster. ``seed_model_parallel(seed)`` seeds torch and
megatron's tracker on either device.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False
_TRACKER_CLS = None


def _cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's CudaRNGStatesTracker bookkeeping over CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            if torch.compiler.is_compiling():
                # generator states cannot be swapped inside a compiled graph; the models built here
                # have no dropout, so the region draws nothing (see the module doc)
                yield
                return
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


_NO_CUDA_RNG_STATE = torch.empty(0, dtype=torch.uint8)


def _cpu_current_device():
    return torch.device("cpu")


def _fold_under_compile(fn) -> None:
    """Let torch.compile treat ``fn`` (installed as ``torch.cuda.current_device``) as the constant
    it is. dynamo classifies ``torch.cuda.*`` functions by what the name resolves to when it first
    builds its rule map: before the shim, ``fn`` is plain Python and is inlined; after it, ``fn``
    counts as a torch function, which may only be folded if it is in dynamo's constant-fold table."""
    from torch._dynamo.variables import torch as dynamo_torch

    table = getattr(dynamo_torch, "constant_fold_functions", None)
    if isinstance(table, dict):
        table.setdefault(fn, None)


def _cpu_get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    return _NO_CUDA_RNG_STATE


def _cpu_set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    return None


@functools.lru_cache(maxsize=None)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _install_cpu_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    global _TRACKER_CLS
    if _TRACKER_CLS is None:
        _TRACKER_CLS = _cpu_tracker_class()
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, _TRACKER_CLS):
        mrandom._CUDA_RNG_STATE_TRACKER = _TRACKER_CLS()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def apply_cpu_shims() -> bool:
    """Install shims A, B, C, D when CUDA is absent; returns True if they are (now) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _fold_under_compile(_cpu_current_device)
    torch.cuda.current_device = _cpu_current_device  # A
    _install_cpu_tracker()  # B
    from megatron.core.fusions import fused_softmax  # C
    from megatron.core.transformer import utils as tutils

    tutils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    from megatron.core.tensor_parallel import random as mrandom  # D

    mrandom._get_cuda_rng_state = _cpu_get_cuda_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_cuda_rng_state
    _APPLIED = True
    return True


def seed_model_parallel(seed: int) -> None:
    """Seed torch's default generator and megatron's RNG tracker (data / TP / expert streams).

    Needs ``parallel_state`` to be initialised (the TP rank offsets the TP stream)."""
    from megatron.core import tensor_parallel

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    torch.manual_seed(seed)
    if apply_cpu_shims():
        _install_cpu_tracker()  # in case someone re-initialised the tracker (force_reset)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
