"""Stable names for SL layers, from their module path once the model is built.

Each SL matrix is seeded by a name such as ``decoder.layers.3.self_attention.linear_qkv.k``: its
support and initial values come from (seed, name), so they must not depend on the TP size, the
rank or the construction order. Megatron does not pass a linear's position to its constructor, so
an SL layer built through the spec (``name_after_build=True``) is constructed without its SL
parameters; ``name_sl_layers(model)`` then walks ``model.named_modules()``, names every such layer
by its module path and builds it (samples its supports and initialises it). ``build_model`` calls
it. The index of the enclosing megatron TransformerLayer in the path is replaced by that layer's
global ``layer_number - 1`` (which includes the pipeline offset), so the names are the same on every
pipeline stage; with pipeline parallelism 1 they equal the module paths inside ``GPTModel``.

A layer built on its own takes ``layer_name=`` (named and built at once); without either it is
refused at construction with a message saying so.
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

# megatron slot (tp_comm_buffer_name) -> the slot's path inside a TransformerLayer (so a layer's name
# is decoder.layers.<i>.<path>; the HF weight mapping reads it)
SLOT_PATHS = {
    "qkv": "self_attention.linear_qkv",
    "proj": "self_attention.linear_proj",
    "fc1": "mlp.linear_fc1",
    "fc2": "mlp.linear_fc2",
}


class NamedAfterBuild:
    """Mixin of SL layers: ``layer_name`` (None until named) and ``assign_name(name)``, which
    names the layer and builds its SL parameters."""

    layer_name: Optional[str] = None

    def assign_name(self, name: str) -> None:  # pragma: no cover - implemented by the layers
        raise NotImplementedError


def check_layer_name(layer_name) -> str:
    if not isinstance(layer_name, str) or not layer_name:
        raise ValueError(f"layer_name={layer_name!r} must be a non-empty string")
    return layer_name


def initial_name(cls_name: str, slot: Optional[str], layer_name: Optional[str], name_after_build: bool) -> Optional[str]:
    """The name to build a layer with now, or None to build it when ``name_sl_layers`` names it."""
    if layer_name is not None:
        return check_layer_name(layer_name)
    if name_after_build:
        return None
    raise ValueError(
        f"{cls_name} (slot {slot!r}) needs a stable name to seed its supports and init: pass layer_name=..., "
        "or build it through megatron_sl.parallel.get_gpt_layer_sl_spec and call "
        "megatron_sl.parallel.name_sl_layers(model) after the model is built (build_model does)")


def unnamed_error(layer) -> RuntimeError:
    return RuntimeError(
        f"{type(layer).__name__} (slot {getattr(layer, 'slot', None)!r}) has not been named yet, so it has no SL "
        "parameters: call megatron_sl.parallel.name_sl_layers(model) on the built model (build_model does)")


def stable_path(path: str, modules: Dict[str, nn.Module]) -> str:
    """``path`` with the index of its enclosing megatron TransformerLayer replaced by that layer's
    global number (``layer_number - 1``)."""
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = modules.get(".".join(parts[:i]))
        number = getattr(owner, "layer_number", None)
        if isinstance(owner, BaseTransformerLayer) and isinstance(number, int):
            parts[i - 1] = str(number - 1)
            break
    return ".".join(parts)


def name_sl_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Name and build every SL layer of ``model`` (the GPTModel itself, not a wrapper) that has no
    name yet; returns every SL layer by name. Idempotent."""
    modules = dict(model.named_modules())
    named = {}
    for path, module in modules.items():
        if isinstance(module, NamedAfterBuild):
            if module.layer_name is None:
                module.assign_name(stable_path(path, modules))
            named[module.layer_name] = module
    return named
