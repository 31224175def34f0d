"""CPU kernels (numba) for the factored path's sparse products: SpMM with S / Sᵀ and the SDDMM.

torch's CSR products on CPU run at a few GFLOP/s at the shapes SL layers have (3 % density, a few
hundred tokens per micro-batch), slower than the low-rank GEMMs they accompany. These kernels do the
same arithmetic as the references in ``megatron_sl.core.reference`` over the canonical flat index,
with the tokens as the vector dimension:

* a block of ``TOKEN_TILE`` tokens of the dense operand is transposed into a feature-major scratch
  tile ([features, TOKEN_TILE], stays in L2), so every support entry is one contiguous,
  vectorised axpy (SpMM) or dot product (SDDMM) over the tile's tokens;
* the output tile is transposed back and added (SpMM) or the per-entry dot products are summed over
  the tiles (SDDMM), so nothing with T x features elements is allocated beyond the caller's output;
* the flat index is split into rows and columns once per call (validated against the matrix shape:
  numba does not bounds-check, so an index outside out x in raises here instead of writing
  elsewhere); no CSR structure, sort or transposition permutation is built.

They are single-threaded (``nogil``): each rank of a CPU run uses one thread per the project's
OMP_NUM_THREADS=1 convention; ``settings.resolve_backend`` keeps the torch reference when torch runs
with more threads (MKL's CSR kernels are threaded, these are not). float32 and float64 run natively;
half types are upcast to float32 like the reference. Compiled on first use and cached on disk by
numba (``cache=True``).
"""

from __future__ import annotations

import numpy as np
import numba
import torch

# Tokens per scratch tile (measured fastest of 32/64/128 at the 60M layer shapes, whole and
# TP=2-local: the tiles of a [1376, 64] float32 operand and its output stay in a 512 KiB L2), and
# the block the tile transposes move at a time, tokens x features (8 x 16: 2-2.5x faster than a
# token-by-token pass over 16 features, 0.3-0.4 ns per element at [256, 512-688] float32).
TOKEN_TILE = 64
TOKEN_BLOCK = 8
FEATURE_BLOCK = 16
_NATIVE = (torch.float32, torch.float64)


@numba.njit(cache=True, nogil=True)
def _split_index(idx, n_rows, n_cols):
    """rows, cols (int32) of the flat row-major index; raises for an entry outside the matrix."""
    k_total = idx.shape[0]
    rows = np.empty(k_total, np.int32)
    cols = np.empty(k_total, np.int32)
    size = n_rows * n_cols
    for k in range(k_total):
        f = np.int64(idx[k])
        if f < 0 or f >= size:
            raise IndexError("megatron_sl: a support index lies outside the weight matrix")
        r = f // n_cols
        rows[k] = r
        cols[k] = f - r * n_cols
    return rows, cols


@numba.njit(cache=True, nogil=True, inline="always")
def _load_tile(dst, src, t0, tl):
    """dst[j, t] = src[t0 + t, j] for t < tl, in blocks of TOKEN_BLOCK tokens x FEATURE_BLOCK
    features (constant trip counts: LLVM turns a block into vector loads, shuffles and stores)."""
    n_feat = src.shape[1]
    j_full = n_feat - n_feat % FEATURE_BLOCK
    t_full = tl - tl % TOKEN_BLOCK
    for j0 in range(0, j_full, FEATURE_BLOCK):
        for tb in range(0, t_full, TOKEN_BLOCK):
            for b in range(FEATURE_BLOCK):
                for a in range(TOKEN_BLOCK):
                    dst[j0 + b, tb + a] = src[t0 + tb + a, j0 + b]
        for t in range(t_full, tl):
            for j in range(j0, j0 + FEATURE_BLOCK):
                dst[j, t] = src[t0 + t, j]
    for t in range(tl):
        for j in range(j_full, n_feat):
            dst[j, t] = src[t0 + t, j]


