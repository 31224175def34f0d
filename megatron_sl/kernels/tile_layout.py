"""Tile-major view of a layer's fixed sparse support, for the tiled Triton kernels.

The canonical support is the sorted flat row-major index ``idx`` (int32 on the layer; the values
stay in that order, so checkpoints never depend on tile sizes). The Triton kernels work per
block_m x block_n tile of W and need the tile's entries contiguous:

* ``perm``  (int32, nnz): tile-order position j holds canonical entry perm[j];
* ``loc``   (int16 when block_m·block_n <= 32767, else int32, nnz): offset of that entry inside
  its tile, row-major (r % block_m)·block_n + (c % block_n);
* ``tile_ptr`` (int32, n_tiles + 1): entries of tile t are positions tile_ptr[t]:tile_ptr[t+1];
  tiles are numbered row-major, t = (r // block_m)·n_tiles_n + c // block_n.

The layout is derived inside each kernel launch from the canonical index and dropped with it: the only
index structure that stays resident per layer is the canonical int32 index (4 bytes per nonzero).
Building it costs one sort of the support per launch.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TileLayout:
    block_m: int
    block_n: int
    n_tiles_m: int
    n_tiles_n: int
    perm: torch.Tensor
    loc: torch.Tensor
    tile_ptr: torch.Tensor

    @property
    def nnz(self) -> int:
        return self.perm.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.perm, self.loc, self.tile_ptr))


def build_tile_layout(idx: torch.Tensor, out_features: int, in_features: int,
                      block_m: int, block_n: int) -> TileLayout:
    """Group the support's entries by block_m x block_n tile (row-major inside each tile)."""
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be a 1-D int32/int64 tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    if out_features * in_features >= 2**31:
        raise ValueError(f"a {out_features}x{in_features} weight has more than 2^31 entries; "
                         f"the int32 tile layout cannot address it")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= out_features * in_features):
        raise ValueError(f"idx has entries outside [0, {out_features}*{in_features}) "
                         f"(min {int(idx.min())}, max {int(idx.max())})")
    n_tm = -(-out_features // block_m)
    n_tn = -(-in_features // block_n)
    i64 = idx.to(torch.int64)
    r, c = i64 // in_features, i64 % in_features
    tile = (r // block_m) * n_tn + c // block_n
    inner = (r % block_m) * block_n + c % block_n
    perm = torch.argsort(tile * (block_m * block_n) + inner)  # keys are unique (distinct positions)
    counts = torch.bincount(tile, minlength=n_tm * n_tn)
    tile_ptr = torch.zeros(n_tm * n_tn + 1, dtype=torch.int32, device=idx.device)
    tile_ptr[1:] = counts.cumsum(0)
    loc_dtype = torch.int16 if block_m * block_n <= 32767 else torch.int32
    return TileLayout(block_m, block_n, n_tm, n_tn, perm.to(torch.int32), inner[perm].to(loc_dtype), tile_ptr)
