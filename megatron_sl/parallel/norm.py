"""SLRMSNorm: the LLaMA RMSNorm for megatron's norm slots, sequence-parallel capable.

megatron's local spec wraps ``torch.nn.RMSNorm`` and refuses sequence parallelism. Under sequence
parallel each TP rank normalises only its own tokens, so the weight's gradient on one rank is
partial; here the weight enters the op through ``copy_to_tensor_model_parallel_region`` (identity
forward, all-reduce backward), so its gradient is already summed over TP when backward returns.
Like the SL linears, the weight is therefore NOT tagged ``sequence_parallel`` and nothing
downstream (``finalize_model_grads``, DeepSpeed) may reduce it again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from .layers import _param_device, _tp_size_rank, resolve_tp_group


class SLRMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, built as ``module(config=, hidden_size=, eps=)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"SLRMSNorm needs config.normalization='RMSNorm', got {config.normalization!r}")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("SLRMSNorm does not implement layernorm_zero_centered_gamma=True")
        self.hidden_size, self.eps = hidden_size, float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=_param_device(config)))
        self.tp_group = resolve_tp_group(None)
        self.sequence_parallel = bool(config.sequence_parallel) and _tp_size_rank(self.tp_group)[0] > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.sequence_parallel:
            w = copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        return F.rms_norm(x, (self.hidden_size,), w, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"
