"""Run metrics for people and cluster ops: the per-step registry (``registry``), the FLOP model
behind MFU (``flops``), the sinks (``sinks``: TensorBoard, Weights & Biases, Prometheus HTTP and
textfile) and the offline run report (``report``: PNG plots + HTML summary from run directories).
``metrics.jsonl`` itself is written through ``training.metrics.MetricsLog``.

Importing this package starts nothing; sinks are created by ``MetricsRegistry`` on rank 0.
"""

from .registry import PHASES, MetricsRegistry, StepTimer

__all__ = ["MetricsRegistry", "StepTimer", "PHASES"]
