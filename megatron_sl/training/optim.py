"""Optimizers for training: parameter groups, AdamW / bitsandbytes 8-bit AdamW, state accounting.

Parameter groups. TP-sharded parameters (megatron's ``tensor_model_parallel`` attribute),
TP-replicated ones with complete gradients (norms) and TP-replicated ones whose gradient is a
per-rank partial sum (the replicated SL factor of every SL layer; norms and row biases under
sequence parallelism; see ``megatron_sl.parallel.grad_sync``) always sit in separate groups, and,
when weight decay is on, so do no-decay parameters (biases and norm weights; the SL
``values`` are weights and do decay). Why always separate: ZeRO-1/2/3 flatten each group into one
buffer and bitsandbytes quantises its state block-wise (256 elements, one absmax each) over that
buffer; a block mixing replicated and sharded elements gets a different absmax on each TP rank, so
the replicated parameters take different steps and drift apart (measured: 1.7e-3 after 10 steps,
ZeRO-2, TP=2). With a group of replicated parameters only, the buffer and its quantisation are
identical on every TP rank. The partial-gradient group is also what the engines sum over TP once per
optimizer step: under ZeRO its flat gradient partition holds nothing else.

``adam_moments`` / ``set_adam_moments``: one AdamW state entry as fp32 moments and back, whatever the
storage (torch fp32, bitsandbytes 8-bit blockwise or its 32-bit fallback), for resharding.

8-bit states: ``bitsandbytes.optim.AdamW8bit`` (runs on CPU and GPU, works as a DeepSpeed client
optimizer under ZeRO 0-3 with exact checkpoint round trips; ~2.0-2.2 bytes of state per parameter).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from ..parallel.grad_sync import is_partial_tp_grad
from .config import OptimSection

GROUP_ORDER = ("tp_sharded", "tp_replicated", "tp_partial")
PARTIAL_GROUP = "tp_partial"


def is_tp_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def tp_kind(p: torch.Tensor) -> str:
    """"tp_sharded", "tp_partial" (replicated, gradient summed over TP per step) or "tp_replicated"."""
    if is_tp_sharded(p):
        return "tp_sharded"
    return PARTIAL_GROUP if is_partial_tp_grad(p) else "tp_replicated"


def is_partial_group(group: dict) -> bool:
    return str(group.get("name", "")).startswith(PARTIAL_GROUP)


def is_no_decay(name: str) -> bool:
    """Biases and normalisation weights (by module name: megatron's ``*layernorm*``/``*norm*``)."""
    parts = name.split(".")
    return parts[-1] == "bias" or any("norm" in part for part in parts[:-1]) or "layer_norm" in parts[-1]


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Separate groups for TP-sharded / TP-replicated / TP-partial parameters, and for no-decay ones if wd > 0.

    Each group carries a ``name`` key (kept by torch, DeepSpeed and bitsandbytes) for logs and
    checkpoints; empty groups are dropped, the order is the same on every rank.
    """
    buckets: Dict[Tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shard = tp_kind(p)
        decay = weight_decay > 0 and not is_no_decay(name)
        buckets.setdefault((shard, decay), []).append(p)
    groups = []
    for shard in GROUP_ORDER:
        for decay in (True, False):
            params = buckets.get((shard, decay))
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "name": f"{shard}{'' if decay or weight_decay == 0 else '_no_decay'}"})
    return groups


def make_optimizer(groups: Iterable[dict], cfg: OptimSection) -> torch.optim.Optimizer:
    """The client optimizer for ``groups`` (lr is the peak; the schedule scales it)."""
    groups = list(groups)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, min_8bit_size=cfg.min_8bit_size, **kwargs)
    raise ValueError(f"optim.name={cfg.name!r}")  # unreachable after config validation


def state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> Tuple[int, int]:
    """(bytes of all optimizer-state tensors, number of parameter elements they cover) on this rank.

    Counts what the optimizer keeps between steps (Adam moments, bnb's uint8 codes + absmax + qmaps,
    step counters); the parameter elements are those of the state's keys, i.e. under ZeRO the
    rank's flat fp32 partitions.
    """
    total, numel = 0, 0
    for opt in optimizers:
        for key, st in opt.state.items():
            if not isinstance(st, dict) or not st:
                continue
            numel += key.numel() if isinstance(key, torch.Tensor) else 0
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total, numel


# --------------------------------------------------------------------------------------------
# Adam moments in fp32, whatever the storage (resharding a checkpoint onto another layout)
# --------------------------------------------------------------------------------------------
BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise 8-bit optimizer states: one absmax per 256 elements
_BNB_PACKED = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict() nests its 8-bit tensors


def adam_moments(state: dict) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(exp_avg, exp_avg_sq, step) of one AdamW state entry as fp32 tensors: torch AdamW
    (``exp_avg``/``exp_avg_sq``) or bitsandbytes (``state1``/``state2``: fp32 below ``min_8bit_size``,
    else 8-bit codes dequantized block by block with their absmax and code map). Accepts a live
    ``optimizer.state[p]`` or an entry of ``optimizer.state_dict()['state']``."""
    st = dict(state)
    st.update(st.pop(_BNB_PACKED, {}) or {})
    step = st.get("step", 0)
    step = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
    if "exp_avg" in st:
        return st["exp_avg"].float(), st["exp_avg_sq"].float(), step
    moments = []
    for i in (1, 2):
        s = st[f"state{i}"]
        if s.dtype == torch.uint8:
            import bitsandbytes.functional as bnbf

            s = bnbf.dequantize_blockwise(s, absmax=st[f"absmax{i}"], code=st[f"qmap{i}"], blocksize=BNB_BLOCKSIZE)
        moments.append(s.float())
    return moments[0], moments[1], step


@torch.no_grad()
def set_adam_moments(opt: torch.optim.Optimizer, key: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     step: int) -> None:
    """Put fp32 moments (shaped like ``key``, the tensor ``opt`` steps) into ``opt``'s state for ``key``.
    bitsandbytes 8-bit states are re-quantized block by block in this layout's blocks (not
    bit-exact when the blocks differ from the writer's: each block gets a new absmax)."""
    state = opt.state[key]
    exp_avg = exp_avg.reshape(key.shape).to(device=key.device)
    exp_avg_sq = exp_avg_sq.reshape(key.shape).to(device=key.device)
    if hasattr(opt, "init_state"):  # bitsandbytes
        if "state1" not in state:
            gindex, group = next((i, g) for i, g in enumerate(opt.param_groups) if any(p is key for p in g["params"]))
            pindex = next(j for j, p in enumerate(opt.param_groups[gindex]["params"]) if p is key)
            opt.init_state(group, key, gindex, pindex)
        for i, m in ((1, exp_avg), (2, exp_avg_sq)):
            buf = state[f"state{i}"]
            if buf.dtype == torch.uint8:
                import bitsandbytes.functional as bnbf

                bnbf.quantize_blockwise(m.float(), code=state[f"qmap{i}"], absmax=state[f"absmax{i}"], out=buf,
                                        blocksize=BNB_BLOCKSIZE)
            else:
                buf.copy_(m)
        state["step"] = int(step)
        return
    if "exp_avg" in state and state["exp_avg"].shape == key.shape:
        state["exp_avg"].copy_(exp_avg)
        state["exp_avg_sq"].copy_(exp_avg_sq)
    else:
        state["exp_avg"] = exp_avg.to(key.dtype).clone()
        state["exp_avg_sq"] = exp_avg_sq.to(key.dtype).clone()
    old = state.get("step")
    state["step"] = (torch.tensor(float(step), dtype=old.dtype, device=old.device) if isinstance(old, torch.Tensor)
                     else torch.tensor(float(step)))
