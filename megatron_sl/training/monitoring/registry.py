"""The run's metrics registry: fed once per step by the trainer, fanned out to every sink.

Every rank calls ``step()`` once per optimizer step (it is a collective: one all-gather of a few
numbers per rank); rank 0 turns the gathered values into the global figures and writes them to
``metrics.jsonl``, TensorBoard, Weights & Biases and Prometheus, as switched in ``metrics:`` of
the config. The other trainer-facing calls (``eval``, ``checkpointing``, ``step_skipped``,
``close``) only record on rank 0 and may be called on every rank.

Step-time breakdown: the trainer marks phase boundaries inside a step with ``lap(phase)`` after
``step_begin()`` (phases ``data``, ``forward_backward``, ``optimizer``); ``checkpoint`` is the
save time since the previous step record. On CUDA each lap synchronises the device, so a phase
holds its kernels' time rather than their launch time.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from .flops import peak_flops_per_device, step_flops
from .sinks import PrometheusSink, TensorBoardSink, WandbSink, slurm_job_id, wandb_available

PHASES = ("data", "forward_backward", "optimizer", "checkpoint")
# Per-rank values gathered every step (in this order).
_GATHERED = ("tokens_per_s", "memory_bytes", "step_time_s", "opt_state_bytes")


class StepTimer:
    """Accumulates wall time per phase between ``begin()`` and ``take()``."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.phases = dict.fromkeys(PHASES, 0.0)
        self._t = time.perf_counter()

    def begin(self) -> None:
        self._sync()
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.phases[phase] += now - self._t
        self._t = now

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] += seconds

    def take(self) -> Dict[str, float]:
        out, self.phases = self.phases, dict.fromkeys(PHASES, 0.0)
        return out

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def rank_memory(device: str) -> tuple:
    """(bytes, kind) of this rank: CUDA max allocated on GPUs, peak RSS on CPU."""
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "rss_peak"  # Linux: KiB


def dir_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def run_labels(cfg) -> Dict[str, str]:
    m = cfg.metrics
    run = m.run_name or Path(cfg.run.output_dir).resolve().name
    return {"run": run, "job_id": m.job_id or slurm_job_id()}


class _Checkpoint:
    path: Optional[str] = None


