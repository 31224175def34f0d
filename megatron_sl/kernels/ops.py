"""``torch.library`` custom ops for the SL primitives, and their installation into core.

Ops (namespace ``megatron_sl``), with the same meaning as the core torch references:

* ``megatron_sl::densify(B, A, values, idx, scale, backend="auto") -> W``:
  W = scale·B A + S, S holding ``values`` at the flat row-major positions ``idx``.
* ``megatron_sl::sddmm(dy, x, idx, backend="auto") -> g``: g_k = Σ_t dy[t, row_k]·x[t, col_k]
  for dy = dY (T x out), x = X (T x in); the values' gradient without forming grad W.

Implementations: CPU = the core torch reference (``densify_reference`` / ``sddmm_reference``);
CUDA = the Triton kernels. ``settings.resolve_backend`` can force either (env var
``MEGATRON_SL_KERNELS``, ``set_backend``, or the op's ``backend`` argument); forcing Triton on CPU
tensors runs the kernels in the Triton interpreter (``TRITON_INTERPRET=1``). Both ops have a fake
(meta) implementation for ``torch.compile`` and an autograd formula (plain torch), so
``torch.library.opcheck`` passes.

``install()`` puts ``densify_primitive`` / ``sddmm_primitive`` into ``core.functional.OPS`` (the
values_grad gather of the dense path stays the core reference: it reads the grad W the dense path
needs anyway for dB and dA).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_sl.core import functional as core_fn

from . import settings

_INDEX_DTYPES = (torch.int32, torch.int64)


def _triton():
    from . import triton_kernels  # lazy: imports triton, and fixes interpreter mode at first use
    return triton_kernels


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


# ----------------------------------------------------------------------------- densify

def _densify_impl(B: Tensor, A: Tensor, values: Tensor, idx: Tensor, scale: float, backend: str) -> Tensor:
    check_densify_args(B, A, values, idx, scale)
    if settings.resolve_backend(B.device.type, backend) == "triton":
        return _triton().densify(B, A, values, idx, scale, settings.densify_blocks())
    return core_fn.densify_reference(B, A, values, idx, scale)


@torch.library.custom_op("megatron_sl::densify", mutates_args=(), device_types="cpu")
def densify(B: Tensor, A: Tensor, values: Tensor, idx: Tensor, scale: float, backend: str = "auto") -> Tensor:
    """W = scale·B A + S (CPU: torch reference; Triton only when forced under the interpreter)."""
    return _densify_impl(B, A, values, idx, scale, backend)


@densify.register_kernel("cuda")
def _densify_cuda(B, A, values, idx, scale, backend="auto"):
    """CUDA: the Triton kernel (the torch reference when ``torch`` is forced)."""
    return _densify_impl(B, A, values, idx, scale, backend)


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

def _sddmm_impl(dy: Tensor, x: Tensor, idx: Tensor, backend: str) -> Tensor:
    check_sddmm_args(dy, x, idx)
    if idx.shape[0] == 0:
        return x.new_zeros(0)
    if settings.resolve_backend(x.device.type, backend) == "triton":
        return _triton().sddmm(dy, x, idx, settings.sddmm_blocks())
    return core_fn.sddmm_reference(dy, x, core_fn.SupportLayout(idx, dy.shape[1], x.shape[1]))


@torch.library.custom_op("megatron_sl::sddmm", mutates_args=(), device_types="cpu")
def sddmm(dy: Tensor, x: Tensor, idx: Tensor, backend: str = "auto") -> Tensor:
    """g_k = Σ_t dy[t,row_k]·x[t,col_k] (CPU: torch reference; Triton only when forced under the
    interpreter). dy is T x out, x is T x in, idx the flat positions in the out x in weight."""
    return _sddmm_impl(dy, x, idx, backend)


@sddmm.register_kernel("cuda")
def _sddmm_cuda(dy, x, idx, backend="auto"):
    """CUDA: the Triton kernel (the torch reference when ``torch`` is forced)."""
    return _sddmm_impl(dy, x, idx, backend)


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


# ----------------------------------------------------------------------------- core primitives

def densify_primitive(B, A, values, idx, scale):
    """``core.functional.OPS["densify"]`` backed by ``megatron_sl::densify``."""
    return torch.ops.megatron_sl.densify(B, A, values, idx, float(scale))


def sddmm_primitive(dy, x, layout):
    """``core.functional.OPS["sddmm"]`` backed by ``megatron_sl::sddmm`` on the layout's index."""
    return torch.ops.megatron_sl.sddmm(dy, x, layout.flat(x.device))


PRIMITIVES = {"densify": densify_primitive, "sddmm": sddmm_primitive}
_replaced: dict = {}


def install() -> None:
    """Route core's primitives through the custom ops (idempotent)."""
    for name, fn in PRIMITIVES.items():
        current = core_fn.OPS[name]
        if current is not fn:
            _replaced[name] = current
            core_fn.OPS[name] = fn


def uninstall() -> None:
    """Restore what ``install`` replaced (the torch references)."""
    for name, fn in list(_replaced.items()):
        if core_fn.OPS.get(name) is PRIMITIVES[name]:
            core_fn.OPS[name] = fn
        del _replaced[name]


def installed() -> bool:
    return all(core_fn.OPS.get(name) is fn for name, fn in PRIMITIVES.items())


def index_report(layout, device) -> dict:
    """Resident index bytes of one layer, total and per nnz: the canonical index (the layer's
    buffer), a copy on ``device`` kept between calls (none: a call on another device copies
    transiently), the core's derived CSR structures and the Triton tile layouts (none: both are
    derived inside each call and dropped with it)."""
    nnz = max(layout.nnz, 1)
    canonical = layout.idx.numel() * layout.idx.element_size()
    report = {"nnz": layout.nnz, "canonical": canonical, "device_flat": 0,
              "core_derived": layout.index_bytes()["derived"], "tile_layouts": 0}
    report["total"] = canonical + report["core_derived"]
    report["per_nnz"] = {k: report[k] / nnz for k in ("canonical", "device_flat", "core_derived", "tile_layouts",
                                                       "total")}
    return report
