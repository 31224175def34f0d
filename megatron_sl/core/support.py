"""The fixed random sparse support of an SL layer: sampling, compact storage, sharding, hashing.

The support of an out x in weight is nnz = floor(density * out * in) distinct positions drawn
uniformly without replacement over the whole matrix, from generators seeded by
(global seed, layer name) -- never from the global RNG and never from construction order -- and
stored sorted as flat row-major int32 indices (4 bytes per nnz; the research code uses int64).

Sampling is tiled so a tensor-parallel rank only does the work of its own shard: the matrix is
cut into TILE x TILE tiles; the number of support entries in each tile is drawn from the
multivariate hypergeometric distribution (sequential conditional draws from numpy's legacy
``RandomState``, whose stream is frozen), then each tile draws that many distinct positions
uniformly from its own generator. Counts-then-uniform-within-tiles is exactly uniform over all
nnz-subsets of the matrix. Each entry's init draw (``SupportSample.uniform``) comes from its
tile's generator too, so a shard can initialise its sparse values without the global support.

Tensor-parallel shards hold the part of the global support inside their row block
(column-parallel) or column block (row-parallel), re-indexed locally; ``select_rows`` and
``select_cols`` return it from a (possibly already restricted) support, together with the positions
of those entries in that support, so every TP size represents the same W.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

INT32_LIMIT = 2**31 - 1
TILE = 1024  # part of the support's definition: changing it changes every support


def nnz_for(out_features: int, in_features: int, density: float) -> int:
    return int(density * out_features * in_features)


def derive_seed(seed: int, name: str, purpose: str = "support") -> int:
    """A 63-bit seed from (global seed, layer name, purpose), stable across processes."""
    digest = hashlib.sha256(f"{int(seed)}/{name}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= INT32_LIMIT else torch.int64


def sample_uniform_subset(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct integers from [0, numel), uniform over all k-subsets, sorted (int64).

    Dense draws use randperm; sparse draws take iid samples until k distinct values exist and
    then keep a uniformly random k of them, which is uniform over k-subsets by symmetry and
    costs O(k log k) instead of O(numel) (a 7B MLP matrix has 45M entries).
    """
    if not 0 <= k <= numel:
        raise ValueError(f"cannot draw {k} distinct positions from {numel}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 4 * k >= numel:
        return torch.randperm(numel, generator=generator)[:k].sort().values
    pool = torch.empty(0, dtype=torch.int64)
    while pool.numel() < k:
        draw = torch.randint(0, numel, (int((k - pool.numel()) * 1.1) + 16,), generator=generator)
        pool = torch.unique(torch.cat([pool, draw]))
    keep = torch.randperm(pool.numel(), generator=generator)[:k]
    return pool[keep].sort().values


class SupportSample(NamedTuple):
    """Support entries (sorted global flat row-major int64 indices) and each entry's init draw in [0, 1)."""
    idx: torch.Tensor
    uniform: torch.Tensor


def tile_counts(out_features: int, in_features: int, nnz: int, seed: int, name: str) -> list:
    """Number of support entries in each TILE x TILE tile (row-major tile order): a multivariate
    hypergeometric draw, done as sequential conditional hypergeometric draws."""
    s = derive_seed(seed, name, "tile-counts")
    rs = np.random.RandomState(np.array([s & 0xFFFFFFFF, s >> 32], dtype=np.uint32))
    remaining_cells, remaining_nnz, counts = out_features * in_features, nnz, []
    for r0 in range(0, out_features, TILE):
        for c0 in range(0, in_features, TILE):
            cells = (min(r0 + TILE, out_features) - r0) * (min(c0 + TILE, in_features) - c0)
            if remaining_nnz == 0:
                c = 0
            elif cells == remaining_cells:
                c = remaining_nnz
            else:
                c = int(rs.hypergeometric(cells, remaining_cells - cells, remaining_nnz))
            counts.append(c)
            remaining_cells -= cells
            remaining_nnz -= c
    return counts


def sample_support(out_features: int, in_features: int, density: float, seed: int, name: str,
                   rows: Optional[Sequence[int] | torch.Tensor] = None,
                   cols: Optional[Tuple[int, int]] = None) -> SupportSample:
    """The layer's support entries, optionally only those in the given global ``rows`` and/or
    columns [cols[0], cols[1]); only the tiles that intersect them are generated."""
    counts = tile_counts(out_features, in_features, nnz_for(out_features, in_features, density), seed, name)
    n_tc = -(-in_features // TILE)
    row_mask = None
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.int64)
        row_mask = torch.zeros(out_features, dtype=torch.bool)
        row_mask[rows] = True
        tile_rows = torch.unique(rows // TILE).tolist()
    else:
        tile_rows = range(-(-out_features // TILE))
    c_lo, c_hi = (0, in_features) if cols is None else (int(cols[0]), int(cols[1]))
    idx_parts, u_parts = [], []
    for tr in tile_rows:
        for tc in range(c_lo // TILE, -(-c_hi // TILE)):
            t = tr * n_tc + tc
            if counts[t] == 0:
                continue
            r0, c0 = tr * TILE, tc * TILE
            width = min(c0 + TILE, in_features) - c0
            cells = (min(r0 + TILE, out_features) - r0) * width
            g = torch.Generator().manual_seed(derive_seed(seed, name, f"tile/{t}"))
            local = sample_uniform_subset(cells, counts[t], g)
            u = torch.rand(counts[t], generator=g)
            r, c = r0 + local // width, c0 + local % width
            keep = (c >= c_lo) & (c < c_hi)
            if row_mask is not None:
                keep &= row_mask[r]
            idx_parts.append((r * in_features + c)[keep])
            u_parts.append(u[keep])
    if not idx_parts:
        return SupportSample(torch.empty(0, dtype=torch.int64), torch.empty(0))
    idx, u = torch.cat(idx_parts), torch.cat(u_parts)
    order = torch.argsort(idx)
    return SupportSample(idx[order], u[order])


def global_support(out_features: int, in_features: int, density: float, seed: int, name: str) -> torch.Tensor:
    """The layer's global support: sorted flat row-major indices, int32 when they fit."""
    idx = sample_support(out_features, in_features, density, seed, name).idx
    return idx.to(index_dtype(out_features * in_features))


def support_hash(idx: torch.Tensor, shape: Tuple[int, int]) -> str:
    """Short content hash of a support (checked when a checkpoint is loaded)."""
    h = hashlib.sha256(f"{shape[0]}x{shape[1]}:".encode())
    h.update(idx.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def select_rows(idx: torch.Tensor, in_features: int, rows: Sequence[int] | torch.Tensor):
    """Part of the support inside the given global rows, re-indexed to the local matrix
    whose row k is global row rows[k].

    Returns (local_idx sorted, positions): positions[j] is where local entry j sits in the
    global support (so local values = global values[positions]).
    """
    rows = torch.as_tensor(rows, dtype=torch.int64)
    out_dtype = index_dtype(max(rows.numel(), 1) * in_features)
    idx64 = idx.to(torch.int64)
    if idx64.numel() == 0 or rows.numel() == 0:
        return torch.empty(0, dtype=out_dtype), torch.empty(0, dtype=torch.int64)
    g_row, g_col = idx64 // in_features, idx64 % in_features
    local_of = torch.full((max(int(g_row.max()), int(rows.max())) + 1,), -1, dtype=torch.int64)
    local_of[rows] = torch.arange(rows.numel())
    local_row = local_of[g_row]
    keep = local_row >= 0
    local = local_row[keep] * in_features + g_col[keep]
    order = torch.argsort(local)
    return local[order].to(out_dtype), torch.nonzero(keep).flatten()[order]


def select_cols(idx: torch.Tensor, out_features: int, in_features: int, col_start: int, col_end: int):
    """Part of the support inside columns [col_start, col_end), re-indexed to the local
    out x (col_end - col_start) matrix. Returns (local_idx sorted, positions)."""
    idx64 = idx.to(torch.int64)
    g_row, g_col = idx64 // in_features, idx64 % in_features
    keep = (g_col >= col_start) & (g_col < col_end)
    width = col_end - col_start
    local = g_row[keep] * width + (g_col[keep] - col_start)  # row-major order is kept: still sorted
    return local.to(index_dtype(out_features * width)), torch.nonzero(keep).flatten()
