"""Triton kernels of the SL linear and their launchers.

* ``densify_kernel``: W = scale·B A + S. One program per block_m x block_n tile of W: the
  low-rank tile with ``tl.dot`` (fp32 accumulation) is stored, then -- after a CTA barrier, so
  the program's own stores are visible -- the tile's sparse entries (contiguous thanks to the
  tile layout) are read-modified-written. Support positions are distinct, so no atomics.
* ``sddmm_kernel``: g_k = Σ_t dY[t, row_k]·X[t, col_k] for every support entry k. One program
  per tile of grad W that holds entries: the tile is accumulated with ``tl.dot`` over T in
  registers and its entries are picked out with ``tl.gather``; grad W is never written.
  Results go straight to canonical order through ``perm``.

Every kernel takes ``UPCAST: tl.constexpr``, True only when the kernels are interpreted
(``TRITON_INTERPRET=1``): the interpreter computes bf16 on raw bit patterns (triton#11584), so
operands are cast to fp32 there, and it truncates fp32 -> bf16, so results are rounded to nearest
even by hand there (what the GPU does) before the store. ``INPUT_PRECISION`` is "ieee" for fp32 unless
``torch.backends.cuda.matmul.allow_tf32`` is on (then "tf32", like cuBLAS).

Importing this module imports triton; whether the kernels are interpreted is fixed at import
(``INTERPRETED``). ``TRITON_DEFAULT_FP_FUSION`` is set to 1 (FMA contraction on, the current
default) unless the caller set it.
"""

from __future__ import annotations

import os
from typing import Optional

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .settings import DensifyBlocks, SddmmBlocks  # noqa: E402
from .tile_layout import TileLayout, build_tile_layout  # noqa: E402