class MetricsRegistry:
    """One per rank and run (see the module docstring). ``metrics_log`` is the run's ``MetricsLog``
    (its file is open on rank 0 only); ``state_bytes`` returns this rank's (optimizer-state bytes,
    elements); ``num_params`` is the model's parameter count (all TP ranks)."""

    def __init__(self, cfg, plan, *, run_dir: Path, device: str, tdev: torch.device, metrics_log,
                 state_bytes: Callable[[], tuple], num_params: int):
        from ...model.param_count import count_parameters

        self.cfg, self.plan, self.tdev, self.device = cfg, plan, tdev, device
        self.run_dir = Path(run_dir)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.rank0 = self.rank == 0
        self.log = metrics_log
        self.state_bytes = state_bytes
        self.timer = StepTimer(device == "cuda")
        self.rank_tokens_per_step = plan.micro_batch_size * plan.grad_accum * plan.seq_length
        self.flops = step_flops(plan.preset, plan.sl_config, plan.micro_batch_size, plan.global_batch_size,
                                plan.vocab_size, device)
        self.labels = {**run_labels(cfg), "tp": str(plan.tp), "dp": str(plan.dp)}
        self.memory_kind = rank_memory(device)[1]
        self.nonfinite_steps = 0
        self.skipped: Dict[str, int] = {}
        self._ckpt_pending_s = 0.0
        self.prom = self.tb = self.wandb = None
        if not self.rank0:
            return
        m = cfg.metrics
        self.peak, self.peak_source = peak_flops_per_device(m.peak_tflops, tdev, cfg.train.precision)
        split = count_parameters(plan.preset, cfg.model.variant, plan.sl_config, vocab_size=plan.vocab_size)
        bytes_per = 2 if (cfg.train.precision == "bf16" and plan.use_deepspeed) else 4
        self.param_bytes = num_params * bytes_per + split.index_bytes
        if m.prometheus_port or m.prometheus_textfile:
            textfile = m.prometheus_textfile.format(**self.labels) if m.prometheus_textfile else None
            self.prom = PrometheusSink(self.labels, m.prometheus_port, m.prometheus_addr, textfile)
            self._prom_static(cfg, plan, split)
        if m.tensorboard:
            self.tb = TensorBoardSink(self.run_dir / "tensorboard", cfg.to_yaml())
        if m.wandb or (m.wandb is None and wandb_available()):
            self.wandb = WandbSink(self.run_dir, m.wandb_project, m.wandb_mode, self.labels["run"], cfg.to_dict(),
                                   self.labels["job_id"])
        self.log.write("run", **self.labels, world_size=plan.world_size, variant=cfg.model.variant,
                       preset=cfg.model.preset, params=num_params, params_split=split.as_dict(),
                       parameter_bytes=self.param_bytes, flops_per_step=self.flops["sl"],
                       dense_equivalent_flops_per_step=self.flops["dense_equivalent"],
                       peak_flops_per_device=self.peak, peak_flops_source=self.peak_source,
                       memory_kind=self.memory_kind, tokens_per_step=plan.tokens_per_step,
                       vocab_size=plan.vocab_size, time=time.time())

    def _prom_static(self, cfg, plan, split) -> None:
        p = self.prom
        zero = "none" if cfg.optim.per_layer else str(cfg.deepspeed.zero_stage)
        p.set("msl_run_info", 1, variant=cfg.model.variant, preset=cfg.model.preset, world_size=plan.world_size,
              zero_stage=zero, optimizer=cfg.optim.name)
        now = time.time()
        p.set("msl_run_start_timestamp_seconds", now)
        p.set("msl_last_step_timestamp_seconds", now)  # a run that hangs before its first step is stalled too
        p.set("msl_run_finished", 0)
        for part, n in (("total", split.total), ("low_rank", split.low_rank), ("sparse", split.sparse),
                        ("dense", split.dense)):
            p.set("msl_parameters", n, part=part)
        p.set("msl_parameter_bytes", self.param_bytes)
        for basis, f in self.flops.items():
            p.set("msl_model_flops_per_step", f, basis=basis)
        p.set("msl_peak_flops_per_device", self.peak, source=self.peak_source)
        for name in ("msl_train_steps", "msl_nonfinite_loss_steps", "msl_checkpoints", "msl_checkpoint_failures"):
            p.touch(name)
        p.touch("msl_skipped_steps", reason="nonfinite_loss")
        p.flush()

    # -- trainer-facing ---------------------------------------------------------------------
    def step_begin(self) -> None:
        self.timer.begin()

    def lap(self, phase: str) -> None:
        self.timer.lap(phase)

    def step_skipped(self, reason: str) -> None:
        """Count one step whose update was skipped (e.g. reason="nonfinite_loss" or "loss_spike").

        The single hook for step skipping: call it once per skipped step, in addition to the
        ``step()`` call of that step (which still reports its loss and counts a non-finite one)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.prom is not None:
            self.prom.inc("msl_skipped_steps", reason=reason)

    def step(self, step: int, loss: float, lr: float, grad_norm: Optional[float], step_time_s: float,
             write_record: bool = True, extra: Optional[dict] = None) -> dict:
        """Record optimizer step ``step`` (collective: every rank calls it once per step); ``extra``
        fields go into its JSONL record."""
        phases = self.timer.take()
        phases["checkpoint"], self._ckpt_pending_s = self._ckpt_pending_s, 0.0
        mem, _ = rank_memory(self.device)
        local = torch.tensor([self.rank_tokens_per_step / step_time_s, mem, step_time_s,
                              float(self.state_bytes()[0])], dtype=torch.float64, device=self.tdev)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        if not math.isfinite(loss):
            self.nonfinite_steps += 1
        if not self.rank0:
            return {}
        g = torch.stack(parts).cpu().tolist()
        rank_tok = [r[0] for r in g]
        rank_mem = [r[1] for r in g]
        rank_dt = [r[2] for r in g]
        opt_bytes = sum(r[3] for r in g)
        tok_s = self.plan.tokens_per_step / step_time_s
        mfu = self.flops["sl"] / (step_time_s * self.world * self.peak)
        mfu_dense = self.flops["dense_equivalent"] / (step_time_s * self.world * self.peak)
        now = time.time()
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
               "consumed_samples": step * self.plan.global_batch_size, "step_time_s": step_time_s,
               **{f"{k}_s": v for k, v in phases.items()}, "mfu": mfu, "mfu_dense_equivalent": mfu_dense,
               "rank_tokens_per_s": rank_tok, "rank_step_time_s": rank_dt, "rank_memory_bytes": rank_mem,
               "memory_kind": self.memory_kind, "opt_state_bytes": opt_bytes,
               "nonfinite_loss_steps": self.nonfinite_steps, "skipped_steps": sum(self.skipped.values()),
               "time": now, **(extra or {})}
        if write_record:
            self.log.write("train", **rec)
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "throughput/tokens_per_s": tok_s, "throughput/mfu_sl": mfu,
                   "throughput/mfu_dense_equivalent": mfu_dense, "time/step_s": step_time_s,
                   **{f"time/{k}_s": v for k, v in phases.items()},
                   "memory/opt_state_bytes": opt_bytes, "health/nonfinite_loss_steps": self.nonfinite_steps,
                   "health/skipped_steps": sum(self.skipped.values())}
        for r in range(self.world):
            scalars[f"memory/rank{r}_bytes"] = rank_mem[r]
            scalars[f"throughput/rank{r}_tokens_per_s"] = rank_tok[r]
        self._to_loggers(scalars, step)
        if self.prom is not None:
            p = self.prom
            p.set("msl_train_step", step)
            p.inc("msl_train_steps")
            p.set("msl_consumed_tokens", step * self.plan.tokens_per_step)
            p.set("msl_train_loss", loss)
            p.set("msl_learning_rate", lr)
            p.set("msl_grad_norm", grad_norm if grad_norm is not None else float("nan"))
            p.set("msl_tokens_per_second", tok_s)
            p.set("msl_step_time_seconds", step_time_s)
            for k, v in phases.items():
                if k != "checkpoint":  # the checkpoint phase gauge holds the last save's time
                    p.set("msl_step_phase_seconds", v, phase=k)
            p.set("msl_mfu_ratio", mfu, basis="sl")
            p.set("msl_mfu_ratio", mfu_dense, basis="dense_equivalent")
            for r in range(self.world):
                p.set("msl_rank_tokens_per_second", rank_tok[r], rank=r)
                p.set("msl_rank_step_time_seconds", rank_dt[r], rank=r)
                p.set("msl_rank_memory_bytes", rank_mem[r], rank=r, kind=self.memory_kind)
            p.set("msl_optimizer_state_bytes", opt_bytes)
            if not math.isfinite(loss):
                p.inc("msl_nonfinite_loss_steps")
            p.set("msl_last_step_timestamp_seconds", now)
            p.flush()
        return rec

    def eval(self, res: dict) -> None:
        """Record a validation result ``{step, val_loss, val_ppl, val_tokens}`` (rank 0 writes)."""
        self.log.write("eval", **res)
        if not self.rank0:
            return
        self._to_loggers({"eval/val_loss": res["val_loss"], "eval/val_ppl": res["val_ppl"]}, res["step"])
        if self.prom is not None:
            self.prom.set("msl_validation_loss", res["val_loss"])
            self.prom.set("msl_validation_perplexity", res["val_ppl"])
            self.prom.flush()

    @contextlib.contextmanager
    def checkpointing(self, step: int):
        """Time a checkpoint save inside the block (set ``.path`` on the yielded object); an error
        is counted as a checkpoint failure and re-raised."""
        ck, t0 = _Checkpoint(), time.perf_counter()
        try:
            yield ck
        except BaseException:
            self._checkpoint(step, time.perf_counter() - t0, None)
            raise
        self._checkpoint(step, time.perf_counter() - t0, ck.path)

    def _checkpoint(self, step: int, seconds: float, path: Optional[str]) -> None:
        self._ckpt_pending_s += seconds
        if not self.rank0:
            return
        size = dir_bytes(path) if path else None
        self.log.write("checkpoint", step=step, duration_s=seconds, size_bytes=size, path=path and str(path),
                       ok=path is not None, time=time.time())
        if path:
            self._to_loggers({"checkpoint/duration_s": seconds, "checkpoint/size_bytes": size}, step)
        if self.prom is not None:
            p = self.prom
            if path is None:
                p.inc("msl_checkpoint_failures")
            else:
                p.inc("msl_checkpoints")
                p.set("msl_checkpoint_duration_seconds", seconds)
                p.set("msl_step_phase_seconds", seconds, phase="checkpoint")
                p.set("msl_checkpoint_size_bytes", size)
                p.set("msl_last_checkpoint_timestamp_seconds", time.time())
            p.flush()

    def close(self) -> None:
        """End of the run (done, or preempted after its checkpoint): flush and close every sink;
        the Prometheus endpoint keeps serving ``metrics.prometheus_linger_s`` with
        ``msl_run_finished 1`` so a last scrape sees that the run ended on purpose."""
        if not self.rank0:
            return
        for sink in (self.tb, self.wandb):
            if sink is not None:
                sink.close()
        self.tb = self.wandb = None
        if self.prom is not None:
            self.prom.set("msl_run_finished", 1)
            self.prom.flush()
            if self.prom.server is not None and self.cfg.metrics.prometheus_linger_s > 0:
                time.sleep(self.cfg.metrics.prometheus_linger_s)
            self.prom.close()
            self.prom = None

    def _to_loggers(self, scalars: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        for sink in (self.tb, self.wandb):
            if sink is not None:
                sink.log(scalars, step)
