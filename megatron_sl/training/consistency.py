"""Run-time consistency checks across ranks: tensors that must be identical really are.

* At startup, every parameter, buffer and SL support index must be identical across the
  data-parallel group.
  DeepSpeed broadcasts parameters but never buffers, so an SL support drawn from a per-rank seed
  would silently train different models on different DP ranks (and checkpoints would hold rank 0's
  support only).
* After training, TP-replicated parameters (norms, the replicated SL factor) must be identical
  across the tensor-parallel group (8-bit optimizer states can make them drift; see ``optim``).

Comparisons use a 2-number float64 checksum per tensor (sum and a position-weighted sum): equal
tensors give equal checksums on every rank, and an exact ``max_abs_diff`` gather is available for
tests and for naming the offender.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
import torch.distributed as dist

from .optim import is_tp_sharded


CHECKSUM_CHUNK = 1 << 20  # elements per float64 chunk: bounded scratch (not 32 B per element of a 7B embedding)


def checksums(tensors: List[torch.Tensor], device) -> torch.Tensor:
    """Per tensor [sum(x), sum(x_i · i/n)] in float64, computed chunk by chunk."""
    out = torch.zeros(len(tensors), 2, dtype=torch.float64, device=device)
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        n = flat.numel()
        for start in range(0, n, CHECKSUM_CHUNK):
            d = flat[start:start + CHECKSUM_CHUNK].to(device=device, dtype=torch.float64)
            w = torch.arange(start + 1, start + d.numel() + 1, dtype=torch.float64, device=device) / n
            out[i, 0] += d.sum()
            out[i, 1] += (d * w).sum()
    return out


def mismatched(named: List[Tuple[str, torch.Tensor]], group, device) -> List[str]:
    """Names whose checksum differs from the group's first rank (identical list on every rank)."""
    if group is None or dist.get_world_size(group) == 1 or not named:
        return []
    mine = checksums([t for _, t in named], device)
    ref = mine.clone()
    dist.broadcast(ref, src=dist.get_process_group_ranks(group)[0], group=group)
    bad = (mine != ref).any(dim=1).to(torch.int32)
    dist.all_reduce(bad, group=group)  # every rank learns about every mismatch
    return [n for (n, _), b in zip(named, bad.tolist()) if b]


def support_indices(module: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The SL layers' support index tensors (kept in ``SupportLayout`` objects, not as buffers)."""
    from ..core.functional import SupportLayout

    out = []
    for name, m in module.named_modules():
        layout = getattr(m, "layout", None)
        if isinstance(layout, SupportLayout):
            out.append((f"support {name}", layout.idx))
    return out


def assert_identical_across_dp(module: torch.nn.Module, dp_group, device) -> None:
    named = [(f"parameter {n}", p) for n, p in module.named_parameters()]
    named += [(f"buffer {n}", b) for n, b in module.named_buffers()]
    named += support_indices(module)
    bad = mismatched(named, dp_group, device)
    if bad:
        raise RuntimeError(f"model differs across data-parallel ranks at start-up (e.g. an SL support drawn from a "
                           f"per-rank seed): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def replicated_params(module: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if not is_tp_sharded(p)]


def replicated_mismatches(module: torch.nn.Module, tp_group, device) -> List[str]:
    """Names of TP-replicated parameters that are not identical across the TP group."""
    return mismatched(replicated_params(module), tp_group, device)


def replicated_max_abs_diff(module: torch.nn.Module, tp_group) -> float:
    """Exact max |p_rank - p_rank0| over all TP-replicated parameters (all-gathers them; tests)."""
    worst = 0.0
    n = dist.get_world_size(tp_group)
    for _, p in replicated_params(module):
        t = p.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t, group=tp_group)
        worst = max(worst, max(float((x - parts[0]).abs().max()) if x.numel() else 0.0 for x in parts))
    return worst


def count_params(params: Iterable[torch.nn.Parameter], tp_group, device="cpu") -> int:
    """Global trainable parameter count: TP-sharded numel summed over TP, replicated once."""
    sharded, replicated = 0, 0
    for p in params:
        if p.requires_grad:
            numel = getattr(p, "ds_numel", p.numel())
            if is_tp_sharded(p):
                sharded += numel
            else:
                replicated += numel
    t = torch.tensor([sharded], dtype=torch.int64, device=device)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(t, group=tp_group)
    return int(t.item()) + replicated