@numba.njit(cache=True, nogil=True, inline="always")
def _add_tile(out, tile, t0, tl):
    """out[t0 + t, j] += tile[j, t] for t < tl, in the blocks of ``_load_tile``."""
    n_feat = out.shape[1]
    j_full = n_feat - n_feat % FEATURE_BLOCK
    t_full = tl - tl % TOKEN_BLOCK
    for j0 in range(0, j_full, FEATURE_BLOCK):
        for tb in range(0, t_full, TOKEN_BLOCK):
            for a in range(TOKEN_BLOCK):
                for b in range(FEATURE_BLOCK):
                    out[t0 + tb + a, j0 + b] += tile[j0 + b, tb + a]
        for t in range(t_full, tl):
            for j in range(j0, j0 + FEATURE_BLOCK):
                out[t0 + t, j] += tile[j, t]
    for t in range(tl):
        for j in range(j_full, n_feat):
            out[t0 + t, j] += tile[j, t]


@numba.njit(fastmath=True, cache=True, nogil=True)
def _spmm_tiles(out, dense, src, dst, vals):
    """out[t, dst[k]] += vals[k] · dense[t, src[k]] for every token t and support entry k."""
    n_tok = dense.shape[0]
    d_tile = np.zeros((dense.shape[1], TOKEN_TILE), dense.dtype)
    o_tile = np.empty((out.shape[1], TOKEN_TILE), dense.dtype)
    for t0 in range(0, n_tok, TOKEN_TILE):
        tl = min(TOKEN_TILE, n_tok - t0)
        _load_tile(d_tile, dense, t0, tl)
        if tl < TOKEN_TILE:
            d_tile[:, tl:] = 0
        o_tile[:, :] = 0
        for k in range(src.shape[0]):
            s = src[k]
            d = dst[k]
            v = vals[k]
            for t in range(TOKEN_TILE):
                o_tile[d, t] += v * d_tile[s, t]
        _add_tile(out, o_tile, t0, tl)


@numba.njit(fastmath=True, cache=True, nogil=True)
def _sddmm_tiles(dy, x, rows, cols, g):
    """g[k] = Σ_t dy[t, rows[k]] · x[t, cols[k]]."""
    n_tok = x.shape[0]
    dy_tile = np.zeros((dy.shape[1], TOKEN_TILE), dy.dtype)
    x_tile = np.zeros((x.shape[1], TOKEN_TILE), x.dtype)
    g[:] = 0
    for t0 in range(0, n_tok, TOKEN_TILE):
        tl = min(TOKEN_TILE, n_tok - t0)
        _load_tile(dy_tile, dy, t0, tl)
        _load_tile(x_tile, x, t0, tl)
        if tl < TOKEN_TILE:
            dy_tile[:, tl:] = 0
            x_tile[:, tl:] = 0
        for k in range(rows.shape[0]):
            r = rows[k]
            c = cols[k]
            acc = dy_tile[r, 0] * x_tile[c, 0]
            for t in range(1, TOKEN_TILE):
                acc += dy_tile[r, t] * x_tile[c, t]
            g[k] += acc


def _as_array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _work_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in: float32/float64 natively, half types upcast to float32."""
    dt = torch.promote_types(a.dtype, b.dtype)
    return dt if dt in _NATIVE else torch.float32


def spmm_accumulate(out: torch.Tensor, dense: torch.Tensor, idx: torch.Tensor, values: torch.Tensor,
                    transpose: bool) -> None:
    """out += dense @ Sᵀ (dense [T, in], out [T, out]) or, with ``transpose``, out += dense @ S
    (dense [T, out], out [T, in]); S (out x in) holds ``values`` at the flat positions ``idx``."""
    m, n = (dense.shape[1], out.shape[1]) if transpose else (out.shape[1], dense.shape[1])
    rows, cols = _split_index(idx.detach().contiguous().numpy(), m, n)
    src, dst = (rows, cols) if transpose else (cols, rows)
    dt = _work_dtype(dense, values)
    direct = out.dtype == dt and out.is_contiguous()
    acc = out if direct else out.to(dt).contiguous()
    _spmm_tiles(acc.detach().numpy(), _as_array(dense, dt), src, dst, _as_array(values, dt))
    if not direct:
        out.copy_(acc)


def sddmm(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """g_k = Σ_t dy[t,row_k]·x[t,col_k] for dy = dY (T x out), x = X (T x in), in ``idx`` order."""
    rows, cols = _split_index(idx.detach().contiguous().numpy(), dy.shape[1], x.shape[1])
    dt = _work_dtype(dy, x)
    g = torch.empty(idx.shape[0], dtype=dt)
    _sddmm_tiles(_as_array(dy, dt), _as_array(x, dt), rows, cols, g.numpy())
    return g.to(x.dtype)
