"""Render the DeepSpeed JSON for a run from a template (shipped in ``megatron_sl/ds_configs``, one per
distinct ZeRO layout, or ``deepspeed.config_template``) and the training config.

The template holds only DeepSpeed-specific settings (ZeRO stage details, logging). The ZeRO stage,
bf16 and everything that also exists in the training config is written in here and nowhere else, so the two cannot
disagree: micro batch, gradient accumulation, ``train_batch_size`` = micro x GA x **data-parallel**
size (not world size: TP ranks share a batch), and ``gradient_clipping`` (DeepSpeed's default is
1.0, so it is always set explicitly; 0 disables). Client optimizers (torch AdamW, bitsandbytes
AdamW8bit) need ``zero_allow_untested_optimizer``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .config import TrainConfig, _deep_merge
from .config_checks import Plan


def render_ds_config(cfg: TrainConfig, plan: Plan) -> dict:
    if plan.ds_template is None:
        raise ValueError("this run does not use DeepSpeed (optim.per_layer=true)")
    out = json.loads(Path(plan.ds_template).read_text())
    out = _deep_merge(out, copy.deepcopy(cfg.deepspeed.extra))
    out.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    out["bf16"] = {**out.get("bf16", {}), "enabled": cfg.train.precision == "bf16"}
    out["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    out["gradient_accumulation_steps"] = plan.grad_accum
    out["train_batch_size"] = plan.micro_batch_size * plan.grad_accum * plan.dp
    out["gradient_clipping"] = float(cfg.optim.clip_grad)
    out["zero_allow_untested_optimizer"] = True
    out.setdefault("steps_per_print", 2**31 - 1)  # progress and metrics are ours
    assert out["train_batch_size"] == plan.global_batch_size
    return out
