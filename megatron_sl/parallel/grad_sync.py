"""Gradients summed over the tensor-parallel group once per optimizer step, coalesced.

Some TP-replicated parameters see only this rank's share of the computation, so their gradient on
one rank is partial and the full gradient is the sum over the TP group:

* the replicated factor of every SL matrix: A of column-parallel parts (q, k, v, gate, up), whose
  rank only holds some output rows; B of row-parallel parts (o, down), whose rank only holds some
  input columns;
* under sequence parallelism, weights applied to sequence-sharded activations: the RMSNorm
  weights and a row-parallel bias.

The layers tag such parameters (``mark_partial_tp_grad``) and issue no collective for them in
backward: the backward of an SL layer issues exactly the collectives of megatron-core's
ColumnParallelLinear / RowParallelLinear of the same kind. Gradients accumulate locally over the
micro-batches of a step; ``finalize_sl_grads`` then sums them over TP in a few flat buckets (one
all-reduce per bucket), before clipping and the optimizer -- what megatron-core's
``finalize_model_grads`` does for layernorm gradients under sequence parallelism. Anyone driving
the layers from their own loop calls it once per optimizer step, after the last backward::

    loss.backward()                      # every micro-batch
    finalize_sl_grads(model)             # once, before clip_grad_norm_ / optimizer.step()

The training engines call ``allreduce_coalesced_`` on whatever holds the accumulated gradients
(``.grad`` of the parameters, or a ZeRO partition of a param group that holds only tagged
parameters; see ``megatron_sl.training``).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

PARTIAL_TP_GRAD = "sl_partial_tp_grad"   # parameter attribute: its gradient must be summed over TP
BUCKET_ELEMENTS = 1 << 26                # 64 Mi elements (256 MiB fp32) per all-reduce at most


def mark_partial_tp_grad(param: torch.nn.Parameter, tp_group) -> None:
    """Tag ``param`` as TP-replicated with a partial gradient (summed over ``tp_group`` per step).
    Nothing is tagged when the group has a single rank."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    setattr(param, PARTIAL_TP_GRAD, True)
    param._sl_tp_group = tp_group


def is_partial_tp_grad(param: torch.Tensor) -> bool:
    return bool(getattr(param, PARTIAL_TP_GRAD, False))


def partial_tp_grad_params(params: Union[torch.nn.Module, Iterable[torch.nn.Parameter]]) -> List[torch.nn.Parameter]:
    """The tagged parameters of a module (or an iterable of parameters), in order."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    return [p for p in params if p.requires_grad and is_partial_tp_grad(p)]


def tp_group_of(params: Sequence[torch.nn.Parameter], default=None):
    """The TP group the tagged ``params`` were marked with (all must agree), else ``default``, else
    megatron's TP group."""
    groups = {id(g): g for g in (getattr(p, "_sl_tp_group", None) for p in params) if g is not None}
    if len(groups) > 1:
        raise ValueError("parameters tagged for TP gradient summation belong to different process groups")
    if groups:
        return next(iter(groups.values()))
    if default is not None:
        return default
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def allreduce_coalesced_(tensors: Sequence[torch.Tensor], group, bucket_elements: int = BUCKET_ELEMENTS) -> int:
    """Sum ``tensors`` in place over ``group``, packed into flat buckets of at most ``bucket_elements``
    (one all-reduce each; a tensor larger than a bucket is reduced alone, in place). Returns the
    number of all-reduce calls issued."""
    if group is None or dist.get_world_size(group) == 1:
        return 0
    calls, bucket, size = 0, [], 0

    def flush():
        nonlocal calls, bucket, size
        if not bucket:
            return
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], group=group)
        else:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(synced)
        calls += 1
        bucket, size = [], 0

    by_dtype = {}
    for t in tensors:
        if t is not None and t.numel():
            by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():
        for t in ts:
            if size and size + t.numel() > bucket_elements:
                flush()
            bucket.append(t)
            size += t.numel()
        flush()
    return calls


def finalize_sl_grads(params: Union[torch.nn.Module, Iterable[torch.nn.Parameter]], tp_group=None,
                      bucket_elements: int = BUCKET_ELEMENTS) -> int:
    """Sum the accumulated ``.grad`` of every tagged parameter over the TP group, coalesced.

    Call once per optimizer step after the last micro-batch's backward (and after any data-parallel
    averaging, or before it: the two sums commute). Returns the number of all-reduce calls."""
    tagged = [p for p in partial_tp_grad_params(params) if p.grad is not None]
    if not tagged:
        return 0
    return allreduce_coalesced_([p.grad for p in tagged], tp_group_of(tagged, tp_group), bucket_elements)
