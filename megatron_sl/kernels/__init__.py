"""megatron_sl.kernels: GPU kernels (Triton) and CPU kernels (numba) for the SL linear's sparse hot spots.

Owns: the Triton kernels and launchers (``triton_kernels``: densify W = s·B A + S, and the
values-gradient SDDMM), the numba CPU kernels of the factored path (``cpu_kernels``: SpMM with S
and Sᵀ, SDDMM), the tile layout of a layer's fixed support (``tile_layout``, built inside
each launch from the index it is given, or passed in by the caller; never cached), the Triton
implementations that core's ``torch.library`` custom ops select (``ops.select``), and which
implementation runs where (``settings``: Triton on CUDA tensors, numba on single-threaded CPU
ranks, else the core torch reference; ``MEGATRON_SL_KERNELS=auto|triton|numba|torch``,
``set_backend``/``use_backend``, block sizes).

Importing this package changes nothing: the custom ops ``megatron_sl::densify`` /
``megatron_sl::sddmm`` are defined in ``megatron_sl.core.ops`` (re-exported here) and look this
package up by name when they run, so ``from megatron_sl.core import SLLinear`` alone runs Triton on
a GPU. Triton and numba themselves are imported lazily, on the first launch.
"""

from megatron_sl.core.functional import sl_linear

from .ops import IMPLEMENTATIONS, densify, index_report, sddmm, select, triton_densify, triton_sddmm
from .settings import (DensifyBlocks, SddmmBlocks, configured_backend, resolve_backend, set_backend, set_blocks,
                       use_backend, use_blocks)
from .tile_layout import TileLayout, build_tile_layout

__all__ = ["sl_linear", "densify", "sddmm", "select", "IMPLEMENTATIONS", "triton_densify", "triton_sddmm",
           "index_report", "DensifyBlocks", "SddmmBlocks", "configured_backend", "resolve_backend",
           "set_backend", "set_blocks", "use_backend", "use_blocks", "TileLayout", "build_tile_layout"]
