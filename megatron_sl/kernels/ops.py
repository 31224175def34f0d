"""The accelerated implementations of core's SL custom ops, and how core finds them.

The ops themselves (``megatron_sl::densify``, ``megatron_sl::sddmm``,
``megatron_sl::spmm_accumulate``, with their fake implementations and autograd formulas) are
defined in ``megatron_sl.core.ops`` and re-exported here. Their kernel asks this package, by module
name at call time, for an accelerated implementation: ``select(name, device_type, backend)``
returns the implementation of the backend that ``settings.resolve_backend`` picks for the call --
Triton (``triton_densify`` / ``triton_sddmm``: CUDA tensors by default, CPU tensors only when
forced under the interpreter, ``TRITON_INTERPRET=1``) or numba (``cpu_kernels``: the factored
path's SpMM and SDDMM on CPU tensors) -- or None (the core torch reference). Nothing is registered
or patched on import, so the dispatch does not depend on what was imported first.

The values_grad gather of the dense path stays the core reference (it reads the grad W that the
dense path needs anyway for dB and dA); on CUDA the factored path's SpMM stays torch's CSR product.
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron_sl.core.ops import check_densify_args, check_sddmm_args, densify, sddmm  # noqa: F401 (re-exported)

from . import settings


def _triton():
    from . import triton_kernels  # lazy: imports triton, and fixes interpreter mode at first use
    return triton_kernels


def triton_densify(B, A, values, idx, scale):
    """W = scale·B A + S with the Triton kernel and the configured blocks (its tile layout is
    built inside the launch from ``idx`` and dropped with it)."""
    return _triton().densify(B, A, values, idx, scale, settings.densify_blocks())


def triton_sddmm(dy, x, idx):
    """g_k = Σ_t dy[t,row_k]·x[t,col_k] with the Triton kernel and the configured blocks."""
    return _triton().sddmm(dy, x, idx, settings.sddmm_blocks())


def numba_spmm_accumulate(out, dense, idx, values, transpose):
    """out += dense @ Sᵀ (or @ S) with the numba CPU kernel (imports numba on first use)."""
    from . import cpu_kernels
    cpu_kernels.spmm_accumulate(out, dense, idx, values, transpose)


def numba_sddmm(dy, x, idx):
    """g_k = Σ_t dy[t,row_k]·x[t,col_k] with the numba CPU kernel."""
    from . import cpu_kernels
    return cpu_kernels.sddmm(dy, x, idx)


IMPLEMENTATIONS = {
    "triton": {"densify": triton_densify, "sddmm": triton_sddmm},
    "numba": {"sddmm": numba_sddmm, "spmm_accumulate": numba_spmm_accumulate},
}
PRIMITIVES = ("densify", "sddmm", "spmm_accumulate")


def select(name: str, device_type: str, backend: str = "auto") -> Optional[Callable]:
    """The implementation of primitive ``name`` by the backend that ``backend`` resolves to for
    tensors on ``device_type``, or None when that is the torch reference or the backend has no
    implementation of ``name`` (core runs its torch reference). Raises ValueError for an unknown
    primitive or backend and RuntimeError for an impossible one (``settings.resolve_backend``)."""
    if name not in PRIMITIVES:
        raise ValueError(f"no primitive {name!r}; known: {list(PRIMITIVES)}")
    return IMPLEMENTATIONS.get(settings.resolve_backend(device_type, backend), {}).get(name)


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
