"""megatron_sl.model: LLaMA presets, their parameter counts, and GPTModel construction.

``presets`` (shapes + default SL settings), ``param_count`` (analytical counts) and ``build``
(``build_model`` -> megatron GPTModel with SL linears), ``compile`` (``compile_model``: torch.compile
as one graph). ``build_model`` is resolved lazily so that
presets and counts (e.g. ``megatron-sl presets``) do not import megatron-core.
"""

from .param_count import ParamCount, count_parameters, default_sl_config, slot_matrices
from .presets import PRESETS, LlamaPreset, get_preset

__all__ = ["PRESETS", "LlamaPreset", "get_preset", "ParamCount", "count_parameters", "default_sl_config",
           "slot_matrices", "build_model", "compile_model", "apply_cpu_shims", "seed_model_parallel"]


def __getattr__(name):
    if name == "build_model":
        from .build import build_model
        return build_model
    if name == "compile_model":
        from .compile import compile_model
        return compile_model
    if name in ("apply_cpu_shims", "seed_model_parallel"):
        from megatron_sl.parallel import cpu_shims
        return getattr(cpu_shims, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
