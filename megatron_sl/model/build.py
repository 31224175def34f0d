"""build_model: a megatron-core GPTModel (LLaMA) for a preset, in the SL, low-rank or dense variant.

The model: RMSNorm (eps from the preset), SwiGLU MLP, RoPE, GQA, no biases, untied embedding and
output layer, no dropout; SL linears in the slots of ``sl_config.targets`` (see
``megatron_sl.parallel.spec``). Needs ``torch.distributed`` and megatron's ``parallel_state``
initialised (``megatron_sl.parallel.initialize_model_parallel``, which applies the CPU shims where
there is no CUDA); the TP size comes from ``parallel_state``. Without CUDA parameters are initialised on the CPU (``use_cpu_initialization=True``), which also makes the dense
parameters identical for every TP size; on GPUs megatron's own GPU initialisation is used (its dense
weights then depend on the TP size -- pass ``config_overrides={"use_cpu_initialization": True}`` for
TP-invariant ones; SL parameters are TP-invariant either way). ``build_model`` seeds torch and megatron's RNG tracker
with ``seed`` before building, so the same arguments give the same model. The SL layers are named
by module path once the GPTModel is built (``megatron_sl.parallel.name_sl_layers``), and only then
sample their supports and initialise, so nothing about them depends on construction order.

``forward(tokens [b, s], position_ids [b, s], attention_mask, labels=labels)`` returns the per-token
loss [b, s] (``attention_mask`` may be None, or a bool [1|b, 1, s, s] mask with True = masked).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sl.core.config import SLConfig
from megatron_sl.parallel.variants import variant_sl_config

from .param_count import count_parameters, default_sl_config
from .presets import LlamaPreset, get_preset


def check_parallel_shape(preset: LlamaPreset, tp: int, vocab_size: int, seq_length: int,
                         sequence_parallel: bool) -> None:
    """One ValueError naming the preset and the value the TP size does not divide."""
    checks = [("num_attention_heads", preset.num_attention_heads), ("ffn_hidden_size", preset.ffn_hidden_size),
              ("vocab_size", vocab_size)]
    for name, value in checks:
        if value % tp:
            raise ValueError(f"preset {preset.name!r}: {name}={value} is not divisible by tensor-parallel size {tp}")
    ng = preset.num_query_groups
    if ng % tp and tp % ng:
        raise ValueError(f"preset {preset.name!r}: num_query_groups={ng} must be a multiple or a divisor of "
                         f"tensor-parallel size {tp}")
    if sequence_parallel:
        if tp == 1:
            raise ValueError("sequence_parallel=True needs tensor-parallel size > 1")
        if seq_length % tp:
            raise ValueError(f"sequence_parallel: seq_length={seq_length} is not divisible by "
                             f"tensor-parallel size {tp}")


# model.recompute -> megatron-core's own activation-recompute fields of TransformerConfig.
RECOMPUTE_FIELDS = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def transformer_config(preset: LlamaPreset, tp: int, sequence_parallel: bool, params_dtype: torch.dtype,
                       **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=preset.num_layers, hidden_size=preset.hidden_size, ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads, num_query_groups=preset.num_query_groups,
        kv_channels=preset.head_dim, normalization="RMSNorm", layernorm_epsilon=preset.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=preset.init_std,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=True,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TransformerConfig)}
    if unknown:
        raise ValueError(f"config_overrides: unknown TransformerConfig fields {sorted(unknown)}")
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_model(preset: Union[str, LlamaPreset], variant: str = "sl", sl_config: Optional[SLConfig] = None,
                vocab_size: Optional[int] = None, seq_length: Optional[int] = None, sequence_parallel: bool = False,
                params_dtype: torch.dtype = torch.float32, seed: int = 0, config_overrides: Optional[dict] = None,
                recompute: str = "none"):
    """The GPTModel for ``preset`` (name or LlamaPreset).

    Args:
        variant: "sl", "lowrank" (SL layers with density 0) or "dense" (megatron's linears).
        sl_config: SL settings; default: the preset's rank/density/alpha with ``seed``.
        vocab_size, seq_length: override the preset's (e.g. the tokenizer's vocabulary).
        sequence_parallel: megatron sequence parallelism (needs TP > 1).
        params_dtype: parameter dtype (float32, bfloat16, float16).
        seed: seeds torch / megatron's tracker (dense init) and the default sl_config.
        config_overrides: extra TransformerConfig fields (they win over ``recompute``'s).
        recompute: "none", "selective" (megatron recomputes core attention) or "full" (every
            transformer layer is checkpointed, one layer per recompute unit); see ``RECOMPUTE_FIELDS``.
    """
    p = get_preset(preset)
    if recompute not in RECOMPUTE_FIELDS:
        raise ValueError(f"recompute={recompute!r} is not one of {list(RECOMPUTE_FIELDS)}")
    if sl_config is None:
        sl_config = default_sl_config(p, seed)
    variant_sl_config(sl_config, variant)  # validates variant and sl_config
    vocab = p.vocab_size if vocab_size is None else vocab_size
    seq = p.seq_length if seq_length is None else seq_length
    for name, v in (("vocab_size", vocab), ("seq_length", seq)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"params_dtype={params_dtype!r} must be torch.float32, bfloat16, float16 or float64")
    count_parameters(p, variant, sl_config, vocab)  # validates every SL matrix shape before building
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_model needs torch.distributed initialised (init_process_group) and "
                           "megatron_sl.parallel.initialize_model_parallel(...)")
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model needs megatron_sl.parallel.initialize_model_parallel(...) first")
    tp = ps.get_tensor_model_parallel_world_size()
    check_parallel_shape(p, tp, vocab, seq, sequence_parallel)

    from megatron.core.models.gpt import GPTModel

    from megatron_sl.parallel.cpu_shims import seed_model_parallel
    from megatron_sl.parallel.naming import name_sl_layers
    from megatron_sl.parallel.spec import get_gpt_decoder_block_sl_spec

    seed_model_parallel(seed)  # (applies the CPU shims too, should parallel state have been set up by hand)
    config = transformer_config(p, tp, sequence_parallel, params_dtype,
                                **{**RECOMPUTE_FIELDS[recompute], **(config_overrides or {})})
    spec = get_gpt_decoder_block_sl_spec(config, sl_config, variant)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq,
                     position_embedding_type="rope", rotary_base=int(p.rope_base),
                     share_embeddings_and_output_weights=False, parallel_output=True)
    name_sl_layers(model)  # SL supports and init are seeded by module path, so they come after the build
    model.sl_preset, model.sl_variant = p, variant
    model.sl_config = variant_sl_config(sl_config, variant)
    return model
