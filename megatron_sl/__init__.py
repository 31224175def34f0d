"""megatron-sl: SLTrain (sparse + low-rank) weights for megatron-core LLaMA pretraining.

Layering, each layer importing only from the ones before it:
``core`` (pure torch) <- ``kernels`` <- ``parallel`` <- ``model`` <- ``training`` <- ``cli``.
"""

__version__ = "0.1.0"
