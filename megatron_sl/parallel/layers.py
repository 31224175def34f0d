"""Tensor-parallel SL linears for megatron-core's four linear slots (qkv, proj, fc1, fc2).

``SLColumnParallelLinear`` replaces ``ColumnParallelLinear`` (slots linear_qkv, linear_fc1) and
``SLRowParallelLinear`` replaces ``RowParallelLinear`` (linear_proj, linear_fc2). They take exactly
the constructor keywords megatron passes in those slots, plus ``sl_config`` (an ``SLConfig``, given
through ``ModuleSpec(params={"sl_config": ...})``) and an optional ``layer_name``, and return
``(output, bias_or_None)`` like megatron's layers.

Each fused slot holds the paper's separate matrices ("parts", see ``layout``): qkv = q, k, v in
megatron's interleaved GQA layout; gated fc1 = gate, up in the stride-2 layout; proj = o;
fc2 = down. Every part is an ``SLShard`` with its own B, A and support.

Sharding and gradients:

* column-parallel: B, S and the bias are split by output rows, A is replicated. The input is
  all-gathered along the sequence (sequence parallel) or entered with
  ``copy_to_tensor_model_parallel_region`` (dX all-reduced); ``sl_linear(..., replicated="A",
  reduce_group=tp)`` sums dA over TP inside the op.
* row-parallel: A and S are split by input columns, B and the bias are replicated. The partial
  output is all-reduced (or reduce-scattered along the sequence); dB is summed over TP inside the
  op (``replicated="B"``). Under sequence parallel each rank adds the bias to its own tokens only,
  so the bias enters through ``copy_to_tensor_model_parallel_region`` and its gradient is summed
  over TP in backward as well.

So every gradient is complete when backward returns: no parameter is tagged ``sequence_parallel``
and replicated parameters carry no ``tensor_model_parallel`` tag; nothing downstream (megatron's
``finalize_model_grads``, DeepSpeed) must reduce them again, and grad norms count them once.
``init_method`` is accepted but unused: SL parameters follow the paper's init (see ``shard``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

from megatron_sl.core.config import SLConfig

from .layout import glu_layout, local_rows, qkv_layout, single_layout
from .naming import resolve_layer_name
from .shard import SLShard

from megatron_sl.kernels import sl_linear  # core's op with the kernel-dispatching primitives installed

SINGLE_PART_NAMES = {"proj": "o", "fc1": "up", "fc2": "down"}


def resolve_tp_group(tp_group):
    """The given group, else megatron's TP group if initialised, else None (TP size 1)."""
    if tp_group is not None:
        return tp_group
    if dist.is_available() and dist.is_initialized():
        return parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    return None


def _tp_size_rank(group):
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _param_device(config) -> torch.device:
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_common(sl_config, is_expert, cls_name):
    if not isinstance(sl_config, SLConfig):
        raise ValueError(f"{cls_name} needs sl_config=<megatron_sl.core.SLConfig> (got {sl_config!r}); pass it via "
                         "ModuleSpec(params={'sl_config': ...}) or use get_gpt_layer_sl_spec")
    if is_expert:
        raise ValueError(f"{cls_name}: is_expert=True (MoE experts) is not supported")