@triton.jit
def _cast_out(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> output dtype. The interpreter rounds fp32 -> bf16 toward zero (GPUs round to
    nearest even), so under it round to nearest even by hand first; the cast is then exact."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def densify_kernel(B_ptr, A_ptr, W_ptr, val_ptr, perm_ptr, loc_ptr, tile_ptr_ptr,
                   OUT, IN, R, scale,
                   stride_bo, stride_br, stride_ar, stride_ai, stride_wo, stride_wi,
                   BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr,
                   UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tile = pid_m * tl.cdiv(IN, BN) + pid_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        b = tl.load(B_ptr + rm64[:, None] * stride_bo + rr[None, :] * stride_br,
                    mask=(rm[:, None] < OUT) & (rr[None, :] < R), other=0.0)
        a = tl.load(A_ptr + rr[:, None] * stride_ar + rn64[None, :] * stride_ai,
                    mask=(rr[:, None] < R) & (rn[None, :] < IN), other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(b, a, acc, input_precision=INPUT_PRECISION)
    acc = acc * scale
    tl.store(W_ptr + rm64[:, None] * stride_wo + rn64[None, :] * stride_wi,
             _cast_out(acc, W_ptr.dtype.element_ty, UPCAST), mask=(rm[:, None] < OUT) & (rn[None, :] < IN))
    tl.debug_barrier()  # the RMW below may touch entries another thread of this CTA stored
    start = tl.load(tile_ptr_ptr + tile)
    end = tl.load(tile_ptr_ptr + tile + 1)
    for s0 in range(start, end, BS):
        so = s0 + tl.arange(0, BS)
        sm = so < end
        loc = tl.load(loc_ptr + so, mask=sm, other=0).to(tl.int32)
        k = tl.load(perm_ptr + so, mask=sm, other=0)
        v = tl.load(val_ptr + k, mask=sm, other=0.0).to(tl.float32)
        row = (pid_m * BM + loc // BN).to(tl.int64)
        col = (pid_n * BN + loc % BN).to(tl.int64)
        ptrs = W_ptr + row * stride_wo + col * stride_wi
        w = tl.load(ptrs, mask=sm, other=0.0).to(tl.float32)
        tl.store(ptrs, _cast_out(w + v, W_ptr.dtype.element_ty, UPCAST), mask=sm)


@triton.jit
def sddmm_kernel(dy_ptr, x_ptr, out_ptr, perm_ptr, loc_ptr, tile_ptr_ptr,
                 OUT, IN, T,
                 stride_dt, stride_do, stride_xt, stride_xi,
                 BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tile = pid_m * tl.cdiv(IN, BN) + pid_n
    start = tl.load(tile_ptr_ptr + tile)
    end = tl.load(tile_ptr_ptr + tile + 1)
    if end > start:  # tiles without support entries do no work
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t0 in range(0, T, BT):
            tt = t0 + tl.arange(0, BT)
            tt64 = tt.to(tl.int64)
            g = tl.load(dy_ptr + tt64[:, None] * stride_dt + rm64[None, :] * stride_do,
                        mask=(tt[:, None] < T) & (rm[None, :] < OUT), other=0.0)  # [BT, BM]
            b = tl.load(x_ptr + tt64[:, None] * stride_xt + rn64[None, :] * stride_xi,
                        mask=(tt[:, None] < T) & (rn[None, :] < IN), other=0.0)  # [BT, BN]
            if UPCAST:
                g = g.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(g), b, acc, input_precision=INPUT_PRECISION)
        flat = tl.reshape(acc, (BM * BN,))
        for s0 in range(start, end, BS):
            so = s0 + tl.arange(0, BS)
            sm = so < end
            loc = tl.load(loc_ptr + so, mask=sm, other=0).to(tl.int32)
            k = tl.load(perm_ptr + so, mask=sm, other=0)
            val = tl.gather(flat, loc, 0)
            tl.store(out_ptr + k, _cast_out(val, out_ptr.dtype.element_ty, UPCAST), mask=sm)


INTERPRETED = not isinstance(densify_kernel, triton.runtime.JITFunction)
UPCAST = INTERPRETED
KERNELS = {"densify": densify_kernel, "sddmm": sddmm_kernel}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 operands: "tf32" only where torch's own CUDA matmuls may use TF32, else "ieee"."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take {SUPPORTED_DTYPES}")


def _tiles_for(idx, out_f, in_f, blocks, tiles: Optional[TileLayout]) -> TileLayout:
    """The caller's tile layout (checked against the launch's blocks), else one built now for this
    launch only (dropped with it)."""
    if tiles is None:
        return build_tile_layout(idx, out_f, in_f, blocks.block_m, blocks.block_n)
    if (tiles.block_m, tiles.block_n) != (blocks.block_m, blocks.block_n) or tiles.nnz != idx.numel():
        raise ValueError(f"tile layout for blocks {tiles.block_m}x{tiles.block_n} with {tiles.nnz} entries does not "
                         f"match the launch (blocks {blocks.block_m}x{blocks.block_n}, {idx.numel()} entries)")
    return tiles


def densify(B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, scale: float,
            blocks: DensifyBlocks, tiles: Optional[TileLayout] = None) -> torch.Tensor:
    """W = scale·B A + S (out x in, dtype of B), S = values at the flat positions idx. ``tiles``:
    the support's tile layout for these blocks, if the caller owns one (else built per launch)."""
    _check_dtype(B, "B")
    _check_dtype(A, "A")
    out_f, r = B.shape
    in_f = A.shape[1]
    W = torch.empty((out_f, in_f), dtype=B.dtype, device=B.device)
    if W.numel() == 0:
        return W
    if A.dtype != B.dtype:
        A = A.to(B.dtype)
    tiles = _tiles_for(idx, out_f, in_f, blocks, tiles)
    values = values.contiguous()
    grid = (tiles.n_tiles_m, tiles.n_tiles_n)
    densify_kernel[grid](
        B, A, W, values, tiles.perm, tiles.loc, tiles.tile_ptr,
        out_f, in_f, r, float(scale),
        B.stride(0), B.stride(1), A.stride(0), A.stride(1), W.stride(0), W.stride(1),
        BM=blocks.block_m, BN=blocks.block_n, BR=blocks.block_r, BS=blocks.block_s,
        UPCAST=UPCAST, INPUT_PRECISION=input_precision(B.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return W


def sddmm(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, blocks: SddmmBlocks,
          tiles: Optional[TileLayout] = None) -> torch.Tensor:
    """g[k] = Σ_t dy[t, row_k]·x[t, col_k] in canonical support order, dtype of x.
    dy is dY (T x out), x is X (T x in); any strides. ``tiles`` as for ``densify``."""
    _check_dtype(dy, "dy")
    _check_dtype(x, "x")
    T, out_f = dy.shape
    in_f = x.shape[1]
    out = torch.empty(idx.numel(), dtype=x.dtype, device=x.device)
    if idx.numel() == 0:
        return out
    if dy.dtype != x.dtype:
        common = torch.promote_types(dy.dtype, x.dtype)
        dy, x = dy.to(common), x.to(common)
    tiles = _tiles_for(idx, out_f, in_f, blocks, tiles)
    grid = (tiles.n_tiles_m, tiles.n_tiles_n)
    sddmm_kernel[grid](
        dy, x, out, tiles.perm, tiles.loc, tiles.tile_ptr,
        out_f, in_f, T,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        BM=blocks.block_m, BN=blocks.block_n, BT=blocks.block_t, BS=blocks.block_s,
        UPCAST=UPCAST, INPUT_PRECISION=input_precision(x.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return out
