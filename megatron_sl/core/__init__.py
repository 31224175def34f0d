"""megatron_sl.core: the SL (sparse + low-rank) linear in pure torch.

Owns the math and nothing else: settings (``SLConfig``), the fixed random support and its
shards (``support``), the sparse primitives as ``torch.library`` custom ops (``ops``: torch reference
kernels from ``reference``, fake implementations; on CUDA they run the Triton kernels of
``megatron_sl.kernels``, looked up by name at call time), the exact autograd Functions for both
execution paths (``functional``), the cost model that picks a path (``cost_model``) and the single-device ``SLLinear`` module.
Imports neither megatron nor deepspeed.
"""

from .config import SLConfig, SLOTS
from .functional import SupportLayout, sl_linear, densify_reference
from .linear import SLLinear, param_report
from .support import global_support, select_cols, select_rows, support_hash
from . import cost_model

__all__ = ["SLConfig", "SLOTS", "SLLinear", "SupportLayout", "sl_linear", "densify_reference", "param_report",
           "global_support", "select_rows", "select_cols", "support_hash", "cost_model"]
