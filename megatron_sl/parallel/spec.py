"""Layer specs: megatron's LLaMA local spec (RMSNorm, SwiGLU, RoPE, GQA) with SL linears.

``get_gpt_layer_sl_spec(sl_config, variant)`` starts from megatron's own
``get_gpt_layer_local_spec(normalization="RMSNorm")`` (so attention, bias-dropout-add and the MLP stay
megatron's) and swaps:

* the four linear slots named in ``sl_config.targets`` for ``SLColumnParallelLinear`` (linear_qkv,
  linear_fc1) / ``SLRowParallelLinear`` (linear_proj, linear_fc2), each a
  ``ModuleSpec(params={"sl_config": ..., "name_after_build": True})``; slots not targeted keep megatron's
  dense linears. The SL layers get their parameters when ``name_sl_layers(model)`` names them by
  module path after the model is built (``megatron_sl.model.build_model`` does);
* both norms for ``SLRMSNorm`` (sequence-parallel capable).

One entry point builds all three models compared in the paper: ``variant="sl"`` (W = s·BA + S),
``"lowrank"`` (the same layers with density forced to 0: W = s·BA) and ``"dense"`` (megatron's
full-rank ColumnParallelLinear / RowParallelLinear in every slot; ``sl_config`` is ignored).
``get_gpt_decoder_block_sl_spec`` wraps the layer spec into ``TransformerBlockSubmodules`` so the
final norm is an ``SLRMSNorm`` too (needed for sequence parallel).
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_sl.core.config import SLConfig

from .layers import SLColumnParallelLinear, SLRowParallelLinear
from .norm import SLRMSNorm
from .variants import VARIANTS, variant_sl_config  # noqa: F401 (re-exported)


def get_gpt_layer_sl_spec(sl_config: Optional[SLConfig] = None, variant: str = "sl") -> ModuleSpec:
    """TransformerLayer spec for LLaMA with SL linears in ``sl_config.targets`` (see module doc)."""
    cfg = variant_sl_config(sl_config, variant)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    layer = spec.submodules
    attn, mlp = layer.self_attention.submodules, layer.mlp.submodules
    expected = {"qkv": (attn, "linear_qkv", ColumnParallelLinear), "proj": (attn, "linear_proj", RowParallelLinear),
                "fc1": (mlp, "linear_fc1", ColumnParallelLinear), "fc2": (mlp, "linear_fc2", RowParallelLinear)}
    for slot, (owner, attr, cls) in expected.items():  # fail loudly if megatron's local spec changes shape
        if getattr(owner, attr) is not cls:
            raise RuntimeError(f"megatron's local spec has {getattr(owner, attr)!r} in {attr}, expected {cls.__name__}")
    layer.input_layernorm = SLRMSNorm
    layer.pre_mlp_layernorm = SLRMSNorm
    if cfg is not None:
        for slot, (owner, attr, cls) in expected.items():
            if cfg.is_sl(slot):
                sl_cls = SLColumnParallelLinear if cls is ColumnParallelLinear else SLRowParallelLinear
                setattr(owner, attr, ModuleSpec(module=sl_cls, params={"sl_config": cfg, "name_after_build": True}))
    return spec


def get_gpt_decoder_block_sl_spec(config, sl_config: Optional[SLConfig] = None, variant: str = "sl",
                                  vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """Decoder block spec (this pipeline stage's layers + SLRMSNorm final norm) for ``GPTModel``."""
    layer = get_gpt_layer_sl_spec(sl_config, variant)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SLRMSNorm)
