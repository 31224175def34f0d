"""The Triton implementations of core's SL custom ops, and how core finds them.

The ops themselves (``megatron_sl::densify``, ``megatron_sl::sddmm``, with their fake
implementations and autograd formulas) are defined in ``megatron_sl.core.ops`` and re-exported
here. Their kernel asks this package, by module name at call time, for an accelerated
implementation: ``select(name, device_type, backend)`` returns ``triton_densify`` /
``triton_sddmm`` when ``settings.resolve_backend`` picks Triton for the call (CUDA tensors by
default; CPU tensors only when Triton is forced under the interpreter, ``TRITON_INTERPRET=1``),
else None (the core torch reference). Nothing is registered or patched on import, so the dispatch
does not depend on what was imported first.

The values_grad gather of the dense path stays the core reference (it reads the grad W that the
dense path needs anyway for dB and dA), and the factored path's CSR products stay torch.
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


IMPLEMENTATIONS = {"densify": triton_densify, "sddmm": triton_sddmm}


def select(name: str, device_type: str, backend: str = "auto") -> Optional[Callable]:
    """The Triton implementation of primitive ``name`` when ``backend`` resolves to Triton for
    tensors on ``device_type``, else None (core runs its torch reference). Raises ValueError for
    an unknown backend and RuntimeError for an impossible one (``settings.resolve_backend``)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"no accelerated implementation of {name!r}; known: {sorted(IMPLEMENTATIONS)}")
    if settings.resolve_backend(device_type, backend) == "triton":
        return IMPLEMENTATIONS[name]
    return None


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
