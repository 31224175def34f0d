"""LLaMA model presets: the paper's shapes and default SL settings, plus a tiny CPU demo model.

Paper sizes (the SLTrain / GaLore repositories' ``configs/llama_*.json`` and
``scripts/llm_pretrain/*.sh``, arXiv 2406.02214): multi-head attention (query groups = heads), SwiGLU, RMSNorm
eps 1e-6, vocab 32000, sequence 256, untied embeddings; r / δ / α as the paper's scripts.

``tiny`` is the CPU demo: hidden 256, ffn 688 (≈ 8/3·256 rounded to 16), 4 heads in 2 query
groups (exercises GQA), 4 layers, vocab 8000 (the demo tokenizer's default), seq 256, r=64
(a quarter of hidden, the paper's r/d ratio for 130M-350M), δ=0.03, α=16. Every tiny matrix has
min(out, in) >= 128 >= r. Tensor-parallel sizes 1, 2 and 4 all divide its heads, groups and ffn.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Union


@dataclasses.dataclass(frozen=True)
class LlamaPreset:
    """Shape and default SL settings of one LLaMA model."""

    name: str
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    num_layers: int
    vocab_size: int
    seq_length: int
    rank: int
    density: float
    alpha: float
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self):
        for f in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers",
                  "vocab_size", "seq_length", "rank"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"preset {self.name!r}: {f}={v!r} must be a positive int")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"preset {self.name!r}: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"preset {self.name!r}: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_query_groups={self.num_query_groups}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _paper(name, hidden, ffn, heads, layers, rank, density, alpha):
    return LlamaPreset(name, hidden, ffn, heads, heads, layers, 32000, 256, rank, density, alpha)


PRESETS: Dict[str, LlamaPreset] = {
    "tiny": LlamaPreset("tiny", 256, 688, 4, 2, 4, 8000, 256, 64, 0.03, 16.0),
    "60m": _paper("60m", 512, 1376, 8, 8, 128, 0.03, 32.0),
    "130m": _paper("130m", 768, 2048, 12, 12, 256, 0.03, 16.0),
    "350m": _paper("350m", 1024, 2736, 16, 24, 256, 0.03, 16.0),
    "1b": _paper("1b", 2048, 5461, 32, 24, 512, 0.03, 8.0),
    "7b": _paper("7b", 4096, 11008, 32, 32, 1024, 0.05, 8.0),
}


def get_preset(name: Union[str, LlamaPreset]) -> LlamaPreset:
    """The preset called ``name`` (case-insensitive, e.g. "60M"); a LlamaPreset is returned as is."""
    if isinstance(name, LlamaPreset):
        return name
    key = name.lower() if isinstance(name, str) else None
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key]
