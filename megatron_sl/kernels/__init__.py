"""megatron_sl.kernels: GPU kernels (Triton) for the SL linear's sparse hot spots, and their dispatch.

Owns: the Triton kernels and launchers (``triton_kernels``: densify W = s·B A + S, and the
values-gradient SDDMM), the tile layout of a layer's fixed support (``tile_layout``, derived inside each
launch, never cached), the ``torch.library`` custom ops ``megatron_sl::densify`` / ``megatron_sl::sddmm``
(``ops``), and which implementation runs where (``settings``: Triton on CUDA tensors, the core torch
reference on CPU; ``MEGATRON_SL_KERNELS=auto|triton|torch``, ``set_backend``/``use_backend``).

Importing this package calls ``install()``, which routes ``megatron_sl.core.functional.OPS`` through
the custom ops, so both execution paths of the core SL linear (dense materialisation and the
factored path) use the kernels on GPU. ``sl_linear`` re-exports the core function for the layers
above. Triton itself is imported lazily, on the first Triton launch.
"""

from megatron_sl.core.functional import sl_linear

from .ops import densify, densify_primitive, index_report, install, installed, sddmm, sddmm_primitive, uninstall
from .settings import (DensifyBlocks, SddmmBlocks, configured_backend, resolve_backend, set_backend, set_blocks,
                       use_backend, use_blocks)
from .tile_layout import TileLayout, build_tile_layout

install()

__all__ = ["sl_linear", "densify", "sddmm", "densify_primitive", "sddmm_primitive", "install", "uninstall",
           "installed", "index_report", "DensifyBlocks", "SddmmBlocks", "configured_backend", "resolve_backend",
           "set_backend", "set_blocks", "use_backend", "use_blocks", "TileLayout", "build_tile_layout"]
