"""The SL primitives as ``torch.library`` custom ops, and which implementation each call runs.

Ops (namespace ``megatron_sl``), defined here whatever else is imported:

* ``densify(B, A, values, idx, scale, backend="auto") -> W``: W = scale·B A + S, S holding
  ``values`` at the flat row-major positions ``idx``;
* ``sddmm(dy, x, idx, backend="auto") -> g``: g_k = Σ_t dy[t, row_k]·x[t, col_k] for dy = dY
  (T x out), x = X (T x in): the values' gradient without forming grad W;
* ``spmm_accumulate(out!, dense, idx, values, transpose) -> ()``: out += dense @ Sᵀ (or @ S when
  ``transpose``), the sparse products of the factored path.

Every op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through
both execution paths of the SL linear, and ``densify`` / ``sddmm`` have autograd formulas (plain
torch), so ``torch.library.opcheck`` passes.

Implementations. The kernel of each op is the torch reference (``core.reference``) unless an
accelerated implementation is selected for the call: ``implementation(name, device_type, backend)``
asks the accelerator module ``ACCELERATOR_MODULE`` (``megatron_sl.kernels``), looked up by name with
``importlib`` at call time -- core never imports it at import time (layering: core <- kernels) --
whose ``select`` returns the Triton launcher (CUDA tensors by default; CPU tensors only when Triton
is forced under the interpreter), the numba CPU kernel (sddmm and spmm_accumulate on CPU tensors)
or None. So the dispatch is the same whatever was imported, and in
whichever order: ``from megatron_sl.core import SLLinear`` on a GPU runs the Triton kernels. Only an
explicit ``backend="torch"`` skips the lookup.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .reference import SupportLayout, densify_reference, sddmm_reference, spmm_accumulate_reference

ACCELERATOR_MODULE = "megatron_sl.kernels"
_INDEX_DTYPES = (torch.int32, torch.int64)


def implementation(name: str, device_type: str, backend: str = "auto") -> Optional[Callable]:
    """The accelerated implementation of primitive ``name`` ("densify", "sddmm", "spmm_accumulate") for tensors on
    ``device_type``, or None when the torch reference runs. Raises for an unknown or impossible
    ``backend`` (see ``megatron_sl.kernels.settings``)."""
    if backend == "torch":
        return None
    return importlib.import_module(ACCELERATOR_MODULE).select(name, device_type, backend)


# ----------------------------------------------------------------------------- argument checks

def _check_idx(idx: Tensor, n_values, where: str) -> None:
    if idx.dim() != 1 or idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{where}: idx must be a 1-D int32/int64 tensor, got shape {tuple(idx.shape)} "
                         f"dtype {idx.dtype}")
    if n_values is not None and idx.shape[0] != n_values:
        raise ValueError(f"{where}: values has {n_values} entries but idx has {idx.shape[0]}")


def _check_devices(where: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{where}: tensors are on different devices: {devices}")


def check_densify_args(B: Tensor, A: Tensor, values: Tensor, idx: Tensor, scale: float) -> None:
    where = "megatron_sl::densify"
    if B.dim() != 2 or A.dim() != 2:
        raise ValueError(f"{where}: B and A must be 2-D, got B {tuple(B.shape)} and A {tuple(A.shape)}")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"{where}: B is {tuple(B.shape)} but A is {tuple(A.shape)} (rank mismatch)")
    if not B.dtype.is_floating_point or B.dtype != A.dtype:
        raise ValueError(f"{where}: B and A must share one floating dtype, got {B.dtype} and {A.dtype}")
    if values.dim() != 1 or not values.dtype.is_floating_point:
        raise ValueError(f"{where}: values must be a 1-D floating tensor, got shape {tuple(values.shape)} "
                         f"dtype {values.dtype}")
    _check_idx(idx, values.shape[0], where)
    _check_devices(where, B=B, A=A, values=values, idx=idx)
    if not math.isfinite(scale):
        raise ValueError(f"{where}: scale={scale!r} must be finite")


def check_sddmm_args(dy: Tensor, x: Tensor, idx: Tensor) -> None:
    where = "megatron_sl::sddmm"
    if dy.dim() != 2 or x.dim() != 2:
        raise ValueError(f"{where}: dy and x must be 2-D, got dy {tuple(dy.shape)} and x {tuple(x.shape)}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: dy has {dy.shape[0]} tokens but x has {x.shape[0]}")
    if not dy.dtype.is_floating_point or not x.dtype.is_floating_point:
        raise ValueError(f"{where}: dy and x must be floating, got {dy.dtype} and {x.dtype}")
    _check_idx(idx, None, where)
    _check_devices(where, dy=dy, x=x, idx=idx)


def check_spmm_args(out: Tensor, dense: Tensor, idx: Tensor, values: Tensor, transpose: bool) -> None:
    where = "megatron_sl::spmm_accumulate"
    if out.dim() != 2 or dense.dim() != 2 or out.shape[0] != dense.shape[0]:
        raise ValueError(f"{where}: out {tuple(out.shape)} and dense {tuple(dense.shape)} must be 2-D with the "
                         "same number of tokens")
    _check_idx(idx, values.shape[0], where)
    _check_devices(where, out=out, dense=dense, idx=idx, values=values)


# ----------------------------------------------------------------------------- densify

@torch.library.custom_op("megatron_sl::densify", mutates_args=())
def densify(B: Tensor, A: Tensor, values: Tensor, idx: Tensor, scale: float, backend: str = "auto") -> Tensor:
    """W = scale·B A + S: the accelerated implementation if one is selected, else the torch reference."""
    check_densify_args(B, A, values, idx, scale)
    impl = implementation("densify", B.device.type, backend)
    if impl is None:
        return densify_reference(B, A, values, idx, scale)
    return impl(B, A, values, idx, scale)


@densify.register_fake
def _densify_fake(B, A, values, idx, scale, backend="auto"):
    check_densify_args(B, A, values, idx, scale)
    return B.new_empty((B.shape[0], A.shape[1]))


def _densify_setup(ctx, inputs, output):
    B, A, values, idx, scale, _ = inputs
    ctx.save_for_backward(B, A, idx)
    ctx.scale, ctx.values_dtype = scale, values.dtype


def _densify_backward(ctx, gW):
    B, A, idx = ctx.saved_tensors
    s = ctx.scale
    dB = torch.mm(gW, A.t()) * s if ctx.needs_input_grad[0] else None
    dA = torch.mm(B.t(), gW) * s if ctx.needs_input_grad[1] else None
    dv = gW.reshape(-1).index_select(0, idx).to(ctx.values_dtype) if ctx.needs_input_grad[2] else None
    return dB, dA, dv, None, None, None


densify.register_autograd(_densify_backward, setup_context=_densify_setup)


# ----------------------------------------------------------------------------- sddmm

def sddmm_eager(dy: Tensor, x: Tensor, idx: Tensor, backend: str = "auto") -> Tensor:
    """What the ``megatron_sl::sddmm`` op runs, callable without the dispatcher (eager callers save
    the custom op's ~0.1 ms of Python dispatch per call; traced code calls the op)."""
    check_sddmm_args(dy, x, idx)
    impl = implementation("sddmm", x.device.type, backend)  # validates backend even when nnz == 0
    if idx.shape[0] == 0:
        return x.new_zeros(0)
    if impl is None:
        return sddmm_reference(dy, x, SupportLayout(idx, dy.shape[1], x.shape[1]))
    return impl(dy, x, idx)


@torch.library.custom_op("megatron_sl::sddmm", mutates_args=())
def sddmm(dy: Tensor, x: Tensor, idx: Tensor, backend: str = "auto") -> Tensor:
    """g_k = Σ_t dy[t,row_k]·x[t,col_k]: the accelerated implementation if one is selected, else the
    torch reference. dy is T x out, x is T x in, idx the flat positions in the out x in weight."""
    return sddmm_eager(dy, x, idx, backend)


@sddmm.register_fake
def _sddmm_fake(dy, x, idx, backend="auto"):
    check_sddmm_args(dy, x, idx)
    return x.new_empty((idx.shape[0],))


def _sddmm_setup(ctx, inputs, output):
    dy, x, idx, _ = inputs
    ctx.save_for_backward(dy, x, idx)


def _sddmm_backward(ctx, g):
    dy, x, idx = ctx.saved_tensors
    G = torch.zeros(dy.shape[1], x.shape[1], dtype=g.dtype, device=g.device)
    G = G.reshape(-1).index_put((idx.long(),), g).reshape(dy.shape[1], x.shape[1])
    d_dy = torch.mm(x, G.t().to(x.dtype)).to(dy.dtype) if ctx.needs_input_grad[0] else None
    d_x = torch.mm(dy, G.to(dy.dtype)).to(x.dtype) if ctx.needs_input_grad[1] else None
    return d_dy, d_x, None, None


sddmm.register_autograd(_sddmm_backward, setup_context=_sddmm_setup)


# ----------------------------------------------------------------------------- spmm

def spmm_accumulate_eager(out: Tensor, dense: Tensor, idx: Tensor, values: Tensor, transpose: bool) -> None:
    """What the ``megatron_sl::spmm_accumulate`` op runs, callable without the dispatcher (see
    ``sddmm_eager``)."""
    check_spmm_args(out, dense, idx, values, transpose)
    m, n = (dense.shape[1], out.shape[1]) if transpose else (out.shape[1], dense.shape[1])
    impl = implementation("spmm_accumulate", dense.device.type)
    if not idx.shape[0]:
        return
    if impl is None:
        spmm_accumulate_reference(out, SupportLayout(idx, m, n), values, dense, transpose)
    else:
        impl(out, dense, idx, values, transpose)


@torch.library.custom_op("megatron_sl::spmm_accumulate", mutates_args=("out",))
def spmm_accumulate(out: Tensor, dense: Tensor, idx: Tensor, values: Tensor, transpose: bool) -> None:
    """out += dense @ Sᵀ (dense [T, in], out [T, out]) or, with ``transpose``, out += dense @ S
    (dense [T, out], out [T, in]); S holds ``values`` at ``idx``. Used inside the SL Functions'
    forward and backward (no autograd formula of its own)."""
    spmm_accumulate_eager(out, dense, idx, values, transpose)


@spmm_accumulate.register_fake
def _spmm_accumulate_fake(out, dense, idx, values, transpose):
    check_spmm_args(out, dense, idx, values, transpose)
