"""Model FLOPs of one optimizer step and the peak FLOP/s that MFU is relative to.

Per micro-batch of T = micro_batch_size x seq_length tokens and per transformer layer:

* each SL matrix (out m x in n, rank r, nnz support entries): the forward + backward arithmetic of
  the path the layer runs (``sl.path``, or for "auto" the path ``core.cost_model.choose_path``
  picks for the unsharded matrix), counted by ``core.cost_model.path_costs`` with sparse
  efficiency 1, i.e. the FLOPs executed, not their GEMM-time equivalent;
* each dense matrix (dense variant, or a slot not in ``sl.targets``): 6·T·m·n;
* attention scores and the weighted sum: 12·T·s·(heads·head_dim) (Megatron-LM's convention:
  the causal mask's skipped half is counted);
* the output layer: 6·T·vocab·hidden once per micro-batch (the embedding lookup does no GEMM).

The dense-equivalent figure counts every one of the seven matrices as dense (6·T·m·n): the work
a full-rank model of the same shape would do, so its MFU compares SL throughput with dense
throughput on the same axis. Both are summed over every micro-batch of the global batch.
TP-replicated work (e.g. a column-parallel layer's replicated A) is counted once: these are
model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch

from ...core.cost_model import choose_path, path_costs
from ...core.support import nnz_for
from ...model.param_count import slot_matrices


def step_flops(preset, sl_config, micro_batch_size: int, global_batch_size: int, vocab_size: int,
               device_type: str) -> dict:
    """{"sl": executed model FLOPs, "dense_equivalent": FLOPs of the dense model} per optimizer step.

    ``sl_config`` is the variant's SLConfig (None for the dense variant; density 0 for low-rank)."""
    t = micro_batch_size * preset.seq_length
    calls = global_batch_size // micro_batch_size
    sl, dense = 0, 0
    for slot, mats in slot_matrices(preset).items():
        for _part, m, n in mats:
            full = 6 * t * m * n
            dense += full
            if sl_config is None or not sl_config.is_sl(slot):
                sl += full
                continue
            r, nnz = sl_config.rank, nnz_for(m, n, sl_config.density)
            path = sl_config.path if sl_config.path != "auto" else choose_path(t, m, n, r, nnz, device_type)
            sl += int(path_costs(t, m, n, r, nnz, 1.0, device_type)[path])
    attn = 12 * t * preset.seq_length * preset.num_attention_heads * preset.head_dim
    head = 6 * t * vocab_size * preset.hidden_size
    per_call_sl = preset.num_layers * (sl + attn) + head
    per_call_dense = preset.num_layers * (dense + attn) + head
    return {"sl": calls * per_call_sl, "dense_equivalent": calls * per_call_dense}


@functools.lru_cache(maxsize=None)  # once per process and device: runs in one process share it
def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Best matmul FLOP/s of ``device`` in ``dtype`` over about ``seconds`` (the default peak when
    ``metrics.peak_tflops`` is not configured; an achieved rate, not the vendor's peak)."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    return 2.0 * n ** 3 / best


def peak_flops_per_device(peak_tflops: Optional[float], device: torch.device, precision: str) -> tuple:
    """(FLOP/s of one device, "configured" | "measured")."""
    if peak_tflops is not None:
        return float(peak_tflops) * 1e12, "configured"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_peak_flops(device, dtype), "measured"
