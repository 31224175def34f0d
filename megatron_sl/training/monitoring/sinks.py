"""Where rank 0's metrics go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, Prometheus.

Each sink takes flat ``{name: value}`` scalars (``log``) at a step and is closed once. Names are
the registry's (``registry.SCALARS``); each sink maps them to its own convention.

Prometheus: metric names start with ``msl_``; every series carries the labels ``run``, ``job_id``
(the Slurm job id; not ``job``, which Prometheus reserves for the scrape job's name), ``tp`` and
``dp``, and per-rank series also ``rank``. Counters are exposed with the ``_total`` suffix; the
``_created`` companions are turned off. The same registry is served over HTTP on rank 0
(``metrics.prometheus_port``) and/or written atomically to a textfile for node_exporter
(``metrics.prometheus_textfile``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional

# Prometheus metrics: (name, kind, help, extra label names). Gauges hold the last step's value.
PROM_METRICS = (
    ("msl_run_info", "gauge", "Constant 1 with the run's settings as labels", ("variant", "preset", "world_size",
                                                                               "zero_stage", "optimizer")),
    ("msl_run_start_timestamp_seconds", "gauge", "Unix time the run (this process) started", ()),
    ("msl_run_finished", "gauge", "1 once the run ended cleanly (done or preempted with a checkpoint)", ()),
    ("msl_train_step", "gauge", "Optimizer steps done (1-based count)", ()),
    ("msl_train_steps", "counter", "Optimizer steps done by this process", ()),
    ("msl_consumed_tokens", "gauge", "Training tokens consumed since step 0", ()),
    ("msl_last_step_timestamp_seconds", "gauge", "Unix time the last step ended (heartbeat)", ()),
    ("msl_train_loss", "gauge", "Training loss of the last step (global-batch mean)", ()),
    ("msl_validation_loss", "gauge", "Validation loss of the last evaluation", ()),
    ("msl_validation_perplexity", "gauge", "Validation perplexity of the last evaluation", ()),
    ("msl_learning_rate", "gauge", "Learning rate of the last update", ()),
    ("msl_grad_norm", "gauge", "Gradient norm before clipping of the last update", ()),
    ("msl_tokens_per_second", "gauge", "Global training throughput of the last step", ()),
    ("msl_rank_tokens_per_second", "gauge", "Tokens per second processed by one rank in the last step", ("rank",)),
    ("msl_step_time_seconds", "gauge", "Wall time of the last step (rank 0)", ()),
    ("msl_step_phase_seconds", "gauge", "Last step's time per phase (rank 0; checkpoint: the last save)", ("phase",)),
    ("msl_rank_step_time_seconds", "gauge", "Wall time of the last step on one rank", ("rank",)),
    ("msl_mfu_ratio", "gauge", "Model FLOPs utilization of the last step (basis: sl = executed SL FLOPs, "
                               "dense_equivalent = FLOPs of the same-shape dense model)", ("basis",)),
    ("msl_model_flops_per_step", "gauge", "Model FLOPs of one optimizer step", ("basis",)),
    ("msl_peak_flops_per_device", "gauge", "Peak FLOP/s of one device that MFU is relative to", ("source",)),
    ("msl_rank_memory_bytes", "gauge", "Memory of one rank (kind: cuda_max_allocated or rss_peak)", ("rank", "kind")),
    ("msl_parameters", "gauge", "Model parameters by part (total, low_rank, sparse, dense)", ("part",)),
    ("msl_parameter_bytes", "gauge", "Bytes of the model's parameters (+ SL support indices)", ()),
    ("msl_optimizer_state_bytes", "gauge", "Bytes of optimizer state summed over all ranks", ()),
    ("msl_skipped_steps", "counter", "Steps whose update was skipped, by reason", ("reason",)),
    ("msl_nonfinite_loss_steps", "counter", "Steps whose training loss was NaN or infinite", ()),
    ("msl_checkpoints", "counter", "Checkpoints committed by this process", ()),
    ("msl_checkpoint_failures", "counter", "Checkpoint saves that raised an error", ()),
    ("msl_checkpoint_duration_seconds", "gauge", "Wall time of the last checkpoint save", ()),
    ("msl_checkpoint_size_bytes", "gauge", "Size on disk of the last checkpoint", ()),
    ("msl_last_checkpoint_timestamp_seconds", "gauge", "Unix time the last checkpoint was committed", ()),
)


class PrometheusSink:
    """A prometheus-client registry with the ``msl_*`` metrics, served and/or written to a textfile."""

    def __init__(self, labels: Dict[str, str], port: int = 0, addr: str = "0.0.0.0",
                 textfile: Optional[str] = None):
        import prometheus_client as pc

        pc.disable_created_metrics()  # no msl_*_created series: they double the series count for nothing
        self.labels = dict(labels)
        self.registry = pc.CollectorRegistry()
        self.metrics = {}
        for name, kind, help_, extra in PROM_METRICS:
            cls = pc.Counter if kind == "counter" else pc.Gauge
            self.metrics[name] = cls(name, help_, [*self.labels, *extra], registry=self.registry)
        self.textfile = textfile
        self._write_textfile = pc.write_to_textfile
        self.server = self.thread = None
        if port:
            try:
                self.server, self.thread = pc.start_http_server(port, addr=addr, registry=self.registry)
            except OSError as e:  # e.g. another run on this node holds the port: train on, unmonitored
                print(f"[metrics] warning: metrics.prometheus_port={port}: cannot serve /metrics on {addr}:{port} "
                      f"({e.strerror or e}); the Prometheus endpoint is off for this run", flush=True)

    def _child(self, name: str, **extra):
        return self.metrics[name].labels(**self.labels, **{k: str(v) for k, v in extra.items()})

    def set(self, name: str, value, **extra) -> None:
        if value is None:
            return
        self._child(name, **extra).set(float(value))

    def inc(self, name: str, amount: float = 1.0, **extra) -> None:
        self._child(name, **extra).inc(amount)

    def touch(self, name: str, **extra) -> None:
        """Create a counter's series at 0 so rate()/increase() have data before the first event."""
        self._child(name, **extra)

    def flush(self) -> None:
        if self.textfile:
            Path(self.textfile).parent.mkdir(parents=True, exist_ok=True)
            self._write_textfile(self.textfile, self.registry)  # temp file + rename inside

    def close(self) -> None:
        self.flush()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class TensorBoardSink:
    """Scalars in TensorBoard event files (torch's SummaryWriter) under ``log_dir``."""

    def __init__(self, log_dir: Path, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10)
        self.writer.add_text("config", "```\n" + config_yaml + "\n```", 0)

    def log(self, scalars: Dict[str, float], step: int) -> None:
        for tag, v in scalars.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """Weights & Biases (offline by default): only constructed when the package is importable."""

    def __init__(self, run_dir: Path, project: str, mode: str, name: str, config: dict, job_id: str):
        import wandb

        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), mode=mode, config=config,
                              id=f"{name}-{job_id}".replace("/", "_"), resume="allow")

    def log(self, scalars: Dict[str, float], step: int) -> None:
        self.run.log({k: v for k, v in scalars.items() if v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def slurm_job_id(environ=os.environ) -> str:
    return environ.get("SLURM_JOB_ID") or "local"
