"""The three model variants one entry point builds, and the SLConfig each one uses (pure python).

``"sl"``: W = s·BA + S in the targeted slots; ``"lowrank"``: the same layers with density 0
(W = s·BA, the paper's Low-Rank baseline); ``"dense"``: megatron's full-rank linears everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_sl.constants import VARIANTS
from megatron_sl.core.config import SLConfig


def variant_sl_config(sl_config: Optional[SLConfig], variant: str) -> Optional[SLConfig]:
    """The SLConfig a variant uses: as given for "sl", density 0 for "lowrank", None for "dense"."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    if variant == "dense":
        return None
    if not isinstance(sl_config, SLConfig):
        raise ValueError(f"variant={variant!r} needs sl_config=<megatron_sl.core.SLConfig>, got {sl_config!r}")
    return dataclasses.replace(sl_config, density=0.0) if variant == "lowrank" else sl_config
