"""The SL linear as custom autograd Functions (pure torch), exact in both directions.

y = x Wᵀ + b with W = s·B A + S. Forward saves only x, B, A, values (and the layer's index
structures, which are fixed; x·Aᵀ too under ``save_xa``); nothing with out x in elements and no
scaled copy of A is kept between forward and backward -- backward recomputes what it needs. Two
paths, picked by ``cost_model.choose_path`` unless forced (see that module for the FLOP accounting):

* dense:    W = densify(B, A, values); y = F.linear(x, W). Backward recomputes W.
* factored: y = s·(x Aᵀ) Bᵀ + x Sᵀ with CSR sparse products; backward recomputes x Aᵀ, or
  reads it when the layer saves it (``SLConfig.save_xa``: T·r more activation elements per layer
  for one T·in·r GEMM less).

Tensor parallelism: the Functions issue no collective. A factor replicated across TP ranks (A of
column-parallel, B of row-parallel layers) gets this rank's partial gradient; the tensor-parallel
layers tag it and the sum over TP happens once per optimizer step, coalesced
(``megatron_sl.parallel.grad_sync``), like megatron-core's ``finalize_model_grads``.

The sparse primitives are the ``megatron_sl::*`` custom ops of ``core.ops`` (densify, sddmm,
spmm_accumulate): each picks the Triton or numba kernels or the torch reference per call, whatever
was imported, and each has a fake implementation, so ``torch.compile(fullgraph=True)`` traces both
paths. Eager calls of sddmm and spmm_accumulate run the ops' bodies directly (``core.ops.*_eager``),
skipping the custom-op dispatch, which costs as much as a small sparse product. The support is
handed over explicitly (the layer's ``SupportLayout``); nothing is cached between calls.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cost_model
from . import ops  # defines the megatron_sl::* custom ops used below
from .reference import (TOKEN_CHUNK, SupportLayout, densify_reference, sddmm_reference,  # noqa: F401 (re-exported)
                        spmm_accumulate_reference, values_grad_reference)


def _densify(B, A, values, idx, scale):
    return torch.ops.megatron_sl.densify(B, A, values, idx, float(scale))


def sparse_accumulate(out: torch.Tensor, layout: SupportLayout, values: torch.Tensor, dense: torch.Tensor,
                      transpose: bool) -> torch.Tensor:
    """out += dense Sᵀ (dense [T, in], out [T, out]) or, with ``transpose``, out += dense S; returns out."""
    args = (out, dense, layout.flat(dense.device), values, transpose)
    if torch.compiler.is_compiling():
        torch.ops.megatron_sl.spmm_accumulate(*args)
    else:  # eager: the op's body without its dispatch (a layer makes 2-3 of these calls per part)
        ops.spmm_accumulate_eager(*args)
    return out


def sparse_values_grad(dy: torch.Tensor, x: torch.Tensor, layout: SupportLayout) -> torch.Tensor:
    """g_k = Σ_t dy[t, row_k]·x[t, col_k] over the support, in its order (the SDDMM)."""
    idx = layout.flat(x.device)
    if torch.compiler.is_compiling():
        return torch.ops.megatron_sl.sddmm(dy, x, idx)
    return ops.sddmm_eager(dy, x, idx)


def _mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """a @ b, written into ``out`` (which may be a column slice) when given."""
    if out is None:
        return torch.mm(a, b)
    if torch.compiler.is_compiling():  # dynamo refuses a non-contiguous out=
        return out.copy_(torch.mm(a, b))
    return torch.mm(a, b, out=out)


# ----------------------------------------------------------------------------- math of both paths
# Plain functions (no autograd), shared by the Functions below and by layers that wrap several SL
# products in one Function of their own (e.g. the sequence-parallel column layer, which saves only
# its sequence shard and gathers the input again in backward).

def forward_math(path: str, x, B, A, values, layout: "SupportLayout", scale: float, bias=None, *,
                 out=None, sparse: bool = True):
    """(y, xa): y = x (s·B A + S)ᵀ (+ bias) for x [T, in] on ``path`` ("dense" or "factored"), and
    the factored path's x·Aᵀ [T, r], which a caller may keep for ``backward_weight_math`` (None on
    the dense path). ``out`` ([T, out], may be a column slice of a wider buffer) receives y instead
    of a new tensor. ``sparse=False`` leaves x Sᵀ out of the factored path, for a caller that adds
    the sparse products of several parts in one call (``SupportLayout.stacked``)."""
    if path == "dense":
        W = _densify(B, A, values, layout.flat(x.device), scale)
        if out is None:
            return F.linear(x, W, bias), None
        _mm(x, W.t(), out)
        return (out if bias is None else out.add_(bias)), None
    xa = x @ A.t()
    y = _mm(xa, B.t(), out).mul_(scale)
    if sparse and layout.nnz:
        sparse_accumulate(y, layout, values, x, transpose=False)
    return (y if bias is None else y.add_(bias)), xa


def backward_input_math(path: str, dy, x, B, A, values, layout: "SupportLayout", scale: float,
                        need_x: bool = True, need_A: bool = True, *, sparse: bool = True):
    """The first half of ``backward_math``: (dx, carry). dx (None unless ``need_x``) is ready to be
    reduced over tensor-parallel ranks while ``backward_weight_math`` computes the weight gradients
    from ``carry`` (the factored path's dz = s·dY B, computed once for dx and dA). dy may be a
    column slice of a wider gradient; ``sparse=False`` as in ``forward_math`` (dY S left out)."""
    if path == "dense":
        return (dy @ _densify(B, A, values, layout.flat(x.device), scale) if need_x else None), None
    dz = torch.mm(dy, B).mul_(scale) if (need_x or need_A) else None
    dx = None
    if need_x:
        dx = dz @ A
        if sparse and layout.nnz:
            sparse_accumulate(dx, layout, values, dy.contiguous(), transpose=True)
    return dx, dz


def backward_weight_math(path: str, dy, x, B, A, values, layout: "SupportLayout", scale: float,
                         needs=(True, True, True), carry=None, xa=None):
    """The second half of ``backward_math``: (dB, dA, dvalues), None where ``needs`` (B, A, values)
    is False; ``carry`` is what ``backward_input_math`` returned; ``xa`` the x·Aᵀ forward kept
    (recomputed when None)."""
    need_B, need_A, need_v = needs
    s = scale
    dB = dA = dv = None
    if path == "dense":
        if need_B or need_A or need_v:
            G = dy.t() @ x
            if need_v:
                dv = values_grad_reference(G, layout.flat(x.device)).to(values.dtype)
            if need_B:
                dB = torch.mm(G, A.t()).mul_(s)
            if need_A:
                dA = torch.mm(B.t(), G).mul_(s)
            del G
        return dB, dA, dv
    if need_B:
        dB = torch.mm(dy.t(), x @ A.t() if xa is None else xa).mul_(s)
    if need_A:
        dz = carry if carry is not None else torch.mm(dy, B).mul_(s)
        dA = dz.t() @ x
    if need_v:
        dv = sparse_values_grad(dy.contiguous(), x, layout).to(values.dtype) if layout.nnz else torch.zeros_like(values)
    return dB, dA, dv


def backward_math(path: str, dy, x, B, A, values, layout: "SupportLayout", scale: float,
                  needs=(True, True, True, True), xa=None):
    """(dx, dB, dA, dvalues) for dy [T, out] and the saved x [T, in]; entries whose ``needs`` flag
    (x, B, A, values) is False are None. Nothing with out x in elements outlives this call."""
    need_x, need_B, need_A, need_v = needs
    dx, carry = backward_input_math(path, dy, x, B, A, values, layout, scale, need_x, need_A)
    return (dx, *backward_weight_math(path, dy, x, B, A, values, layout, scale, (need_B, need_A, need_v), carry,
                                      xa))


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
    A), and with ``save_xa`` the factored path's x·Aᵀ; backward recomputes the rest with
    ``backward_math``."""

    def forward(ctx, x, B, A, values, bias, layout, scale, save_xa):
        y, xa = forward_math(path, x, B, A, values, layout, scale, bias)
        ctx.save_for_backward(x, B, A, values, *([xa] if save_xa and xa is not None else []))
        ctx.layout, ctx.scale = layout, scale
        ctx.has_bias = bias is not None
        return y

    def backward(ctx, dy):
        x, B, A, values, *xa = ctx.saved_tensors
        dx, dB, dA, dv = backward_math(path, dy, x, B, A, values, ctx.layout, ctx.scale,
                                       tuple(ctx.needs_input_grad[:4]), xa[0] if xa else None)
        db = dy.sum(0) if (ctx.needs_input_grad[4] and ctx.has_bias) else None
        return dx, dB, dA, dv, db, None, None, None

    name = f"SL{path.capitalize()}Function"
    return type(name, (torch.autograd.Function,), {"__doc__": doc, "__qualname__": name,
                                                   "forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


SLDenseFunction = _sl_function("dense", "Dense materialisation of W in forward and again in backward (never saved).")
SLFactoredFunction = _sl_function("factored", "y = s·(x Aᵀ) Bᵀ + x Sᵀ without ever forming an out x in tensor.")

FUNCTIONS = {"dense": SLDenseFunction, "factored": SLFactoredFunction}


def sl_linear(x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, layout: SupportLayout,
              scale: float, bias: Optional[torch.Tensor] = None, path: str = "auto",
              save_xa: bool = False) -> torch.Tensor:
    """y = x (scale·B A + S)ᵀ + bias for x of shape [..., in]; returns [..., out]. ``save_xa``
    keeps the factored path's x·Aᵀ for backward instead of recomputing it (``SLConfig.save_xa``)."""
    m, n = layout.shape
    if x.shape[-1] != n:
        raise ValueError(f"input has {x.shape[-1]} features, the SL layer expects {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    path = choose(path, x2.shape[0], layout, A.shape[0], x.device.type)
    y = FUNCTIONS[path].apply(x2, B, A, values, bias, layout, float(scale), bool(save_xa))
    # Not a view of y (the aten op torch.matmul unfolds its result with): megatron's bias-dropout-add
    # adds in place without autograd and then makes its result "viewless" by assigning ``.data``,
    # which torch.compile cannot trace for a view.
    return torch.ops.aten._unsafe_view(y, (*lead, m))
