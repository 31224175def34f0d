"""``DeepSpeedTrainEngine``: the megatron GPTModel under ``deepspeed.initialize`` with megatron's
groups (``MegatronMPU``), a client optimizer (torch AdamW or bitsandbytes AdamW8bit in separate
TP-sharded / TP-replicated param groups) and our warmup-cosine schedule as a LambdaLR, which
DeepSpeed steps at each gradient-accumulation boundary and stores in its checkpoints.

TP-partial gradients (the replicated SL factors, and norms under sequence parallelism; see
``megatron_sl.parallel.grad_sync``) accumulate locally over the micro-batches and are summed over
the TP group once per optimizer step, at the accumulation boundary, before DeepSpeed computes the
norm, clips and steps: on the parameters' ``.grad`` at ZeRO-0, and on the reduced gradient
partition of the partial-gradient param group(s) at ZeRO-1/2/3 (that partition holds nothing else
and has the same layout on every TP rank, so one coalesced all-reduce per bucket sums it).

The training loop talks to this class and to ``PerLayerEngine`` through the same small surface:
``forward``, ``backward(loss)`` (loss of one micro-batch; scaled by 1/GA inside), ``step()``
(after every micro-batch; updates only at the boundary), ``grad_norm``/``lr`` of the last update,
``train()``/``eval()``, ``state_bytes()``, ``gathered_params()``, ``save_state``/``load_state``
(this rank's engine files, for ``training.checkpoint``) and ``load_universal`` (this rank's slices
of a checkpoint resharded from another layout, ``training.checkpoint.reshard``).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.optim.lr_scheduler import LambdaLR

from .checkpoint.reshard import PARAM_NAMES_KEY
from .config import TrainConfig
from .distributed import import_deepspeed
from .ds_config import render_ds_config
from ..parallel.grad_sync import allreduce_coalesced_, finalize_sl_grads
from .grads import global_norm, squared_norm_parts
from .mpu import MegatronMPU
from .optim import is_partial_group, make_optimizer, param_groups, set_adam_moments, state_bytes
from .schedule import WarmupCosine
from .config_checks import Plan


class DeepSpeedTrainEngine:
    per_layer = False

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, plan: Plan, schedule: WarmupCosine, device: str):
        deepspeed = import_deepspeed(device)
        self._deepspeed = deepspeed
        self.ds_config = render_ds_config(cfg, plan)
        self.zero_stage = cfg.deepspeed.zero_stage
        groups = param_groups(model, cfg.optim.weight_decay)
        names = {p: n for n, p in model.named_parameters()}
        self.param_names = [[names[p] for p in g["params"]] for g in groups]  # ZeRO replaces groups' params
        optimizer = make_optimizer(groups, cfg.optim)
        self.client_optimizer = optimizer
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.partial_groups = [i for i, g in enumerate(optimizer.param_groups) if is_partial_group(g)]
        self.tp_reductions = 0  # all-reduce calls issued for TP-partial gradients (for tests / benchmarks)
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, mpu=MegatronMPU(),
            lr_scheduler=lambda opt: LambdaLR(opt, schedule.lr_lambda))
        self.grad_norm: Optional[float] = None
        self.lr: float = schedule.lr_at(0)
        self.peak_lr = schedule.peak_lr

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, tokens, position_ids, attention_mask, labels):
        return self.engine(tokens, position_ids, attention_mask, labels=labels)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """Call after every micro-batch; returns True when this call performed an update."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        own_norm = None
        if boundary:
            self.tp_reductions += self._sum_partial_grads_over_tp()
            self.lr = float(self.engine.get_lr()[0])
            if self.zero_stage == 0:  # DeepSpeed clips at stage 0 but does not keep the norm
                own_norm = global_norm(squared_norm_parts(self.engine.module.parameters()),
                                       ps.get_tensor_model_parallel_group())
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else own_norm
        return boundary

    def _sum_partial_grads_over_tp(self) -> int:
        """Sum the accumulated TP-partial gradients over TP (once per step); returns the calls issued."""
        if not self.partial_groups or dist.get_world_size(self.tp_group) == 1:
            return 0
        if self.zero_stage == 0:  # gradients live on the parameters (DeepSpeed has DP-averaged them)
            return finalize_sl_grads(self.engine.module, self.tp_group)
        opt = self.engine.optimizer  # the ZeRO optimizer: reduced gradient partitions per (sub-)group
        if self.zero_stage == 3:
            ids = [s for s, g in sorted(opt.sub_group_to_group_id.items()) if g in self.partial_groups]
        else:
            ids = self.partial_groups
        tensors = []
        for i in ids:
            part = opt.averaged_gradients[i]
            if part is None:
                raise RuntimeError(f"ZeRO-{self.zero_stage}: no reduced gradient partition for param group {i} at the "
                                   "accumulation boundary; cannot sum TP-partial gradients")
            tensors += list(part) if isinstance(part, (list, tuple)) else [part]
        return allreduce_coalesced_(tensors, self.tp_group)

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    def state_bytes(self):
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        return state_bytes([base])

    @contextlib.contextmanager
    def gathered_params(self):
        """Full (un-partitioned) parameters inside the block; a no-op below ZeRO-3."""
        if self.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
                yield
        else:
            yield

    def save_state(self, directory) -> None:
        """This rank's engine files for ``training.checkpoint`` (module, ZeRO shards, LR scheduler), with
        the parameter names of each optimizer group (what resharding a ZeRO-0 state needs)."""
        self.engine.save_checkpoint(str(directory), tag="ds", client_state={PARAM_NAMES_KEY: self.param_names},
                                    save_latest=False)

    def load_state(self, directory) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="ds", load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the engine state in {directory}/ds")
        self._apply_schedule()

    @torch.no_grad()
    def load_universal(self, local: dict, *, opt_step: int, schedule_step: int) -> None:
        """This rank's slices of a resharded checkpoint (``training.checkpoint.reshard``): ``local``
        maps "fp32" / "exp_avg" / "exp_avg_sq" to ``{parameter name: tensor}``. The module parameters
        take the fp32 weights; at ZeRO-1/2 each rank's fp32 partition and its moments are filled from
        the parameters' fragments (DeepSpeed's ``_hp_mapping``: where each parameter's slice sits in
        this rank's flat partition); at ZeRO-3 every parameter's own padded partition is cut from it
        (``_load_universal_zero3``); at ZeRO-0 the moments go to the client optimizer per parameter."""
        named = dict(self.engine.module.named_parameters())
        if self.zero_stage != 3:
            for n, p in named.items():
                p.copy_(local["fp32"][n])
        if self.zero_stage == 3:
            self._load_universal_zero3(local, opt_step)
        elif self.zero_stage == 0:
            for n, p in named.items():
                set_adam_moments(self.client_optimizer, p, local["exp_avg"][n], local["exp_avg_sq"][n], opt_step)
        else:
            zopt = self.engine.optimizer
            for i, part in enumerate(zopt.single_partition_of_fp32_groups):
                flat = {k: torch.zeros(part.numel(), dtype=torch.float32, device=part.device) for k in local}
                for lp in zopt.bit16_groups[i]:
                    mapping = lp._hp_mapping
                    if mapping is None:  # no element of it in this rank's partition
                        continue
                    src, dst = mapping.lp_fragment_address, mapping.hp_fragment_address
                    name = zopt.param_names[lp]
                    for k, tensors in local.items():
                        piece = tensors[name].reshape(-1).narrow(0, src.start, src.numel)
                        flat[k].narrow(0, dst.start, dst.numel).copy_(piece)
                part.copy_(flat["fp32"])
                set_adam_moments(zopt.optimizer, part, flat["exp_avg"], flat["exp_avg_sq"], opt_step)
        self.engine.global_steps = schedule_step
        self.engine.global_samples = schedule_step * self.engine.train_batch_size()
        if self.lr_scheduler is not None:
            self.lr_scheduler.last_epoch = schedule_step
            self.lr_scheduler._step_count = schedule_step + 1
        self._apply_schedule()

    @torch.no_grad()
    def _load_universal_zero3(self, local: dict, opt_step: int) -> None:
        """ZeRO-3 holds the state per (sub-)group as one flat partition per rank: the concatenation of
        each parameter's ceil(numel / DP)-element partition (zero-padded at the end), in the group's
        order. Filled the way DeepSpeed's own stage-3 universal loader fills it (fp32 partition,
        moments, then the module partitions from the fp32 ones); persistent (never released)
        parameters are re-gathered from their new partitions at the end."""
        from .checkpoint.reshard import zero3_partition

        zopt = self.engine.optimizer
        zopt.checkpoint_event_prologue()  # every parameter partitioned: the partitions are the whole state
        zopt._set_fp32_optimizer_param_groups()  # the base optimizer's groups are empty between steps
        try:
            for i, group in enumerate(zopt.fp16_groups):
                fp32 = zopt.fp32_partitioned_groups_flat[i]
                flat = {k: [] for k in local}
                for p in group:
                    name = zopt.param_names[p]
                    pg = zopt._get_param_partition_group(p)
                    start, stored, padded = zero3_partition(p.ds_numel, dist.get_world_size(pg), dist.get_rank(pg))
                    for k, tensors in local.items():
                        part = torch.zeros(padded, dtype=torch.float32)
                        part[:stored] = tensors[name].reshape(-1)[start:start + stored]
                        flat[k].append(part)
                flat = {k: torch.cat(v).to(fp32.device) for k, v in flat.items()}
                if flat["fp32"].numel() != fp32.numel():
                    raise RuntimeError(f"ZeRO-3 sub-group {i}: the parameters' partitions hold {flat['fp32'].numel()} "
                                       f"elements, the flat partition {fp32.numel()}")
                fp32.copy_(flat["fp32"])
                set_adam_moments(zopt.optimizer, fp32, flat["exp_avg"], flat["exp_avg_sq"], opt_step)
                zopt.fp16_partitioned_groups_flat[i].copy_(fp32)
                views = zopt.unflatten(zopt.fp16_partitioned_groups_flat[i], zopt.fp16_partitioned_groups[i])
                for partitioned, view in zip(zopt.fp16_partitioned_groups[i], views):
                    partitioned.data = view.data
        finally:
            zopt._clear_fp32_optimizer_param_groups()
        zopt.checkpoint_event_epilogue()

    def _apply_schedule(self) -> None:
        """The loaded LambdaLR brings back the old run's base LRs (and the optimizer its last LR): put
        this run's peak LR and schedule in force, so an allowed ``optim.lr``/schedule change takes
        effect from the first step after resume (a no-op when nothing changed)."""
        sched = self.lr_scheduler
        if sched is None:
            return
        sched.base_lrs = [self.peak_lr] * len(sched.base_lrs)
        lrs = [base * lmbda(sched.last_epoch) for base, lmbda in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["initial_lr"] = self.peak_lr
            group["lr"] = lr
        sched._last_lr = lrs