class SLColumnParallelLinear(nn.Module):
    """Column-parallel SL linear: Y_local = X · W[local rows]ᵀ (+ bias), W = s·B A + S per part.

    Output [s, b, out/tp] in megatron's local layout (or [s, b, out] with gather_output); under
    sequence parallel the input is [s/tp, b, in].
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Optional[Callable] = None,
                 bias: bool = True, gather_output: bool = False, stride: int = 1, skip_bias_add: bool = False,
                 is_expert: bool = False, tp_comm_buffer_name: Optional[str] = None, tp_group=None,
                 sl_config: Optional[SLConfig] = None, layer_name: Optional[str] = None):
        super().__init__()
        _check_common(sl_config, is_expert, type(self).__name__)
        self.input_size, self.output_size, self.stride = input_size, output_size, stride
        self.sl_config, self.slot = sl_config, tp_comm_buffer_name
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.tp_group = resolve_tp_group(tp_group)
        self.tp_size, self.tp_rank = _tp_size_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        if self.sequence_parallel and gather_output:
            raise ValueError("SLColumnParallelLinear: gather_output=True is incompatible with sequence_parallel")
        self.layer_name = resolve_layer_name(tp_comm_buffer_name, layer_name)

        self.fused = self._fused_layout(config, output_size, stride, tp_comm_buffer_name)
        local = local_rows(self.fused, self.tp_size, self.tp_rank, stride)
        self.global_rows = local.global_rows
        dtype, device = config.params_dtype, _param_device(config)
        self.register_buffer("perm", None if local.perm is None else local.perm.to(device), persistent=False)
        self.parts = nn.ModuleDict({
            name: SLShard(f"{self.layer_name}.{name}", size, input_size, sl_config, rows=rows, dtype=dtype,
                          device=device)
            for (name, size), rows in zip(self.fused.parts, local.rows)})
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.global_rows.numel(), dtype=dtype, device=device))
            self.bias.tensor_model_parallel, self.bias.partition_dim, self.bias.partition_stride = True, 0, stride
        else:
            self.register_parameter("bias", None)

    @staticmethod
    def _fused_layout(config, output_size, stride, slot):
        if slot == "qkv":
            if getattr(config, "attention_output_gate", False):
                raise ValueError("SLColumnParallelLinear: attention_output_gate=True is not supported in the qkv slot")
            np_, ng = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
            hn = config.kv_channels
            if output_size != (np_ + 2 * ng) * hn:
                raise ValueError(f"qkv output_size={output_size} != (heads {np_} + 2*groups {ng}) * kv_channels {hn}")
            return qkv_layout(np_, ng, hn)
        if slot == "fc1" and stride == 2:
            if output_size % 2:
                raise ValueError(f"gated fc1 output_size={output_size} must be even ([gate; up])")
            return glu_layout(output_size // 2)
        return single_layout(SINGLE_PART_NAMES.get(slot, "w"), output_size)

    @property
    def scale(self) -> float:
        return self.sl_config.scale

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if weight is not None:
            raise ValueError("SLColumnParallelLinear has no dense weight; forward(weight=...) is not supported")
        group = self.tp_group if self.tp_size > 1 else None
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(input_, group=group)
        elif group is not None:
            x = copy_to_tensor_model_parallel_region(input_, group=group)
        else:
            x = input_
        ys = [sl_linear(x, p.B, p.A, p.values, p.layout, self.scale, path=self.sl_config.path,
                        reduce_group=group, replicated="A") for p in self.parts.values()]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        if self.perm is not None:
            y = y.index_select(-1, self.perm)
        if self.bias is not None and not self.skip_bias_add:
            y = y + self.bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and group is not None:
            y = gather_from_tensor_model_parallel_region(y, group=group)
        return y, (self.bias if self.skip_bias_add else None)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The local shard of W ([out/tp, in]) in megatron's local row layout."""
        W = torch.cat([p.to_dense(self.scale) for p in self.parts.values()], dim=0)
        return W if self.perm is None else W.index_select(0, self.perm)

    def backward_dw(self):
        """Delayed weight-gradient hook of megatron's schedules: gradients are computed in backward."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        raise NotImplementedError(
            "megatron dist-checkpointing of SL layers is not implemented (the row-parallel sparse values are not a "
            "contiguous slice of the global support); save module/DeepSpeed state dicts instead")

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}:{s}" for n, s in self.fused.parts)
        return (f"in={self.input_size}, out={self.output_size}, parts=[{parts}], tp={self.tp_size}, "
                f"stride={self.stride}, rank={self.sl_config.rank}, density={self.sl_config.density}, "
                f"alpha={self.sl_config.alpha}, sequence_parallel={self.sequence_parallel}, "
                f"bias={self.bias is not None}, name={self.layer_name!r}")


class SLRowParallelLinear(nn.Module):
    """Row-parallel SL linear: Y = Σ_ranks X_local · W[:, local cols]ᵀ (+ bias).

    Input [s, b, in/tp] (input_is_parallel); output [s, b, out] all-reduced, or [s/tp, b, out]
    reduce-scattered under sequence parallel.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Optional[Callable] = None,
                 bias: bool, input_is_parallel: bool, skip_bias_add: bool, stride: int = 1, is_expert: bool = False,
                 tp_comm_buffer_name: Optional[str] = None, tp_group=None, sl_config: Optional[SLConfig] = None,
                 layer_name: Optional[str] = None):
        super().__init__()
        _check_common(sl_config, is_expert, type(self).__name__)
        if stride != 1:
            raise ValueError(f"SLRowParallelLinear: stride={stride} is not supported (only 1)")
        self.input_size, self.output_size = input_size, output_size
        self.sl_config, self.slot = sl_config, tp_comm_buffer_name
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.tp_group = resolve_tp_group(tp_group)
        self.tp_size, self.tp_rank = _tp_size_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("SLRowParallelLinear: sequence_parallel needs input_is_parallel=True")
        if input_size % self.tp_size:
            raise ValueError(f"SLRowParallelLinear: input_size={input_size} is not divisible by TP size {self.tp_size}")
        self.layer_name = resolve_layer_name(tp_comm_buffer_name, layer_name)
        width = input_size // self.tp_size
        self.cols = (self.tp_rank * width, (self.tp_rank + 1) * width)
        dtype, device = config.params_dtype, _param_device(config)
        part = SINGLE_PART_NAMES.get(tp_comm_buffer_name, "w")
        self.parts = nn.ModuleDict({part: SLShard(f"{self.layer_name}.{part}", output_size, input_size, sl_config,
                                                  cols=self.cols, dtype=dtype, device=device)})
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def scale(self) -> float:
        return self.sl_config.scale

    def forward(self, input_: torch.Tensor):
        group = self.tp_group if self.tp_size > 1 else None
        x = input_
        if group is not None and not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(input_, group=group)
        (p,) = self.parts.values()
        y = sl_linear(x, p.B, p.A, p.values, p.layout, self.scale, path=self.sl_config.path,
                      reduce_group=group, replicated="B")
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, group=group)
        elif group is not None:
            y = reduce_from_tensor_model_parallel_region(y, group=group)
        bias = self.bias
        if bias is not None and self.sequence_parallel:
            bias = copy_to_tensor_model_parallel_region(bias, group=group)  # dbias summed over TP in backward
        if self.skip_bias_add:
            return y, bias
        return (y if bias is None else y + bias), None

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The local shard of W ([out, in/tp]): columns cols[0]:cols[1]."""
        (p,) = self.parts.values()
        return p.to_dense(self.scale)

    def backward_dw(self):
        """Delayed weight-gradient hook of megatron's schedules: gradients are computed in backward."""

    sharded_state_dict = SLColumnParallelLinear.sharded_state_dict

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}, cols={self.cols}, "
                f"rank={self.sl_config.rank}, density={self.sl_config.density}, alpha={self.sl_config.alpha}, "
                f"sequence_parallel={self.sequence_parallel}, bias={self.bias is not None}, "
                f"name={self.layer_name!r}")
