"""Tile-major view of a layer's fixed sparse support, for the tiled Triton kernels.

The canonical support is the sorted flat row-major index ``idx`` (int32 on the layer; the values
stay in that order, so checkpoints never depend on tile sizes). The Triton kernels work per
block_m x block_n tile of W and need the tile's entries contiguous:

* ``perm``  (int32, nnz): tile-order position j holds canonical entry perm[j];
* ``loc``   (int16 when block_m·block_n <= 32767, else int32, nnz): offset of that entry inside
  its tile, row-major (r % block_m)·block_n + (c % block_n);
* ``tile_ptr`` (int32, n_tiles + 1): entries of tile t are positions tile_ptr[t]:tile_ptr[t+1];
  tiles are numbered row-major, t = (r // block_m)·n_tiles_n + c // block_n.

The support never changes, so ``tile_layout_for`` builds this once per (index tensor, shape,
block sizes) and caches it; the core ``SupportLayout`` hands the same device index tensor to every
call, so that is once per layer and device. The cache entry dies with the index tensor. The same
per-index entry remembers which ``SupportLayout`` owns the tensor, so the torch-reference SDDMM
(which needs the layout's CSR) reuses the layer's cached structures.
"""

from __future__ import annotations

import dataclasses
import weakref

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


_CACHE: dict = {}
_STATS = {"builds": 0, "hits": 0}


def _evict(key_id: int) -> None:
    _CACHE.pop(key_id, None)


def _entry(idx: torch.Tensor) -> dict:
    """Per-index-tensor cache entry; it is dropped when the tensor is garbage collected."""
    entry = _CACHE.get(id(idx))
    if entry is None or entry["ref"]() is not idx:
        entry = {"ref": weakref.ref(idx), "layouts": {}, "core": None}
        _CACHE[id(idx)] = entry
        weakref.finalize(idx, _evict, id(idx))
    return entry


def tile_layout_for(idx: torch.Tensor, out_features: int, in_features: int,
                    block_m: int, block_n: int) -> TileLayout:
    """The cached tile layout of this exact index tensor (built on first use)."""
    entry = _entry(idx)
    key = (idx.data_ptr(), idx._version, idx.numel(), out_features, in_features, block_m, block_n)
    layout = entry["layouts"].get(key)
    if layout is None:
        layout = build_tile_layout(idx, out_features, in_features, block_m, block_n)
        entry["layouts"][key] = layout
        _STATS["builds"] += 1
    else:
        _STATS["hits"] += 1
    return layout


def remember_support_layout(idx: torch.Tensor, layout) -> None:
    """Record which core ``SupportLayout`` owns this device index tensor, so an op that only
    receives the tensor reuses the layout's cached CSR structures (no duplicate copies)."""
    entry = _entry(idx)
    if entry["core"] is None or entry["core"]() is not layout:
        entry["core"] = weakref.ref(layout)


def support_layout_for(idx: torch.Tensor, out_features: int, in_features: int):
    """The core ``SupportLayout`` behind ``idx``: the remembered one, else a fresh uncached one
    (e.g. for an index tensor made by a test; caching it here would keep idx alive forever)."""
    from megatron_sl.core.functional import SupportLayout

    entry = _CACHE.get(id(idx))
    if entry is not None and entry["ref"]() is idx and entry["core"] is not None:
        layout = entry["core"]()
        if layout is not None and layout.shape == (out_features, in_features) and layout.nnz == idx.numel():
            return layout
    return SupportLayout(idx, out_features, in_features)


def cached_layouts(idx: torch.Tensor) -> list:
    """Tile layouts currently cached for this index tensor (for index-byte reports)."""
    entry = _CACHE.get(id(idx))
    if entry is None or entry["ref"]() is not idx:
        return []
    return list(entry["layouts"].values())


def cache_stats() -> dict:
    return dict(_STATS, entries=len(_CACHE))
