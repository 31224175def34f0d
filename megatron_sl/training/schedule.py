"""The learning-rate schedule (the SLTrain/GaLore recipe): linear warmup to the peak, then cosine
decay to ``min_lr_ratio`` x peak at the last step, flat afterwards.

``lr_at(step)`` is a pure function of the optimizer-step index (0-based: the LR used by the
``step``-th update), so a resumed run recomputes the same value; ``lr_lambda`` adapts it to
``torch.optim.lr_scheduler.LambdaLR`` (whose state DeepSpeed checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    peak_lr: float
    warmup_iters: int
    total_iters: int
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int) -> float:
        """LR of update number ``step`` (0-based). Warmup reaches the peak at step warmup-1."""
        if step < self.warmup_iters:
            return self.peak_lr * (step + 1) / self.warmup_iters
        min_lr = self.peak_lr * self.min_lr_ratio
        decay = self.total_iters - self.warmup_iters
        if decay <= 1:  # at most one step after warmup: it is the last one
            return min_lr
        progress = min(1.0, (step - self.warmup_iters) / (decay - 1))
        return min_lr + (self.peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_lambda(self, step: int) -> float:
        """Multiplier of the peak LR, for LambdaLR (whose ``last_epoch`` counts optimizer steps)."""
        return self.lr_at(step) / self.peak_lr
