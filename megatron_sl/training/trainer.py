"""The training run of one rank: set up, train, evaluate, checkpoint, summarise.

``train(cfg, plan)`` is the whole run (what ``megatron-sl train`` calls inside each rank):

1. distributed init (torch.distributed, DeepSpeed comm, megatron parallel_state TP x DP, CPU shims);
2. rank 0 prepares the run directory (resolved ``config.yaml``, rendered ``ds_config.json``);
3. tokenizer + megatron GPTDatasets (train / fixed validation set);
4. the GPTModel (SL / low-rank / dense), checked identical across DP ranks;
5. the engine: DeepSpeed ZeRO 0-3 with a client optimizer, or per-layer updates without DeepSpeed;
6. the loop: GA micro-batches per step, validation every ``eval.interval`` steps, metrics
   (``training.monitoring``: JSONL, TensorBoard, W&B, Prometheus) and progress bar on rank 0;
7. final validation, checkpoint (``<run>/checkpoints/step_XXXXXXXX`` + ``latest``), summary.

Checkpoints and preemption (``training.checkpoint``, ``training.preemption``): at start the run
resumes from the newest complete checkpoint in its directory; every ``run.save_interval`` steps, on
SIGUSR2 and at the end it saves; on SIGUSR1/SIGTERM all ranks agree (one all-reduce per step) to
stop after the current step, save, and ``train`` reports ``preempted`` (the CLI exits 75). The
position of a run is just ``step`` (samples are a function of it, see ``batches``); with the
engine's model/optimizer/scheduler state and every rank's RNG states, resume is exact.
It can be called several times in one process (tests): parallel_state is re-initialised per call.

Guards (``training.guards``, ``guard.*``): the run directory is locked first (``training.runlock``;
by rank 0 unless the launching ``megatron-sl train`` holds it), so nothing is written into a
directory another run uses; a bad step (NaN/inf or spiking loss) is skipped without touching the
optimizer, too many in a row raise ``Diverged``; a watchdog ends a hung step.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .batches import collate, eval_sample_start, masked_mean, per_token_loss, train_sample_start
from .checkpoint.manager import CheckpointManager
from .checkpoint.names import step_dirname
from .checkpoint.reshard import Layout
from .consistency import assert_identical_across_dp, count_params, replicated_mismatches
from .config import TrainConfig, dump_config
from .guards import Diverged, StepGuard, Watchdog
from .preemption import PreemptionHandler
from .distributed import init_distributed, resolve_device, retain_freed_memory
from .metrics import MetricsLog, Progress
from .monitoring import MetricsRegistry
from .resume_check import run_config_record
from .runlock import RunLock, RunLockError, held_by_launcher
from .schedule import WarmupCosine
from .config_checks import Plan

RUN_ARTIFACTS = ("metrics.jsonl", "summary.json", "config.yaml", "ds_config.json", "checkpoints", "tensorboard",
                 "wandb", "report")


def _prepare_run_dir(cfg: TrainConfig, ds_config: Optional[dict]) -> Path:
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.run.overwrite:
        for name in RUN_ARTIFACTS:  # only what a previous run of ours wrote
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    dump_config(cfg, out / "config.yaml")
    if ds_config is not None:
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    return out


def _build_model(cfg: TrainConfig, plan: Plan):
    from ..model import build_model

    # DeepSpeed casts fp32 parameters itself and keeps fp32 masters; per-layer bf16 is pure bf16 (the paper's)
    pure_bf16 = cfg.optim.per_layer and cfg.train.precision == "bf16"
    return build_model(plan.preset, variant=cfg.model.variant, sl_config=plan.sl_config,
                       vocab_size=plan.vocab_size, seq_length=plan.seq_length,
                       sequence_parallel=cfg.parallel.sequence_parallel,
                       params_dtype=torch.bfloat16 if pure_bf16 else torch.float32,
                       seed=cfg.train.seed, recompute=cfg.model.recompute)


def _datasets(cfg: TrainConfig, plan: Plan):
    from .data import build_datasets, load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_samples = cfg.train.train_iters * plan.global_batch_size
    valid_samples = max(1, cfg.eval.iters) * plan.micro_batch_size * plan.dp
    return build_datasets(cfg.data.prefix, tokenizer, plan.seq_length, cfg.train.seed, cfg.data.split,
                          train_samples, valid_samples, cfg.data.cache_dir)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Trainer:
    def __init__(self, cfg: TrainConfig, plan: Plan):
        from megatron.core import parallel_state as ps

        self.cfg, self.plan = cfg, plan
        self.device = resolve_device(cfg.launch.device)
        if self.device == "cpu" and cfg.launch.cpu_retain_freed_memory:
            retain_freed_memory()
        self.env = init_distributed(self.device, plan.tp, cfg.train.seed, use_deepspeed=plan.use_deepspeed)
        self.ps = ps
        self.rank0 = dist.get_rank() == 0
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tdev = torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")
        self.schedule = WarmupCosine(cfg.optim.lr, plan.warmup_iters, cfg.train.train_iters, cfg.optim.min_lr_ratio)

        ds_config = None
        if plan.use_deepspeed:
            from .ds_config import render_ds_config

            ds_config = render_ds_config(cfg, plan)
        self.run_dir = Path(cfg.run.output_dir)
        self.lock = self._lock_run_dir()
        if self.rank0:
            _prepare_run_dir(cfg, ds_config)
            for change in plan.config_changes:
                print(f"[resume] config change accepted: {change}", flush=True)
        dist.barrier()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.rank0 and cfg.metrics.jsonl else None)
        self.train_ds, self.valid_ds = _datasets(cfg, plan)

        torch.manual_seed(cfg.train.seed)
        model = _build_model(cfg, plan)
        if cfg.model.init_from is not None:
            from ..model.hf import load_weights
            from .export import read_sl

            load_weights(model, read_sl(cfg.model.init_from))
        model = model.to(self.tdev)
        if cfg.train.compile != "off":
            from ..model.compile import compile_model

            compile_model(model, backend=cfg.train.compile)
        assert_identical_across_dp(model, self.dp_group, self.tdev)
        self.num_params = count_params(model.parameters(), self.tp_group, self.tdev)
        if cfg.parallel.sequence_parallel:
            from .grads import mark_sequence_parallel_params

            mark_sequence_parallel_params(model, self.tp_group)
        if cfg.optim.per_layer:
            from .per_layer import PerLayerEngine

            self.engine = PerLayerEngine(model, cfg, plan, self.schedule, self.device)
        else:
            from .ds_engine import DeepSpeedTrainEngine

            self.engine = DeepSpeedTrainEngine(model, cfg, plan, self.schedule, self.device)
        self.monitor = MetricsRegistry(cfg, plan, run_dir=self.run_dir, device=self.device, tdev=self.tdev,
                                       metrics_log=self.metrics, state_bytes=self.engine.state_bytes,
                                       num_params=self.num_params)
        self.guard = StepGuard.from_config(cfg.guard)
        self.guard.guard_optimizer(self.engine.optimizers.values() if cfg.optim.per_layer
                                   else [self.engine.client_optimizer])
        self.watchdog = Watchdog(cfg.guard.step_timeout_s)
        self.bad_reason: Optional[str] = None
        self.step = 0
        self.last_saved_step = None
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.run.keep_last)
        self.resumed_from = None
        self.layout = Layout.of(cfg, plan.world_size)
        if cfg.run.resume:
            client = self.ckpt.resume(self.engine, model=self.engine.module, reshard=self._reshard)
            if client is not None:
                self.step = self.last_saved_step = int(client["step"])
                self.resumed_from = self.step
                self.log(f"[ckpt] resumed from {self.ckpt.root / step_dirname(self.step)} at step {self.step}")

    def _reshard(self, info, client: dict) -> bool:
        """Load ``info`` through the layout-free form when it was written at another layout (or is
        layout-free); False (load natively) when the layout is this run's."""
        from .checkpoint.reshard import apply, is_universal, read_engine_state, saved_layout
        from .config_checks import vocab_change_note
        from ..parallel.variants import variant_sl_config

        source = saved_layout(client, info.manifest.get("world_size"))
        if not is_universal(info.path) and source == self.layout and self._saved_vocab(client) == self.plan.vocab_size:
            return False
        self.log(f"[ckpt] resharding {info.path.name} from {source or 'the layout-free form'} to {self.layout} "
                 f"(weights, fp32 masters, AdamW moments, step and schedule carried; per-rank RNG streams restart)")
        state = read_engine_state(info.path, source, self.plan.preset,
                                  variant_sl_config(self.plan.sl_config, self.cfg.model.variant))
        rows = state.tensors["fp32"].vocab_size
        if rows != self.plan.vocab_size:
            self.log(f"[ckpt] {vocab_change_note(rows, self.plan.vocab_size)}")
        apply(state, self.engine, self.engine.module, self.plan.vocab_size)
        return True

    def _saved_vocab(self, client: dict) -> int:
        """The padded vocabulary the checkpoint's run was built with (its divisor and TP size, this
        run's unpadded vocabulary: the tokenizer and ``model.vocab_size`` may not change)."""
        from .config_checks import padded_vocab

        old = client.get("config") or {}
        try:
            divisor = int(old["model"]["make_vocab_size_divisible_by"])
            tp = int(old["parallel"]["tensor_parallel"])
        except (KeyError, TypeError, ValueError):
            return self.plan.vocab_size
        return padded_vocab(self.cfg.model.vocab_size or self.plan.tokenizer_vocab_size, divisor, tp)

    # -- helpers ----------------------------------------------------------------------------
    def _lock_run_dir(self) -> Optional[RunLock]:
        """Rank 0 locks the run directory unless the launching process holds the lock; every rank
        raises ``RunLockError`` if it is taken."""
        lock, error = None, None
        if self.rank0 and not held_by_launcher(self.run_dir):
            try:
                lock = RunLock(self.run_dir).acquire()
            except RunLockError as e:
                error = str(e)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RunLockError(box[0])
        return lock

    def log(self, msg: str) -> None:
        if self.rank0:
            print(msg, flush=True)

    def _dp_mean(self, values: torch.Tensor) -> torch.Tensor:
        if dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(values, group=self.dp_group)
            values /= dist.get_world_size(self.dp_group)
        return values

    @torch.no_grad()
    def evaluate(self) -> dict:
        p = self.plan
        self.engine.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=self.tdev)
        for i in range(self.cfg.eval.iters):
            self.watchdog.beat(f"validating (batch {i}) after step {self.step}")
            batch = collate(self.valid_ds, eval_sample_start(i, p.micro_batch_size, p.dp, self.dp_rank),
                            p.micro_batch_size, self.tdev, p.tokenizer_vocab_size)
            loss = per_token_loss(self.engine, batch)
            mask = batch["loss_mask"].to(torch.float64)
            acc[0] += (loss.double() * mask).sum()
            acc[1] += mask.sum()
        if dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(acc, group=self.dp_group)
        self.engine.train()
        val_loss = float(acc[0] / acc[1].clamp(min=1))
        ppl = math.exp(val_loss) if val_loss < 700 else float("inf")
        return {"step": self.step, "val_loss": val_loss, "val_ppl": ppl, "val_tokens": int(acc[1])}

    def _log_eval(self, tag: str) -> dict:
        res = self.evaluate()
        self.monitor.eval(res)
        self.log(f"[eval] {tag} step {res['step']}: validation loss {res['val_loss']:.4f}, "
                 f"perplexity {res['val_ppl']:.2f} ({res['val_tokens']} tokens)")
        return res

    def train_step(self) -> float:
        """One optimizer step (GA micro-batches); returns the global-batch mean loss."""
        p = self.plan
        losses = torch.zeros(1, dtype=torch.float64, device=self.tdev)
        self.monitor.step_begin()
        for m in range(p.grad_accum):
            start = train_sample_start(self.step, m, p.global_batch_size, p.micro_batch_size, p.dp, self.dp_rank)
            batch = collate(self.train_ds, start, p.micro_batch_size, self.tdev, p.tokenizer_vocab_size)
            self.monitor.lap("data")
            loss = masked_mean(per_token_loss(self.engine, batch), batch["loss_mask"])
            losses += loss.detach().double()
            if m == p.grad_accum - 1:  # judged before the last backward: per-layer engines update inside it
                mean = float(self._dp_mean(losses / p.grad_accum))
                self.bad_reason = self._judge(mean)
            self.engine.backward(loss)
            self.monitor.lap("forward_backward")
            updated = self.engine.step()
            self.monitor.lap("optimizer")
            assert updated == (m == p.grad_accum - 1), "engine and trainer disagree on the accumulation boundary"
        self.step += 1
        return mean

    def _judge(self, mean: float) -> Optional[str]:
        """The guard's verdict on this step's global loss, agreed by every rank (MAX of the flags)."""
        reason = self.guard.judge(mean)
        flag = torch.tensor([int(reason is not None)], dtype=torch.int32, device=self.tdev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and reason is None:  # another rank saw it differently: skip everywhere
            self.guard.skip_update = True
            reason = "bad step on another rank"
        return reason

    # -- the run ----------------------------------------------------------------------------
    def run(self, handler: Optional[PreemptionHandler] = None) -> dict:
        cfg, p = self.cfg, self.plan
        self.log(f"[train] {cfg.model.variant} model from preset {cfg.model.preset!r}: {self.num_params:,} trainable "
                 f"parameters; world {p.world_size} = TP {p.tp} x DP {p.dp}; "
                 f"{'per-layer ' + cfg.optim.name if cfg.optim.per_layer else f'ZeRO-{cfg.deepspeed.zero_stage} ' + cfg.optim.name}; "
                 f"micro {p.micro_batch_size} x GA {p.grad_accum} x DP {p.dp} = {p.global_batch_size} sequences of "
                 f"{p.seq_length} tokens per step; {cfg.train.train_iters} steps")
        fresh = self.resumed_from is None
        initial = self._log_eval("before training") if fresh and cfg.eval.at_start and cfg.eval.iters > 0 else None
        progress = Progress(cfg.train.train_iters, self.step, self.rank0 and cfg.run.progress_bar)
        t_train, losses = 0.0, []
        first_step_s = None
        preempted, ckpt = False, None
        own_handler = handler is None
        handler = PreemptionHandler().install() if own_handler else handler
        self.watchdog.start()
        try:
            while self.step < cfg.train.train_iters:
                self.watchdog.beat(f"training step {self.step + 1}")
                dt, loss = self._timed_step(progress)
                t_train += dt
                first_step_s = dt if first_step_s is None else first_step_s
                losses.append(loss)
                if self.guard.diverged:
                    self._stop_diverged()
                decision = handler.poll()  # collective: every rank stops/saves at the same step
                periodic = cfg.run.save_interval and self.step % cfg.run.save_interval == 0
                if decision.stop or decision.save or periodic:
                    self.watchdog.beat(f"saving the checkpoint of step {self.step}")
                    ckpt = self.save_checkpoint()
                if decision.stop:
                    preempted = True
                    break
            self.watchdog.beat("validating and saving at the end")
        except BaseException:
            self.watchdog.stop()
            if self.lock is not None:
                self.lock.release()
            raise
        finally:
            if own_handler:
                handler.uninstall()
        progress.close()
        if preempted:
            self.log(f"[preempted] stop signal: checkpoint at step {self.step} committed; exiting for requeue")
            self.metrics.write("preempted", step=self.step)
            return self._summary(initial, None, losses, t_train, first_step_s, ckpt, preempted=True)
        final = self._log_eval("after training") if cfg.eval.iters > 0 else None
        ckpt = self.save_checkpoint() if cfg.run.save_at_end else None
        return self._summary(initial, final, losses, t_train, first_step_s, ckpt)

    def _stop_diverged(self) -> None:
        g = self.guard
        good = self.ckpt.last_good() or (self.ckpt.read_latest() if self.last_saved_step is not None else None)
        where = (f"the last good checkpoint is {self.ckpt.root / good} (kept outside run.keep_last)" if good
                 else "no checkpoint was saved before them")
        msg = (f"training diverged: {g.consecutive} consecutive bad steps up to step {self.step} (losses "
               f"{', '.join(f'{x:.4g}' for x in g.bad_losses)}; guard.max_bad_steps={g.max_bad_steps}); the updates "
               f"were skipped; {where}. Lower optim.lr or raise guard.* and resume from it")
        self.metrics.write("diverged", step=self.step, consecutive_bad_steps=g.consecutive,
                           skipped_steps=g.skipped_total, last_good_checkpoint=good)
        raise Diverged(msg)

    def _timed_step(self, progress):
        """One training step with its metrics, progress and periodic validation; (seconds, loss)."""
        cfg, p = self.cfg, self.plan
        t0 = time.perf_counter()
        loss = self.train_step()
        dt = time.perf_counter() - t0
        tok_s = p.tokens_per_step / dt
        bad = self.bad_reason
        if bad is not None:
            self.log(f"[guard] step {self.step} skipped ({bad}); {self.guard.consecutive} bad in a row, "
                     f"{self.guard.skipped_total} skipped in all")
            self.monitor.step_skipped(_skip_label(bad))
        self.monitor.step(self.step, loss, self.engine.lr, self.engine.grad_norm, dt,
                          write_record=(bad is not None or self.step % cfg.run.log_interval == 0
                                        or self.step == cfg.train.train_iters),
                          extra={"skipped": bad is not None})
        progress.update(loss, self.engine.lr, tok_s)
        if (cfg.eval.interval and cfg.eval.iters and self.step % cfg.eval.interval == 0
                and self.step < cfg.train.train_iters):
            self._log_eval("during training")
        return dt, loss

    def save_checkpoint(self) -> str:
        """Atomic checkpoint of this step (collective); a step already saved is not written twice."""
        path = self.ckpt.root / step_dirname(self.step)
        if self.last_saved_step == self.step:
            return str(path)
        client_state = {"step": self.step, "consumed_samples": self.step * self.plan.global_batch_size,
                        "config": self.cfg.to_dict(), "layout": self.layout.to_dict()}
        with self.monitor.checkpointing(self.step) as record:
            path = record.path = self.ckpt.save(
                self.step, self.engine, client_state, model=self.engine.module,
                run_config=run_config_record(self.cfg, self.plan.world_size),
                good=self.guard.consecutive == 0, expected_bytes=self._expected_checkpoint_bytes())
        self.last_saved_step = self.step
        self.log(f"[ckpt] saved {path}")
        return str(path)

    def _expected_checkpoint_bytes(self) -> int:
        """Rough size of a checkpoint (all ranks: fp32 parameters twice, optimizer state), for the free-space
        check of a first save."""
        sb = torch.tensor([float(self.engine.state_bytes()[0])], dtype=torch.float64, device=self.tdev)
        dist.all_reduce(sb)
        return int(sb.item() + 8 * self.num_params)

    def _summary(self, initial, final, losses, t_train, first_step_s, ckpt, preempted: bool = False) -> dict:
        cfg, p = self.cfg, self.plan
        sb = torch.tensor(self.engine.state_bytes(), dtype=torch.float64, device=self.tdev)
        dist.all_reduce(sb)  # over the world: every rank's partitions
        with self.engine.gathered_params():
            drift = replicated_mismatches(self.engine.module, self.tp_group, self.tdev)
        steps_timed = len(losses) - 1
        summary = {
            "variant": cfg.model.variant, "preset": cfg.model.preset, "params": self.num_params,
            "world_size": p.world_size, "tp": p.tp, "dp": p.dp, "grad_accum": p.grad_accum,
            "zero_stage": None if cfg.optim.per_layer else cfg.deepspeed.zero_stage,
            "per_layer": cfg.optim.per_layer, "optimizer": cfg.optim.name, "precision": cfg.train.precision,
            "steps": self.step, "tokens": self.step * p.tokens_per_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "losses": losses,
            "initial_val_loss": initial and initial["val_loss"], "initial_val_ppl": initial and initial["val_ppl"],
            "final_val_loss": final and final["val_loss"], "final_val_ppl": final and final["val_ppl"],
            "train_time_s": t_train,
            # throughput without the first (warm-up) step when there is more than one
            "tokens_per_s": ((steps_timed * p.tokens_per_step / (t_train - first_step_s)) if steps_timed > 0
                             else (p.tokens_per_step / t_train if t_train else None)),
            "opt_state_bytes": int(sb[0]), "opt_state_elements": int(sb[1]),
            "opt_state_bytes_per_param": float(sb[0] / sb[1]) if sb[1] > 0 else None,
            "replicated_params_identical": not drift, "replicated_mismatches": drift,
            "peak_rss_mb_rank0": _peak_rss_mb(), "checkpoint": ckpt,
            "resumed_from_step": self.resumed_from, "preempted": preempted,
            "skipped_steps": self.guard.skipped_total,
        }
        if self.device == "cuda":
            summary["peak_cuda_mem_mb_rank0"] = torch.cuda.max_memory_allocated() / 2**20
        self.metrics.write("summary", **summary)
        if self.rank0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            bpp = summary["opt_state_bytes_per_param"]
            self.log(f"[done] {self.step} steps in {t_train:.1f} s, {summary['tokens_per_s'] or 0:,.0f} tokens/s; "
                     f"optimizer state {bpp:.3f} bytes/param" if bpp else f"[done] {self.step} steps")
            if drift:
                self.log(f"[warn] TP-replicated parameters differ across TP ranks: {drift}")
        self.monitor.close()
        self.metrics.close()
        self.watchdog.stop()
        if self.lock is not None:
            self.lock.release()
        return summary


def _skip_label(reason: str) -> str:
    """The metrics label of a guard verdict ("non-finite loss nan" -> "nonfinite_loss")."""
    if reason.startswith("non-finite"):
        return "nonfinite_loss"
    if reason.startswith("loss spike"):
        return "loss_spike"
    return "other_rank"


def train(cfg: TrainConfig, plan: Plan, handler: Optional[PreemptionHandler] = None) -> dict:
    """Run training in this rank (inside a launcher); returns the summary (same on every rank).
    ``handler``: an already installed ``PreemptionHandler`` (the CLI installs one before set-up)."""
    return Trainer(cfg, plan).run(handler)
