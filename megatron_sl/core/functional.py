"""The SL linear as custom autograd Functions (pure torch), exact in both directions.

y = x Wᵀ + b with W = s·B A + S. Forward saves only x, B, A, values (and the layer's index
structures, which are fixed); nothing with out x in elements and no scaled copy of A is kept
between forward and backward -- backward recomputes what it needs. Two paths, picked by
``cost_model.choose_path`` unless forced (see that module for the FLOP accounting):

* dense:    W = densify(B, A, values); y = F.linear(x, W). Backward recomputes W.
* factored: y = s·(x Aᵀ) Bᵀ + x Sᵀ with CSR sparse products; backward recomputes x Aᵀ.

Tensor parallelism: the Functions issue no collective. A factor replicated across TP ranks (A of
column-parallel, B of row-parallel layers) gets this rank's partial gradient; the tensor-parallel
layers tag it and the sum over TP happens once per optimizer step, coalesced
(``megatron_sl.parallel.grad_sync``), like megatron-core's ``finalize_model_grads``.

The ``densify``, ``values_grad`` and ``sddmm`` primitives are looked up in ``OPS`` so that
``megatron_sl.kernels`` can install its Triton-backed custom ops without core importing it.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import cost_model

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


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
        return torch.sparse_csr_tensor(crow, col, values, size=self.shape, check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        m, n = self.shape
        rows, cols = self._rows_cols(values.device)
        # the canonical order is row-major, so a stable sort by column alone gives Sᵀ's CSR order
        # (int32 keys: ~4x faster than sorting a combined int64 key on CPU)
        keys = cols.to(torch.int32) if n < 2**31 else cols
        perm = torch.argsort(keys, stable=True)
        tcrow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        tcrow[1:] = torch.bincount(cols, minlength=n).cumsum(0)
        return torch.sparse_csr_tensor(tcrow, rows[perm], values[perm], size=(n, m), check_invariants=False)

    def index_bytes(self) -> dict:
        """Resident index bytes: the canonical index; nothing derived is kept between calls."""
        return {"canonical": self.idx.numel() * self.idx.element_size(), "derived": 0}


# ----------------------------------------------------------------------------- primitives

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


def sddmm_reference(dy: torch.Tensor, x: torch.Tensor, layout: SupportLayout) -> torch.Tensor:
    """g_k = Σ_t dY[t,row_k]·X[t,col_k] for every support entry k, in support order.
    dy is dY (T x out), x is X (T x in); CPU sparse kernels lack bf16, which upcasts."""
    crow, col = layout.csr_pattern(x.device)
    dt = x.dtype if _sparse_dtype_ok(x) else torch.float32
    pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(layout.nnz, dtype=dt, device=x.device),
                                      size=layout.shape, check_invariants=False)
    out = torch.zeros(layout.nnz, dtype=dt, device=x.device)
    for t0 in range(0, x.shape[0], TOKEN_CHUNK):
        dy_t = dy[t0:t0 + TOKEN_CHUNK].t().contiguous().to(dt)
        out += torch.sparse.sampled_addmm(pattern, dy_t, x[t0:t0 + TOKEN_CHUNK].to(dt), beta=0.0).values()
    return out.to(x.dtype)


OPS = {"densify": densify_reference, "values_grad": values_grad_reference, "sddmm": sddmm_reference}


# Sparse products run over blocks of tokens: a [in, TOKEN_CHUNK] slab of xᵀ stays in cache
# (measured 2x faster than one [in, T] product at T=4096) and no [out, T] transient is formed.
TOKEN_CHUNK = 512


def _sparse_dtype_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or t.dtype in (torch.float32, torch.float64)


def _spmm_accumulate(out: torch.Tensor, layout: SupportLayout, values: torch.Tensor, dense: torch.Tensor,
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


# ----------------------------------------------------------------------------- math of both paths
# Plain functions (no autograd), shared by the Functions below and by layers that wrap several SL
# products in one Function of their own (e.g. the sequence-parallel column layer, which saves only
# its sequence shard and gathers the input again in backward).

def forward_math(path: str, x, B, A, values, layout: "SupportLayout", scale: float, bias=None):
    """y = x (s·B A + S)ᵀ (+ bias) for x [T, in], on ``path`` ("dense" or "factored")."""
    if path == "dense":
        W = OPS["densify"](B, A, values, layout.flat(x.device), scale)
        return F.linear(x, W, bias)
    y = torch.mm(x @ A.t(), B.t()).mul_(scale)
    if layout.nnz:
        _spmm_accumulate(y, layout, values, x, transpose=False)
    return y if bias is None else y + bias


def backward_math(path: str, dy, x, B, A, values, layout: "SupportLayout", scale: float,
                  needs=(True, True, True, True)):
    """(dx, dB, dA, dvalues) for dy [T, out] and the saved x [T, in]; entries whose ``needs`` flag
    (x, B, A, values) is False are None. Nothing with out x in elements outlives this call."""
    need_x, need_B, need_A, need_v = needs
    s = scale
    dy = dy.contiguous()
    dx = dB = dA = dv = None
    if path == "dense":
        if need_x:
            dx = dy @ OPS["densify"](B, A, values, layout.flat(x.device), s)
        if need_B or need_A or need_v:
            G = dy.t() @ x
            if need_v:
                dv = OPS["values_grad"](G, layout.flat(x.device)).to(values.dtype)
            if need_B:
                dB = torch.mm(G, A.t()).mul_(s)
            if need_A:
                dA = torch.mm(B.t(), G).mul_(s)
            del G
        return dx, dB, dA, dv
    dz = torch.mm(dy, B).mul_(s) if (need_x or need_A) else None
    if need_B:
        dB = torch.mm(dy.t(), x @ A.t()).mul_(s)
    if need_A:
        dA = dz.t() @ x
    if need_x:
        dx = dz @ A
        if layout.nnz:
            _spmm_accumulate(dx, layout, values, dy, transpose=True)
    if need_v:
        dv = OPS["sddmm"](dy, x, layout).to(values.dtype) if layout.nnz else torch.zeros_like(values)
    return dx, dB, dA, dv


def choose(path: str, tokens: int, layout: "SupportLayout", rank: int, device_type: str) -> str:
    """Resolve "auto" with the cost model; validate an explicit path."""
    if path == "auto":
        m, n = layout.shape
        return cost_model.choose_path(tokens, m, n, rank, layout.nnz, device_type)
    if path not in ("dense", "factored"):
        raise ValueError(f"path={path!r} is not one of 'auto', 'dense', 'factored'")
    return path


# ----------------------------------------------------------------------------- Functions

def _sl_function(path: str, doc: str) -> type:
    """The autograd Function of one path: saves x, B, A, values (never W, never a scaled copy of
    A); backward recomputes the rest with ``backward_math``."""

    def forward(ctx, x, B, A, values, bias, layout, scale):
        y = forward_math(path, x, B, A, values, layout, scale, bias)
        ctx.save_for_backward(x, B, A, values)
        ctx.layout, ctx.scale = layout, scale
        ctx.has_bias = bias is not None
        return y

    def backward(ctx, dy):
        x, B, A, values = ctx.saved_tensors
        dx, dB, dA, dv = backward_math(path, dy, x, B, A, values, ctx.layout, ctx.scale,
                                       tuple(ctx.needs_input_grad[:4]))
        db = dy.sum(0) if (ctx.needs_input_grad[4] and ctx.has_bias) else None
        return dx, dB, dA, dv, db, None, None

    name = f"SL{path.capitalize()}Function"
    return type(name, (torch.autograd.Function,), {"__doc__": doc, "__qualname__": name,
                                                   "forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


SLDenseFunction = _sl_function("dense", "Dense materialisation of W in forward and again in backward (never saved).")
SLFactoredFunction = _sl_function("factored", "y = s·(x Aᵀ) Bᵀ + x Sᵀ without ever forming an out x in tensor.")

FUNCTIONS = {"dense": SLDenseFunction, "factored": SLFactoredFunction}


def sl_linear(x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, layout: SupportLayout,
              scale: float, bias: Optional[torch.Tensor] = None, path: str = "auto") -> torch.Tensor:
    """y = x (scale·B A + S)ᵀ + bias for x of shape [..., in]; returns [..., out]."""
    m, n = layout.shape
    if x.shape[-1] != n:
        raise ValueError(f"input has {x.shape[-1]} features, the SL layer expects {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    path = choose(path, x2.shape[0], layout, A.shape[0], x.device.type)
    y = FUNCTIONS[path].apply(x2, B, A, values, bias, layout, float(scale))
    return y.reshape(*lead, m)
