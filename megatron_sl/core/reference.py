"""The torch reference implementations of the SL primitives, and the support layout they read.

Pure torch, any device: these are the CPU kernels of the ``megatron_sl::*`` custom ops
(``core.ops``) and what every accelerated implementation is checked against.

* ``densify_reference``: W = s·B A + S as a new dense tensor;
* ``values_grad_reference``: the dense weight gradient at the support (the dense path's dvalues);
* ``sddmm_reference``: g_k = Σ_t dY[t,row_k]·X[t,col_k] with ``torch.sparse.sampled_addmm``;
* ``spmm_accumulate_reference``: out += dense @ Sᵀ (or @ S) with CSR ``torch.sparse.mm``.

``SupportLayout`` is a layer's fixed support as it stays resident (the canonical index only); the
CSR structures are derived inside each call. torch warns that sparse CSR support is in beta each
time a CSR tensor is made; that warning is silenced only around the CSR constructors here.
"""

from __future__ import annotations

import warnings

import torch

# Sparse products run over blocks of tokens: a [in, TOKEN_CHUNK] slab of xᵀ stays in cache
# (measured 2x faster than one [in, T] product at T=4096) and no [out, T] transient is formed.
TOKEN_CHUNK = 512

_CSR_BETA_WARNING = "Sparse CSR tensor support is in beta state"


def _csr(crow, col, values, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_BETA_WARNING)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class SupportLayout:
    """A layer's fixed support as it stays resident: the canonical index only.

    ``idx`` is the sorted flat row-major index, int32 when the matrix has fewer than 2^31 entries:
    4 bytes per nonzero, on the device of the layer's parameters (the owning module keeps it as a
    buffer). The CSR forms of S and Sᵀ that the factored path needs (row pointers, column indices,
    the transposition permutation) are derived inside each call and dropped with it, so nothing
    else per nonzero outlives a forward or backward (``index_bytes``).
    """

    def __init__(self, idx: torch.Tensor, out_features: int, in_features: int):
        self.idx = idx
        self.shape = (out_features, in_features)

    @property
    def nnz(self) -> int:
        return self.idx.numel()

    def flat(self, device) -> torch.Tensor:
        """The canonical index on ``device`` (itself when it already lives there; else a transient copy)."""
        device = torch.device(device)
        same = self.idx.device.type == device.type and (device.index is None or self.idx.device.index == device.index)
        return self.idx if same else self.idx.to(device)

    def _rows_cols(self, device):
        idx = self.flat(device).to(torch.int64)
        n = self.shape[1]
        return idx // n, idx % n

    def csr_pattern(self, device):
        """(crow, col) of S in CSR form, derived now (transient)."""
        rows, cols = self._rows_cols(device)
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=self.shape[0]).cumsum(0)
        return crow, cols

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        crow, col = self.csr_pattern(values.device)
        return _csr(crow, col, values, self.shape)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        m, n = self.shape
        rows, cols = self._rows_cols(values.device)
        # the canonical order is row-major, so a stable sort by column alone gives Sᵀ's CSR order
        # (int32 keys: ~4x faster than sorting a combined int64 key on CPU)
        keys = cols.to(torch.int32) if n < 2**31 else cols
        perm = torch.argsort(keys, stable=True)
        tcrow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        tcrow[1:] = torch.bincount(cols, minlength=n).cumsum(0)
        return _csr(tcrow, rows[perm], values[perm], (n, m))

    @staticmethod
    def stacked(parts, rows: int, device) -> "SupportLayout":
        """The supports of parts that read the same input, stacked row-wise into one [rows, in]
        support: ``parts`` is [(layout [out_i, in], row offset)], in increasing offsets without
        overlap. One sparse product then covers them all: one pass over the shared operand instead
        of one per part. Each part's entries shift by offset x in, so the stacked index is canonical
        (sorted) again. A transient."""
        n = parts[0][0].shape[1]
        end = 0
        for lay, off in parts:
            if lay.shape[1] != n or off < end or off + lay.shape[0] > rows:
                raise ValueError(f"stacked supports: part {lay.shape} at row {off} does not fit [{rows}, {n}] "
                                 f"after row {end}")
            end = off + lay.shape[0]
        dtype = torch.int32 if rows * n < 2**31 else torch.int64
        return SupportLayout(torch.cat([lay.flat(device).to(dtype) + off * n for lay, off in parts]), rows, n)

    def index_bytes(self) -> dict:
        """Resident index bytes: the canonical index; nothing derived is kept between calls."""
        return {"canonical": self.idx.numel() * self.idx.element_size(), "derived": 0}


def densify_reference(B, A, values, idx, scale: float) -> torch.Tensor:
    """W = scale·B A + S as a new dense tensor (the scaled copy of the smaller factor is a
    transient here, never saved)."""
    if B.numel() <= A.numel():
        W = torch.mm(B * scale, A)
    else:
        W = torch.mm(B, A * scale)
    if idx.numel():
        W.view(-1).index_add_(0, idx, values.to(W.dtype))
    return W


def values_grad_reference(grad_w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gradient of the sparse values: the dense weight gradient at the support."""
    return grad_w.reshape(-1).index_select(0, idx)


def _sparse_dtype_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or t.dtype in (torch.float32, torch.float64)


def sddmm_reference(dy: torch.Tensor, x: torch.Tensor, layout: SupportLayout) -> torch.Tensor:
    """g_k = Σ_t dY[t,row_k]·X[t,col_k] for every support entry k, in support order.
    dy is dY (T x out), x is X (T x in); CPU sparse kernels lack bf16, which upcasts."""
    crow, col = layout.csr_pattern(x.device)
    dt = x.dtype if _sparse_dtype_ok(x) else torch.float32
    pattern = _csr(crow, col, torch.zeros(layout.nnz, dtype=dt, device=x.device), layout.shape)
    out = torch.zeros(layout.nnz, dtype=dt, device=x.device)
    for t0 in range(0, x.shape[0], TOKEN_CHUNK):
        dy_t = dy[t0:t0 + TOKEN_CHUNK].t().contiguous().to(dt)
        out += torch.sparse.sampled_addmm(pattern, dy_t, x[t0:t0 + TOKEN_CHUNK].to(dt), beta=0.0).values()
    return out.to(x.dtype)


def spmm_accumulate_reference(out: torch.Tensor, layout: SupportLayout, values: torch.Tensor, dense: torch.Tensor,
                              transpose: bool) -> torch.Tensor:
    """out += dense @ Sᵀ (transpose=False: dense is x [T, in], out is [T, out]) or
    out += dense @ S (transpose=True: dense is dY [T, out], out is [T, in]), token block by block.
    CPU sparse kernels lack bf16/fp16, so those upcast."""
    dt = dense.dtype if _sparse_dtype_ok(dense) else torch.float32
    vals = values.to(dt)
    S = layout.csr_t(vals) if transpose else layout.csr(vals)
    for t0 in range(0, dense.shape[0], TOKEN_CHUNK):
        block = dense[t0:t0 + TOKEN_CHUNK].t().contiguous().to(dt)
        # a contiguous transpose before the add is faster than adding the strided view (measured)
        out[t0:t0 + TOKEN_CHUNK] += torch.sparse.mm(S, block).t().contiguous()
    return out
