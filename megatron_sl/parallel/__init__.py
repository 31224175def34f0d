"""megatron_sl.parallel: SL linears inside megatron-core with tensor (and sequence) parallelism.

Owns everything that touches megatron-core's layers: the TP-sharded SL linears for the four
linear slots (``layers``, built from per-matrix ``shard``s laid out by ``layout``, and named by module path
after the model is built: ``naming.name_sl_layers``), the sequence-parallel RMSNorm (``norm``), the LLaMA layer specs (``spec``), the model
variants (``variants``), the once-per-step TP summation of partial gradients of replicated
parameters (``grad_sync``: ``finalize_sl_grads``) and the CPU shims megatron needs without CUDA
(``cpu_shims``, applied by ``state.initialize_model_parallel``, the one function that sets up
megatron's parallel state). Builds on ``megatron_sl.core``.

Exports are resolved lazily, so importing a megatron-free submodule (``layout``, ``variants``)
does not pay for importing megatron-core.
"""

from megatron_sl.lazy import lazy_exports

_EXPORTS = {
    "SLColumnParallelLinear": "layers", "SLRowParallelLinear": "layers", "SLRMSNorm": "norm", "SLShard": "shard",
    "get_gpt_layer_sl_spec": "spec", "get_gpt_decoder_block_sl_spec": "spec",
    "VARIANTS": "variants", "variant_sl_config": "variants",
    "apply_cpu_shims": "cpu_shims", "seed_model_parallel": "cpu_shims",
    "finalize_sl_grads": "grad_sync", "mark_partial_tp_grad": "grad_sync", "is_partial_tp_grad": "grad_sync",
    "partial_tp_grad_params": "grad_sync", "name_sl_layers": "naming",
    "initialize_model_parallel": "state",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
