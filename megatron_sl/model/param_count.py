"""Analytical parameter counts of a LLaMA preset as built by ``build_model`` (any variant).

Per transformer layer the paper's seven matrices (out × in): q [np·hn × d], k and v [ng·hn × d],
o [d × np·hn], gate and up [F × d], down [d × F]. An SL matrix holds r·(out + in) low-rank
parameters (B, A) and nnz = floor(δ·out·in) sparse values, whose support index costs
``index_dtype(out·in).itemsize`` bytes per entry (int32 here; the research code stores int64).
Everything else is dense: the untied embedding and output layer (vocab × d each), 2 RMSNorm
weights per layer plus the final one, and any of the four slots not in ``sl_config.targets``.
No biases (LLaMA). The counts are per model, summed over tensor-parallel ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple, Union

import torch

from megatron_sl.core.config import SLConfig
from megatron_sl.core.support import index_dtype, nnz_for
from megatron_sl.parallel.variants import variant_sl_config

from .presets import LlamaPreset, get_preset


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts (numbers of elements) and SL index bytes of one model."""

    total: int
    low_rank: int
    sparse: int
    dense: int
    index_bytes: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def slot_matrices(preset: LlamaPreset) -> Dict[str, List[Tuple[str, int, int]]]:
    """Per slot, the (part, out, in) matrices of one layer."""
    d, f, hn = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    q, kv = preset.num_attention_heads * hn, preset.num_query_groups * hn
    return {
        "qkv": [("q", q, d), ("k", kv, d), ("v", kv, d)],
        "proj": [("o", d, q)],
        "fc1": [("gate", f, d), ("up", f, d)],
        "fc2": [("down", d, f)],
    }


def default_sl_config(preset: LlamaPreset, seed: int = 0) -> SLConfig:
    return SLConfig(rank=preset.rank, density=preset.density, alpha=preset.alpha, seed=seed)


def count_parameters(preset: Union[str, LlamaPreset], variant: str = "sl", sl_config: Optional[SLConfig] = None,
                     vocab_size: Optional[int] = None) -> ParamCount:
    """Counts for ``variant`` in ("sl", "lowrank", "dense"); sl_config defaults to the preset's."""
    p = get_preset(preset)
    cfg = variant_sl_config(sl_config if sl_config is not None else default_sl_config(p), variant)
    vocab = p.vocab_size if vocab_size is None else vocab_size
    d, layers = p.hidden_size, p.num_layers
    dense = 2 * vocab * d + (2 * layers + 1) * d
    low_rank = sparse = index_bytes = 0
    for slot, mats in slot_matrices(p).items():
        for part, out, inp in mats:
            if cfg is None or not cfg.is_sl(slot):
                dense += layers * out * inp
                continue
            if cfg.rank > min(out, inp):
                raise ValueError(f"preset {p.name!r}: rank={cfg.rank} exceeds min(out, in)={min(out, inp)} of the "
                                 f"{part} matrix ({out}x{inp})")
            nnz = nnz_for(out, inp, cfg.density)
            low_rank += layers * cfg.rank * (out + inp)
            sparse += layers * nnz
            index_bytes += layers * nnz * torch.empty(0, dtype=index_dtype(out * inp)).element_size()
    return ParamCount(total=dense + low_rank + sparse, low_rank=low_rank, sparse=sparse, dense=dense,
                      index_bytes=index_bytes)
