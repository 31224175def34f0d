"""SLConfig: the one source of truth for every SL (sparse + low-rank) setting.

A layer's weight is W = (alpha / rank) * B @ A + S, where S has a fixed random support of
floor(density * out * in) entries drawn from (seed, layer name). ``targets`` says which of
megatron's four linear slots (qkv, proj, fc1, fc2) become SL layers; the rest stay dense.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

from megatron_sl.constants import SL_PATHS as PATHS
from megatron_sl.constants import SL_SLOTS as SLOTS


@dataclasses.dataclass(frozen=True)
class SLConfig:
    """Settings shared by every SL layer of a model.

    Attributes:
        rank: r, the inner dimension of B (out x r) and A (r x in).
        density: delta in [0, 1); nnz = floor(delta * out * in). 0 is the Low-Rank baseline.
        alpha: the scale is s = alpha / rank (the paper's lora_alpha).
        seed: global seed; each layer's support and init come from (seed, layer name).
        targets: which megatron slots are SL; the others stay dense (full-rank).
        path: "auto" picks dense materialisation or the factored path per call from the cost
            model in ``megatron_sl.core.cost_model``; "dense"/"factored" force one.
        save_xa: the factored path keeps x·Aᵀ ([T, r] per part) from forward for backward instead
            of recomputing it: one T·in·r GEMM less per part and micro-batch for T·r more saved
            activation elements (not divided by TP: A of a column part is replicated). Same
            results either way.
    """

    rank: int = 128
    density: float = 0.03
    alpha: float = 32.0
    seed: int = 0
    targets: Tuple[str, ...] = SLOTS
    path: str = "auto"
    save_xa: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        validate_common(self.rank, self.density, self.alpha)
        for t in self.targets:
            if t not in SLOTS:
                raise ValueError(f"SLConfig.targets: unknown slot {t!r}; expected a subset of {SLOTS}")
        if self.path not in PATHS:
            raise ValueError(f"SLConfig.path={self.path!r} is not one of {PATHS}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SLConfig.seed={self.seed!r} must be an int")
        if not isinstance(self.save_xa, bool):
            raise ValueError(f"SLConfig.save_xa={self.save_xa!r} must be a bool")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def is_sl(self, slot: str) -> bool:
        return slot in self.targets


def validate_common(rank, density, alpha) -> None:
    """Checks that do not depend on the layer shape; raise one ValueError naming the value."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an int >= 1")
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not (0.0 <= density < 1.0):
        raise ValueError(f"density={density!r} must be a number in [0, 1)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r} must be a finite number > 0")


def validate_shape(in_features, out_features, rank) -> None:
    """Shape checks for one layer (rank must fit the matrix)."""
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank={rank} must be in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}]"
        )
