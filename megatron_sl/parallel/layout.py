"""Row layouts of megatron's fused linear slots and megatron's rule for sharding them over TP.

Owns the bookkeeping (pure torch, no megatron import) that maps each row of a fused weight to
the separate matrix ("part") it belongs to, as the SLTrain paper factorises q, k, v, gate and up
separately:

* ``linear_qkv`` (GQA): megatron's global row order is, per query group g = 0..ng-1,
  [q heads of g (np/ng · hn rows), k head g (hn rows), v head g (hn rows)];
  parts q [np·hn × d], k [ng·hn × d], v [ng·hn × d].
* ``linear_fc1`` with a gated linear unit: global rows [gate (F rows); up (F rows)] (the MLP
  applies ``act(chunk 0) * chunk 1``), sharded with stride 2 so each rank holds
  [gate_local; up_local].
* every other slot: one part.

``shard_rows`` is megatron's ``_initialize_affine_weight_cpu`` split rule: the global rows are cut
into stride·tp equal chunks and rank t keeps chunks t, t+tp, ... in that order.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class FusedLayout:
    """The parts of a fused weight and, for every global fused row j, which part row it is.

    parts: ((name, rows), ...) in the order the parts are listed.
    part_id[j], part_row[j]: fused row j is row part_row[j] of part parts[part_id[j]].
    """

    parts: Tuple[Tuple[str, int], ...]
    part_id: torch.Tensor
    part_row: torch.Tensor

    @property
    def out_features(self) -> int:
        return int(self.part_id.numel())


def single_layout(name: str, out_features: int) -> FusedLayout:
    return FusedLayout(((name, out_features),), torch.zeros(out_features, dtype=torch.int64),
                       torch.arange(out_features, dtype=torch.int64))


def qkv_layout(num_heads: int, num_query_groups: int, head_dim: int) -> FusedLayout:
    """Megatron's interleaved GQA layout [ng, (np/ng + 2)·hn] with parts q, k, v."""
    if num_heads % num_query_groups:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_query_groups={num_query_groups}")
    per_group = num_heads // num_query_groups
    ids, rows = [], []
    for g in range(num_query_groups):
        q0 = g * per_group * head_dim
        ids.append(torch.full((per_group * head_dim,), 0)); rows.append(torch.arange(q0, q0 + per_group * head_dim))
        for part in (1, 2):
            ids.append(torch.full((head_dim,), part)); rows.append(torch.arange(g * head_dim, (g + 1) * head_dim))
    parts = (("q", num_heads * head_dim), ("k", num_query_groups * head_dim), ("v", num_query_groups * head_dim))
    return FusedLayout(parts, torch.cat(ids).long(), torch.cat(rows).long())


def glu_layout(ffn_hidden_size: int) -> FusedLayout:
    """Gated fc1: global rows [gate; up], parts gate [F × d] and up [F × d]."""
    f = ffn_hidden_size
    return FusedLayout((("gate", f), ("up", f)), torch.cat([torch.zeros(f), torch.ones(f)]).long(),
                       torch.cat([torch.arange(f), torch.arange(f)]).long())


def shard_rows(out_features: int, tp_size: int, tp_rank: int, stride: int = 1) -> torch.Tensor:
    """Global rows held by ``tp_rank``, in local order (megatron's stride-aware split)."""
    chunks = stride * tp_size
    if out_features % chunks:
        raise ValueError(f"output size {out_features} is not divisible by stride*tp = {stride}*{tp_size}")
    size = out_features // chunks
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in range(tp_rank, chunks, tp_size)])


@dataclasses.dataclass(frozen=True)
class LocalRows:
    """What one column-parallel rank holds of a fused layout.

    rows[p]: the rows of part p held locally (increasing), in local order.
    perm: local output k = concatenated part outputs [..., perm[k]]; None when the concatenation of
        the part outputs already is the local layout.
    """

    global_rows: torch.Tensor
    rows: Tuple[torch.Tensor, ...]
    perm: Optional[torch.Tensor]


def local_rows(layout: FusedLayout, tp_size: int, tp_rank: int, stride: int = 1) -> LocalRows:
    g_rows = shard_rows(layout.out_features, tp_size, tp_rank, stride)
    pid, prow = layout.part_id[g_rows], layout.part_row[g_rows]
    rows, positions = [], []
    for p in range(len(layout.parts)):
        mask = pid == p
        rows.append(prow[mask])
        positions.append(torch.nonzero(mask).flatten())
    cat_pos = torch.cat(positions)            # local position of each concatenated output column
    perm = torch.argsort(cat_pos)
    if torch.equal(perm, torch.arange(perm.numel())):
        perm = None
    return LocalRows(g_rows, tuple(rows), perm)
