"""megatron-sl: SLTrain (sparse + low-rank) weights for megatron-core LLaMA pretraining.

Layering, each layer importing only from the ones before it:
``core`` (pure torch) <- ``kernels`` <- ``parallel`` <- ``model`` <- ``training`` <- ``cli``;
``corpus`` (the demo corpus) builds on ``training.data`` and serves ``cli``. ``constants`` (names
shared across layers), ``resources`` (the shipped configs and DeepSpeed templates) and ``lazy``
(lazy package exports) sit below all.
"""

__version__ = "0.1.0"
