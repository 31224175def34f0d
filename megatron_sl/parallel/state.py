"""initialize_model_parallel: the one function that sets up megatron-core's parallel state, on a
GPU or on the CPU.

It wraps ``megatron.core.parallel_state.initialize_model_parallel``: first the CPU shims
(``cpu_shims.apply_cpu_shims``, a no-op where CUDA is available), then a fresh parallel state (an
existing one is destroyed, so one process can set up several layouts), then, if ``seed`` is given,
torch's and megatron's RNG tracker seeds (``cpu_shims.seed_model_parallel``). After it, megatron's
tensor-parallel layers and ours run on CPU tensors -- e.g. a standalone
``SLColumnParallelLinear(..., gather_output=True)`` -- without anything applied by hand. The
training ranks (``training.distributed.init_distributed``), the single-process export and the
tests all set up parallel state through it.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              seed: Optional[int] = None) -> None:
    """CPU shims (without CUDA) + megatron parallel_state (TP x PP, the rest data parallel) + seeds.
    Needs ``torch.distributed`` initialised."""
    from megatron.core import parallel_state as ps

    from .cpu_shims import apply_cpu_shims, seed_model_parallel

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("initialize_model_parallel needs torch.distributed initialised (init_process_group) first")
    apply_cpu_shims()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size,
                                 pipeline_model_parallel_size=pipeline_model_parallel_size)
    if seed is not None:
        seed_model_parallel(seed)
