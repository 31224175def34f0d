"""compile_model: ``torch.compile`` of a built GPTModel as one graph (``fullgraph=True``), in place.

The module's ``forward`` is replaced by its compiled version, in place: parameter names, state dicts
and checkpoints stay those of the eager model, any wrapper (DeepSpeed's engine) calls the compiled
forward, and the hooks such a wrapper registers on the module (DeepSpeed times each forward in a
pre-hook) run outside the graph. Compilation happens at the first call (again for a new input shape,
or when switching between training and evaluation).

Both execution paths of the SL linear trace without graph breaks: the sparse primitives are
``torch.library`` custom ops with fake implementations (``megatron_sl.core.ops``). megatron-core's
own layers call ``warnings.warn`` in forward (e.g. a deprecation notice when ``tp_group`` is None),
which dynamo can only keep in one graph if it may move the call out of it, so ``warnings.warn`` is
added to ``torch._dynamo.config.reorderable_logging_functions`` here (when compiling, not on
import). On CPU without CUDA, megatron's RNG-tracker ``fork`` is a no-op inside a compiled graph
(``parallel.cpu_shims``): the models built here have no dropout.
"""

from __future__ import annotations

import warnings

import torch

BACKENDS = ("inductor", "aot_eager", "eager")


def compile_model(model: torch.nn.Module, backend: str = "inductor", **kwargs) -> torch.nn.Module:
    """``model.forward = torch.compile(model.forward, fullgraph=True, backend=backend, **kwargs)``;
    returns ``model``.
    ``backend``: "inductor" (generated C++/Triton code; needs a C++ compiler on CPU), "aot_eager"
    (the traced forward and backward graphs run op by op) or "eager"."""
    if backend not in BACKENDS:
        raise ValueError(f"compile backend={backend!r} is not one of {BACKENDS}")
    torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)
    model.forward = torch.compile(model.forward, fullgraph=True, backend=backend, **kwargs)
    return model
