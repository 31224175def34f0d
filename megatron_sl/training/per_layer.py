"""``PerLayerEngine``: optimizer steps inside post-accumulate-grad hooks (optimizer-in-backward), for
runs without ZeRO gradient partitioning, done correctly.

What the SLTrain/GaLore research code gets wrong and what this does instead:

* It steps on every micro-batch, so gradient accumulation silently becomes several updates. Here
  the hooks do nothing until the last micro-batch of the accumulation window; gradients accumulate
  in ``.grad`` until then and each parameter is updated once per window.
* Under DDP it steps on the local gradient. Here the hook first averages the gradient over the
  data-parallel group (sum, then 1/DP, DeepSpeed's order).
* It ignores clipping. Here, with ``optim.clip_grad > 0``, the update is two-phase: the hooks of
  the boundary backward only average the gradients; after backward the global norm (TP-sharded
  parameters summed over TP, replicated ones counted once) gives the clip coefficient, then each
  parameter is clipped, stepped and its gradient freed, one at a time. Cost: at the boundary all
  gradients exist together, so with clipping the memory win is only in the optimizer step (no
  fused multi-tensor temporaries); set ``optim.clip_grad=0`` for the full optimizer-in-backward
  saving (gradients freed as soon as each is final).
* The schedule advances once per update (not once per micro-batch or per parameter).
* TP-partial gradients (replicated SL factors; norms under sequence parallelism; see
  ``megatron_sl.parallel.grad_sync``) are summed over TP once per update, coalesced: without
  clipping, per transformer layer -- the layer's bucket is all-reduced as soon as its last partial
  gradient is final, then its parameters step; with clipping, all of them before the norm.

Each parameter has its own optimizer (torch AdamW or bitsandbytes AdamW8bit over ``[p]``), so the
TP-sharded / replicated separation needed for 8-bit states holds trivially. DeepSpeed is not used:
ZeRO-1/2/3 partition or reduce gradients inside DeepSpeed and would undo or crash on in-backward
updates, and at ZeRO-0 it adds nothing but
a wrapper. Checkpoints mirror DeepSpeed's layout (``<dir>/<tag>/mp_rank_XX_model_states.pt``
holding ``module``, the per-parameter optimizer states and the client state; ``<dir>/latest``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..parallel.grad_sync import allreduce_coalesced_, is_partial_tp_grad, tp_group_of
from .config import TrainConfig
from .grads import clip_coefficient, dp_average_, global_norm, squared_norm_parts
from .optim import is_no_decay, make_optimizer, set_adam_moments, state_bytes
from .schedule import WarmupCosine
from .config_checks import Plan


class PerLayerEngine:
    per_layer = True
    zero_stage = 0

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, plan: Plan, schedule: WarmupCosine, device: str):
        self.module = model.to(device)
        self.device = torch.device(device if device != "cuda" else f"cuda:{torch.cuda.current_device()}")
        self.schedule = schedule
        self.ga = plan.grad_accum
        self.clip = cfg.optim.clip_grad
        self.dp_group = ps.get_data_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        src = dist.get_process_group_ranks(self.dp_group)[0]
        self.named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        with torch.no_grad():
            for _, p in self.named:  # same start on every DP rank, as DeepSpeed guarantees
                dist.broadcast(p.data, src=src, group=self.dp_group)
        wd = cfg.optim.weight_decay
        self.optimizers: Dict[torch.nn.Parameter, torch.optim.Optimizer] = {
            p: make_optimizer([{"params": [p], "weight_decay": 0.0 if (wd == 0 or is_no_decay(n)) else wd,
                                "name": n}], cfg.optim)
            for n, p in self.named}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for _, p in self.named]
        # TP-partial parameters, bucketed per transformer layer ("decoder.layers.N."), the rest in one bucket
        self.buckets: Dict[str, list] = {}
        self.bucket_of: Dict[torch.nn.Parameter, str] = {}
        for n, p in self.named:
            if is_partial_tp_grad(p):
                key = _layer_prefix(n)
                self.buckets.setdefault(key, []).append(p)
                self.bucket_of[p] = key
        self.partial_group = tp_group_of(list(self.bucket_of), self.tp_group) if self.bucket_of else None
        self._ready: Dict[str, list] = {}
        self.tp_reductions = 0  # all-reduce calls issued for TP-partial gradients (for tests / benchmarks)
        self.micro_steps = 0
        self.global_steps = 0
        self._boundary = False
        self._sq = None
        self.grad_norm: Optional[float] = None
        self.lr: float = schedule.lr_at(0)

    # -- the loop surface -------------------------------------------------------------------
    def forward(self, tokens, position_ids, attention_mask, labels):
        return self.module(tokens, position_ids, attention_mask, labels=labels)

    def backward(self, loss: torch.Tensor) -> None:
        self._boundary = (self.micro_steps + 1) % self.ga == 0
        if self._boundary:
            self.lr = self.schedule.lr_at(self.global_steps)
            self._sq = torch.zeros(2, dtype=torch.float64, device=self.device)
        (loss / self.ga).backward()
        if self._boundary:
            if self.clip > 0:
                self._clipped_update()
            else:
                for key in list(self._ready):  # a bucket some of whose parameters got no gradient
                    self._flush_bucket(key)
                self.grad_norm = global_norm(self._sq, self.tp_group)

    def step(self) -> bool:
        boundary = self._boundary
        self.micro_steps += 1
        if boundary:
            self.global_steps += 1
            self._boundary = False
        return boundary

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def state_bytes(self):
        return state_bytes(self.optimizers.values())

    def gathered_params(self):
        return contextlib.nullcontext()

    # -- updates ----------------------------------------------------------------------------
    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self._boundary:
            return  # accumulate until the window's last micro-batch
        dp_average_(p.grad, self.dp_group)
        if self.clip > 0:
            return  # phase 2 after backward, once the global norm is known
        key = self.bucket_of.get(p)
        if key is not None:  # wait for the layer's other partial gradients, then sum them over TP at once
            ready = self._ready.setdefault(key, [])
            ready.append(p)
            if len(ready) == len(self.buckets[key]):
                self._flush_bucket(key)
            return
        self._sq += squared_norm_parts([p], device=self.device)
        self._update(p)

    def _flush_bucket(self, key: str) -> None:
        params = self._ready.pop(key)
        self.tp_reductions += allreduce_coalesced_([p.grad for p in params], self.partial_group)
        for p in params:
            self._sq += squared_norm_parts([p], device=self.device)
            self._update(p)

    def _update(self, p: torch.nn.Parameter) -> None:
        opt = self.optimizers[p]
        for group in opt.param_groups:
            group["lr"] = self.lr
        opt.step()
        p.grad = None

    def _clipped_update(self) -> None:
        params = [p for _, p in self.named if p.grad is not None]
        partial = [p.grad for p in params if p in self.bucket_of]
        if partial:
            self.tp_reductions += allreduce_coalesced_(partial, self.partial_group)
        self.grad_norm = global_norm(squared_norm_parts(params, device=self.device), self.tp_group)
        coef = clip_coefficient(self.grad_norm, self.clip)
        for p in params:
            if coef < 1.0:
                p.grad.mul_(coef)
            self._update(p)

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"module": self.module.state_dict(),
                "optimizer_states": {n: self.optimizers[p].state_dict() for n, p in self.named},
                "global_steps": self.global_steps, "micro_steps": self.micro_steps}

    def save_state(self, directory) -> None:
        """This rank's module and per-parameter optimizer states, for ``training.checkpoint``."""
        path = Path(directory) / f"per_layer_rank_{dist.get_rank():05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self._state(), path)

    def load_state(self, directory) -> None:
        state = torch.load(Path(directory) / f"per_layer_rank_{dist.get_rank():05d}.pt", map_location="cpu",
                           weights_only=False)
        self.module.load_state_dict(state["module"])
        for n, p in self.named:
            self.optimizers[p].load_state_dict(state["optimizer_states"][n])
        self.global_steps, self.micro_steps = state["global_steps"], state["micro_steps"]

    @torch.no_grad()
    def load_universal(self, local: dict, *, opt_step: int, schedule_step: int) -> None:
        """This rank's slices of a resharded checkpoint (``training.checkpoint.reshard``): weights into
        the parameters, moments into each parameter's optimizer, the update count into the schedule."""
        for n, p in self.named:
            p.copy_(local["fp32"][n])
            set_adam_moments(self.optimizers[p], p, local["exp_avg"][n], local["exp_avg_sq"][n], opt_step)
        self.global_steps, self.micro_steps = schedule_step, schedule_step * self.ga


def _layer_prefix(name: str) -> str:
    """``decoder.layers.3.mlp.linear_fc1.parts.up.A`` -> ``decoder.layers.3.``; other names -> ``""``."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[:i + 2]) + "."
    return ""
