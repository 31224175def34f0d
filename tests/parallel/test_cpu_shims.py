"""The CPU shims (run in forked ranks so the pytest process keeps its own torch.cuda functions):
idempotent install, CPU buffers and causal mask, and an RNG tracker that keeps one CPU stream per
name -- distinct per TP rank for the model-parallel stream, equal for the data-parallel one --
without disturbing the default generator."""

from __future__ import annotations

import pytest
import torch

import megatron.core  # noqa: F401
from _dist import run_distributed


def _shim_checks(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_data_parallel_rng_tracker_name
    from megatron.core.transformer import utils as tutils

    from megatron_sl.parallel.cpu_shims import apply_cpu_shims, seed_model_parallel

    assert apply_cpu_shims() is True and apply_cpu_shims() is True  # idempotent
    assert torch.cuda.current_device() == torch.device("cpu")
    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    with pytest.raises(ValueError, match="seed=-1"):
        seed_model_parallel(-1)
    seed_model_parallel(5)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        tp_a = torch.rand(4)
    with tracker.fork():
        tp_b = torch.rand(4)
    with tracker.fork(get_data_parallel_rng_tracker_name()):
        dp = torch.rand(4)
    default = torch.rand(4)
    assert not torch.equal(tp_a, tp_b), "the forked stream must advance"
    assert torch.equal(default, torch.rand(4, generator=torch.Generator().manual_seed(5))), \
        "forking must not disturb the default generator"
    return tp_a, dp


@pytest.mark.slow
def test_cpu_shims_and_rng_tracker():
    (tp0, dp0), (tp1, dp1) = run_distributed(_shim_checks, 2, timeout=120)
    assert not torch.equal(tp0, tp1), "model-parallel RNG stream must differ across TP ranks"
    assert torch.equal(dp0, dp1), "data-parallel RNG stream must agree across TP ranks"
