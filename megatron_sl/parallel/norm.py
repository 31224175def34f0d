"""SLRMSNorm: the LLaMA RMSNorm for megatron's norm slots, sequence-parallel capable.

megatron's local spec wraps ``torch.nn.RMSNorm`` and refuses sequence parallelism. Under sequence
parallel each TP rank normalises only its own tokens, so the weight's gradient on one rank is
partial: it is tagged with ``grad_sync.mark_partial_tp_grad`` and summed over TP once per optimizer
step with the SL factors (not per micro-batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grad_sync import mark_partial_tp_grad
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
        if self.sequence_parallel:
            mark_partial_tp_grad(self.weight, self.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"
