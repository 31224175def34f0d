"""Stable names for SL layers built by megatron-core, so supports and init are TP-independent.

Each SL matrix is seeded by a name such as ``decoder.layers.3.self_attention.linear_qkv.k``. Megatron
does not pass the layer number to a linear's constructor, so we read it from the TransformerLayer
being built: ``TransformerLayer.__init__`` sets ``self.layer_number`` (1-based, global: it already
includes the pipeline offset) before it builds attention and MLP, and the linear is constructed
inside that call. We walk up the Python call stack to the nearest frame whose ``self`` is a
megatron ``BaseTransformerLayer`` with a ``layer_number``. The result is identical on every rank and
for every TP size, and equals the module's FQN inside ``GPTModel`` when pipeline parallelism is 1.
"""

from __future__ import annotations

import sys
from typing import Optional

# megatron slot (tp_comm_buffer_name) -> (path inside a TransformerLayer, part names)
SLOT_PATHS = {
    "qkv": "self_attention.linear_qkv",
    "proj": "self_attention.linear_proj",
    "fc1": "mlp.linear_fc1",
    "fc2": "mlp.linear_fc2",
}


def enclosing_layer_number() -> Optional[int]:
    """layer_number of the megatron TransformerLayer under construction up the stack, or None."""
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, BaseTransformerLayer):
            number = getattr(obj, "layer_number", None)
            if isinstance(number, int):
                return number
        frame = frame.f_back
    return None


def resolve_layer_name(slot: Optional[str], layer_name: Optional[str]) -> str:
    """The explicit ``layer_name`` if given, else ``decoder.layers.{n-1}.<slot path>``."""
    if layer_name is not None:
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError(f"layer_name={layer_name!r} must be a non-empty string")
        return layer_name
    if slot not in SLOT_PATHS:
        raise ValueError(
            f"cannot name an SL layer built for tp_comm_buffer_name={slot!r}: pass layer_name= explicitly "
            f"(known slots: {sorted(SLOT_PATHS)})")
    number = enclosing_layer_number()
    if number is None:
        raise ValueError(
            f"SL layer for slot {slot!r} is not being built inside a megatron TransformerLayer, so its stable "
            "name is unknown: pass layer_name= explicitly")
    return f"decoder.layers.{number - 1}.{SLOT_PATHS[slot]}"
