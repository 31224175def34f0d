"""Gradient arithmetic under TP x DP that DeepSpeed does not do for us: the global gradient norm
(TP-sharded parameters summed over the TP group, replicated ones counted once), clipping with it,
and the data-parallel average used by the per-layer optimizer.

The norm definition is the one DeepSpeed uses with an mpu:
sqrt(sum over TP ranks of |g_sharded|^2 + |g_replicated|^2), gradients already DP-averaged.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .optim import is_tp_sharded

CLIP_EPS = 1e-6  # same as torch.nn.utils.clip_grad_norm_ and DeepSpeed
# Elements per float64 partial sum: the squares are formed chunk by chunk, so the scratch stays at
# 16 MiB instead of 16 bytes per element of the largest gradient (2 GiB for a 7B embedding).
NORM_CHUNK = 1 << 20


def squared_sum(t: torch.Tensor) -> torch.Tensor:
    """sum(t²) in float64, computed in chunks of NORM_CHUNK elements (0-dim tensor on t's device)."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for chunk in flat.split(NORM_CHUNK):
        total += chunk.double().pow(2).sum()
    return total


def squared_norm_parts(params: Iterable[torch.nn.Parameter], device=None) -> torch.Tensor:
    """[sum |g|^2 of TP-sharded grads, sum |g|^2 of replicated grads] on this rank, float64, on
    ``device`` (default: the first gradient's device, so collectives work with nccl too)."""
    out = None if device is None else torch.zeros(2, dtype=torch.float64, device=device)
    for p in params:
        if p.grad is None:
            continue
        if out is None:
            out = torch.zeros(2, dtype=torch.float64, device=p.grad.device)
        out[0 if is_tp_sharded(p) else 1] += squared_sum(p.grad).to(out.device)
    return out if out is not None else torch.zeros(2, dtype=torch.float64)


def global_norm(parts: torch.Tensor, tp_group: Optional[dist.ProcessGroup]) -> float:
    """Combine ``squared_norm_parts`` into the global norm: sharded part summed over TP."""
    sharded = parts[0].clone()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    return float((sharded + parts[1]).sqrt())


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Factor to multiply gradients by (1.0 if no clipping is needed or clipping is off)."""
    if max_norm <= 0:
        return 1.0
    coef = max_norm / (norm + CLIP_EPS)
    return coef if coef < 1.0 else 1.0


def dp_average_(grad: torch.Tensor, dp_group: Optional[dist.ProcessGroup]) -> None:
    """In-place mean over the data-parallel group (sum, then scale: DeepSpeed's default order)."""
    if dp_group is None:
        return
    n = dist.get_world_size(dp_group)
    if n > 1:
        dist.all_reduce(grad, group=dp_group)
        grad.mul_(1.0 / n)


def mark_sequence_parallel_params(model: torch.nn.Module, tp_group) -> int:
    """Tag megatron's ``sequence_parallel`` replicated parameters as TP-partial.

    Under sequence parallelism a replicated parameter applied to sequence-sharded activations sees
    only its rank's tokens; megatron sums these gradients in ``finalize_model_grads``, which
    DeepSpeed does not call. Tagged, they are summed over TP once per step with the SL factors
    (``megatron_sl.parallel.grad_sync``). Our own layers tag theirs already. Returns the number tagged.
    """
    from ..parallel.grad_sync import is_partial_tp_grad, mark_partial_tp_grad

    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0
    n = 0
    for p in model.parameters():
        if (p.requires_grad and getattr(p, "sequence_parallel", False) and not is_tp_sharded(p)
                and not is_partial_tp_grad(p)):
            mark_partial_tp_grad(p, tp_group)
            n += 1
    return n
