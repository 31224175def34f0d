"""``megatron-sl train --dry-run``: build the sharded model on every rank and print per-rank
parameter and memory figures, without data loaders, optimizer or training.

Per rank: trainable parameters split into SL low-rank factors (B, A), sparse values and dense
parameters (embeddings, output layer, norms, dense baselines' linears), resident SL index bytes, and
an estimate of model-state memory (weights, gradients, optimizer states, each divided over the
data-parallel ranks as the ZeRO stage partitions it; activations are not included).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import TrainConfig
from .distributed import init_distributed, resolve_device
from .validate import Plan

STATE_BYTES_PER_PARAM = {"adamw": 8.0, "adamw8bit": 2.03}  # measured: bnb AdamW8bit ≈ 2.03 B/param


def local_figures(model: torch.nn.Module) -> dict:
    from ..parallel.shard import SLShard

    low_rank = sparse = index_bytes = 0
    for m in model.modules():
        if isinstance(m, SLShard):
            low_rank += m.B.numel() + m.A.numel()
            sparse += m.values.numel()
            index_bytes += m.layout.idx.numel() * m.layout.idx.element_size()
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "low_rank": low_rank, "sparse": sparse, "dense": total - low_rank - sparse,
            "index_bytes": index_bytes}


def model_state_bytes(params: int, cfg: TrainConfig, dp: int) -> dict:
    """Weights / grads / optimizer-state bytes of one rank under the configured precision and ZeRO stage."""
    stage = 0 if cfg.optim.per_layer else cfg.deepspeed.zero_stage
    bf16 = cfg.train.precision == "bf16"
    weights = params * (2 if bf16 else 4)
    master = params * 4 if bf16 else 0          # fp32 master copy kept by DeepSpeed in bf16 runs
    grads = params * (2 if bf16 else 4)
    states = params * STATE_BYTES_PER_PARAM.get(cfg.optim.name, 8.0)
    if stage >= 1:
        master, states = master / dp, states / dp
    if stage >= 2:
        grads /= dp
    if stage >= 3:
        weights /= dp
    return {"weights": weights, "master": master, "grads": grads, "optimizer": states,
            "total": weights + master + grads + states}


def dry_run(cfg: TrainConfig, plan: Plan) -> list:
    """Build the model on every rank; rank 0 prints one line per rank. Returns the rows (all ranks)."""
    from megatron.core import parallel_state as ps

    from ..model import build_model

    device = resolve_device(cfg.launch.device)
    init_distributed(device, plan.tp, cfg.train.seed, use_deepspeed=False)
    torch.manual_seed(cfg.train.seed)
    model = build_model(plan.preset, variant=cfg.model.variant, sl_config=plan.sl_config, vocab_size=plan.vocab_size,
                        seq_length=plan.seq_length, sequence_parallel=cfg.parallel.sequence_parallel,
                        params_dtype=torch.float32, seed=cfg.train.seed)
    row = {"rank": dist.get_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
           "dp_rank": ps.get_data_parallel_rank(), **local_figures(model)}
    row["memory"] = model_state_bytes(row["params"], cfg, plan.dp)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        stage = "per-layer" if cfg.optim.per_layer else f"ZeRO-{cfg.deepspeed.zero_stage}"
        print(f"[dry-run] {cfg.model.variant} preset {cfg.model.preset!r}: world {plan.world_size} = TP {plan.tp} x "
              f"DP {plan.dp}; {cfg.train.precision}, {cfg.optim.name}, {stage}; model-state memory is an estimate "
              f"(activations excluded)")
        print(f"{'rank':>4} {'tp':>3} {'dp':>3} {'params':>14} {'low-rank':>14} {'sparse':>12} {'dense':>14} "
              f"{'index MiB':>10} {'model-state GiB':>16}")
        for r in rows:
            print(f"{r['rank']:>4} {r['tp_rank']:>3} {r['dp_rank']:>3} {r['params']:>14,} {r['low_rank']:>14,} "
                  f"{r['sparse']:>12,} {r['dense']:>14,} {r['index_bytes'] / 2**20:>10.2f} "
                  f"{r['memory']['total'] / 2**30:>16.3f}", flush=True)
    dist.barrier()
    return rows
