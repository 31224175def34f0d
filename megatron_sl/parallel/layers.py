"""Tensor-parallel SL linears for megatron-core's four linear slots (qkv, proj, fc1, fc2).

``SLColumnParallelLinear`` replaces ``ColumnParallelLinear`` (slots linear_qkv, linear_fc1) and
``SLRowParallelLinear`` replaces ``RowParallelLinear`` (linear_proj, linear_fc2). They take exactly
the constructor keywords megatron passes in those slots, plus ``sl_config`` (an ``SLConfig``, given
through ``ModuleSpec(params={"sl_config": ...})``) and a name: ``layer_name=`` (a layer built on its
own), or ``name_after_build=True`` (what the spec passes: the SL parameters are built when
``naming.name_sl_layers`` names the layer by its module path), and return ``(output, bias_or_None)``
like megatron's layers.

Each fused slot holds the paper's separate matrices ("parts", see ``layout``): qkv = q, k, v in
megatron's interleaved GQA layout; gated fc1 = gate, up in the stride-2 layout; proj = o;
fc2 = down. Every part is an ``SLShard`` with its own B, A and support.

Sharding and gradients:

* column-parallel: B, S and the bias are split by output rows, A is replicated. The input is
  all-gathered along the sequence (sequence parallel) or used as given; dX is all-reduced (or
  reduce-scattered along the sequence) asynchronously while the weight gradients are computed,
  as megatron's ColumnParallelLinear does (``_ColumnSL``).
* row-parallel: A and S are split by input columns, B and the bias are replicated. The partial
  output is all-reduced (or reduce-scattered along the sequence).

A replicated factor (A of a column part, B of a row part) gets this rank's partial gradient: it is
tagged with ``grad_sync.mark_partial_tp_grad`` and summed over TP once per optimizer step
(``grad_sync.finalize_sl_grads``; the training engines do it), not in every backward. So backward
issues exactly the collectives of megatron's ColumnParallelLinear / RowParallelLinear. Under
sequence parallel each rank adds the row-parallel bias to its own tokens only, so that bias is
tagged the same way. Replicated parameters carry no ``tensor_model_parallel`` tag, so grad norms
count them once.
``init_method`` is accepted but unused: SL parameters follow the paper's init (see ``shard``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

from megatron_sl.core.config import SLConfig
from megatron_sl.core.functional import (backward_input_math, backward_weight_math, choose, forward_math,
                                         sl_linear, sparse_accumulate, sparse_values_grad)
from megatron_sl.core.reference import SupportLayout

from .grad_sync import mark_partial_tp_grad
from .layout import glu_layout, local_rows, qkv_layout, single_layout
from .naming import NamedAfterBuild, check_layer_name, initial_name, unnamed_error
from .shard import SLShard

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


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[s/tp, ...] on every rank -> [s, ...] (rank order), as megatron's sequence-parallel gather."""
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


_COLUMN_ARGS = 10  # arguments of ``_ColumnSL.forward`` before the parameters (B, A, values per part)


class _ColumnSL(torch.autograd.Function):
    """All SL parts of one column-parallel layer in one Function, as megatron-core's
    ColumnParallelLinear (``LinearWithGradAccumulationAndAsyncCommunication``) runs.

    Forward takes the input as the layer gets it ([s, b, in]; under sequence parallel the shard
    [s/tp, b, in], all-gathered here). The parts' outputs are computed part-major (part i in
    columns [off_i, off_i + out_i)), each low-rank product written straight into its columns, and
    put into megatron's local layout by one column gather (``perm``; None when part-major is the
    layout). The factored parts read the same input, so their sparse products run as one call over
    their stacked supports (``SupportLayout.stacked``): one pass over the input instead of one per
    part, in forward and in both backward products. The input is saved as given (under sequence
    parallel backward all-gathers it again), and each factored part's x·Aᵀ under
    ``SLConfig.save_xa``.

    Backward computes the input gradient of every part first, starts its all-reduce over TP (its
    reduce-scatter along the sequence under sequence parallel) asynchronously, computes the weight
    gradients while it runs, then waits: the order megatron uses to overlap the dgrad collective
    with the wgrad GEMMs. ``group`` None (TP=1) issues no collective.
    """

    @staticmethod
    def forward(ctx, x_in, group, sequence_parallel, layouts, perm, inv_perm, scale, path, save_xa, out_features,
                *params):
        x_full = _all_gather_seq(x_in, group) if sequence_parallel else x_in
        lead = x_full.shape[:-1]
        x2 = x_full.reshape(-1, x_full.shape[-1])
        y = x2.new_empty((x2.shape[0], out_features))  # part-major
        paths, xas, offsets, off = [], [], [], 0
        for i, layout in enumerate(layouts):
            B, A, values = params[3 * i:3 * i + 3]
            pth = choose(path, x2.shape[0], layout, A.shape[0], x2.device.type)
            paths.append(pth)
            offsets.append(off)
            _, xa = forward_math(pth, x2, B, A, values, layout, scale, out=y[:, off:off + layout.shape[0]],
                                 sparse=False)
            off += layout.shape[0]
            xas.append(xa if save_xa and xa is not None else x2.new_empty(0))  # empty: recomputed
        stacked = _stacked_sparse(layouts, paths, offsets, params, out_features, x2.device)
        if stacked is not None:
            sparse_accumulate(y, stacked[0], stacked[1], x2, transpose=False)
        ctx.save_for_backward(x_in, *params, *xas)
        ctx.n_params = len(params)
        ctx.group, ctx.sequence_parallel, ctx.layouts, ctx.scale = group, sequence_parallel, layouts, scale
        ctx.paths, ctx.offsets, ctx.inv_perm, ctx.out_features = paths, offsets, inv_perm, out_features
        if perm is not None:
            y = y.index_select(1, perm)
        return y.reshape(*lead, out_features)

    @staticmethod
    def backward(ctx, dy):
        x_in, *saved = ctx.saved_tensors
        params, xas = saved[:ctx.n_params], saved[ctx.n_params:]
        group, first = ctx.group, _COLUMN_ARGS
        x_full = _all_gather_seq(x_in, group) if ctx.sequence_parallel else x_in
        lead = x_full.shape[:-1]
        x2 = x_full.reshape(-1, x_full.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy2 = dy2.contiguous() if ctx.inv_perm is None else dy2.index_select(1, ctx.inv_perm)  # part-major
        need_x = ctx.needs_input_grad[0]
        stacked = _stacked_sparse(ctx.layouts, ctx.paths, ctx.offsets, params, ctx.out_features, x2.device)
        dys, carries, dx = [], [], None
        for i, (layout, pth, off) in enumerate(zip(ctx.layouts, ctx.paths, ctx.offsets)):
            B, A, values = params[3 * i:3 * i + 3]
            dys.append(dy2[:, off:off + layout.shape[0]])
            dxi, carry = backward_input_math(pth, dys[i], x2, B, A, values, layout, ctx.scale, need_x,
                                             ctx.needs_input_grad[first + 1 + 3 * i], sparse=stacked is None)
            carries.append(carry)
            if dxi is not None:
                dx = dxi if dx is None else dx.add_(dxi)
        if need_x and stacked is not None:
            sparse_accumulate(dx, stacked[0], stacked[1], dy2, transpose=True)
        handle = dx_sent = None
        if dx is not None:
            dx = dx.reshape(*lead, dx.shape[-1])
            if group is not None and ctx.sequence_parallel:
                dx_sent = dx  # referenced until the collective is waited on
                dx = dx.new_empty((dx.shape[0] // dist.get_world_size(group), *dx.shape[1:]))
                handle = dist.reduce_scatter_tensor(dx, dx_sent, group=group, async_op=True)
            elif group is not None:
                handle = dist.all_reduce(dx, group=group, async_op=True)
        grads = []
        for i, (layout, pth) in enumerate(zip(ctx.layouts, ctx.paths)):
            B, A, values = params[3 * i:3 * i + 3]
            needs = list(ctx.needs_input_grad[first + 3 * i:first + 3 + 3 * i])
            needs[2] = needs[2] and not (stacked is not None and i in stacked[2])  # from the stacked SDDMM
            grads += backward_weight_math(pth, dys[i], x2, B, A, values, layout, ctx.scale, needs, carries[i],
                                          xas[i] if xas[i].numel() else None)
        if stacked is not None:
            _stacked_values_grads(grads, stacked, dy2, x2, ctx, params)
        if handle is not None:
            handle.wait()
        del dx_sent
        return (dx, *([None] * (first - 1)), *grads)


def _stacked_sparse(layouts, paths, offsets, params, out_features, device):
    """(stacked support, stacked values, part indices) of the factored parts with a support, at
    their rows of the part-major output, or None when no part has one."""
    which = [i for i, (lay, pth) in enumerate(zip(layouts, paths)) if pth == "factored" and lay.nnz]
    if not which:
        return None
    stacked = SupportLayout.stacked([(layouts[i], offsets[i]) for i in which], out_features, device)
    values = torch.cat([params[3 * i + 2] for i in which]) if len(which) > 1 else params[3 * which[0] + 2]
    return stacked, values, which


def _stacked_values_grads(grads, stacked, dy2, x2, ctx, params) -> None:
    """Fill the factored parts' values gradients (``grads`` holds (dB, dA, dvalues) per part) from
    one SDDMM over the stacked support."""
    _, _, which = stacked
    if not any(ctx.needs_input_grad[_COLUMN_ARGS + 2 + 3 * i] for i in which):
        return
    g = sparse_values_grad(dy2, x2, stacked[0])
    for i, gi in zip(which, torch.split(g, [ctx.layouts[i].nnz for i in which])):
        if ctx.needs_input_grad[_COLUMN_ARGS + 2 + 3 * i]:
            grads[3 * i + 2] = gi.to(params[3 * i + 2].dtype, copy=True)  # not a view shared with the others


class SLColumnParallelLinear(NamedAfterBuild, nn.Module):
    """Column-parallel SL linear: Y_local = X · W[local rows]ᵀ (+ bias), W = s·B A + S per part.

    Output [s, b, out/tp] in megatron's local layout (or [s, b, out] with gather_output); under
    sequence parallel the input is [s/tp, b, in].
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Optional[Callable] = None,
                 bias: bool = True, gather_output: bool = False, stride: int = 1, skip_bias_add: bool = False,
                 is_expert: bool = False, tp_comm_buffer_name: Optional[str] = None, tp_group=None,
                 sl_config: Optional[SLConfig] = None, layer_name: Optional[str] = None,
                 name_after_build: bool = False):
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
        given = initial_name(type(self).__name__, tp_comm_buffer_name, layer_name, name_after_build)

        self.fused = self._fused_layout(config, output_size, stride, tp_comm_buffer_name)
        local = local_rows(self.fused, self.tp_size, self.tp_rank, stride)
        self.global_rows = local.global_rows
        dtype, device = config.params_dtype, _param_device(config)
        # parts are computed part-major (their blocks concatenated); ``perm`` gathers megatron's local
        # layout from that (None: the same order), ``inv_perm`` the part-major order from it (a
        # buffer either way: it also tells ``assign_name`` where the module lives)
        self.register_buffer("perm", None if local.perm is None else local.perm.to(device), persistent=False)
        inv = torch.arange(self.global_rows.numel()) if local.perm is None else torch.argsort(local.perm)
        self.register_buffer("inv_perm", inv.to(device), persistent=False)
        self._part_rows = [(part, size, rows) for (part, size), rows in zip(self.fused.parts, local.rows)]
        self._params_dtype = dtype
        self.layer_name = None
        self.parts = nn.ModuleDict()  # built by assign_name
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.global_rows.numel(), dtype=dtype, device=device))
            self.bias.tensor_model_parallel, self.bias.partition_dim, self.bias.partition_stride = True, 0, stride
        else:
            self.register_parameter("bias", None)
        if given is not None:
            self.assign_name(given)

    def assign_name(self, name: str) -> None:
        """Name the layer (its parts are ``<name>.<part>``) and build them: sample each part's
        support for this rank's rows and initialise it."""
        if self.layer_name is not None:
            raise ValueError(f"{type(self).__name__} is already named {self.layer_name!r} (not renamed to {name!r})")
        self.layer_name = check_layer_name(name)
        device = self.inv_perm.device
        for part, size, rows in self._part_rows:
            self.parts[part] = SLShard(f"{name}.{part}", size, self.input_size, self.sl_config, rows=rows,
                                       dtype=self._params_dtype, device=device)
            mark_partial_tp_grad(self.parts[part].A, self.tp_group if self.tp_size > 1 else None)

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
        if self.layer_name is None:
            raise unnamed_error(self)
        group = self.tp_group if self.tp_size > 1 else None
        parts = list(self.parts.values())
        params = [t for p in parts for t in (p.B, p.A, p.values)]
        inv_perm = None if self.perm is None else self.inv_perm
        y = _ColumnSL.apply(input_, group, self.sequence_parallel, [p.layout for p in parts], self.perm, inv_perm,
                            self.scale, self.sl_config.path, self.sl_config.save_xa, self.global_rows.numel(),
                            *params)
        if self.bias is not None and not self.skip_bias_add:
            y = y + self.bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and group is not None:
            y = gather_from_tensor_model_parallel_region(y, group=group)
        return y, (self.bias if self.skip_bias_add else None)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The local shard of W ([out/tp, in]) in megatron's local row layout."""
        if self.layer_name is None:
            raise unnamed_error(self)
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


class SLRowParallelLinear(NamedAfterBuild, nn.Module):
    """Row-parallel SL linear: Y = Σ_ranks X_local · W[:, local cols]ᵀ (+ bias).

    Input [s, b, in/tp] (input_is_parallel); output [s, b, out] all-reduced, or [s/tp, b, out]
    reduce-scattered under sequence parallel.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Optional[Callable] = None,
                 bias: bool, input_is_parallel: bool, skip_bias_add: bool, stride: int = 1, is_expert: bool = False,
                 tp_comm_buffer_name: Optional[str] = None, tp_group=None, sl_config: Optional[SLConfig] = None,
                 layer_name: Optional[str] = None, name_after_build: bool = False):
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
        given = initial_name(type(self).__name__, tp_comm_buffer_name, layer_name, name_after_build)
        width = input_size // self.tp_size
        self.cols = (self.tp_rank * width, (self.tp_rank + 1) * width)
        dtype, device = config.params_dtype, _param_device(config)
        self._part = SINGLE_PART_NAMES.get(tp_comm_buffer_name, "w")
        self._params_dtype, self._params_device = dtype, device
        self.layer_name = None
        self.parts = nn.ModuleDict()  # built by assign_name
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device))
            if self.sequence_parallel:
                mark_partial_tp_grad(self.bias, self.tp_group)
        else:
            self.register_parameter("bias", None)
        if given is not None:
            self.assign_name(given)

    def assign_name(self, name: str) -> None:
        """Name the layer (its part is ``<name>.<part>``) and build it: sample the support in this
        rank's columns and initialise it."""
        if self.layer_name is not None:
            raise ValueError(f"{type(self).__name__} is already named {self.layer_name!r} (not renamed to {name!r})")
        self.layer_name = check_layer_name(name)
        device = self.bias.device if self.bias is not None else self._params_device
        shard = SLShard(f"{name}.{self._part}", self.output_size, self.input_size, self.sl_config, cols=self.cols,
                        dtype=self._params_dtype, device=device)
        self.parts[self._part] = shard
        mark_partial_tp_grad(shard.B, self.tp_group if self.tp_size > 1 else None)

    @property
    def scale(self) -> float:
        return self.sl_config.scale

    def forward(self, input_: torch.Tensor):
        if self.layer_name is None:
            raise unnamed_error(self)
        group = self.tp_group if self.tp_size > 1 else None
        x = input_
        if group is not None and not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(input_, group=group)
        (p,) = self.parts.values()
        y = sl_linear(x, p.B, p.A, p.values, p.layout, self.scale, path=self.sl_config.path,
                      save_xa=self.sl_config.save_xa)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, group=group)
        elif group is not None:
            y = reduce_from_tensor_model_parallel_region(y, group=group)
        bias = self.bias
        if self.skip_bias_add:
            return y, bias
        return (y if bias is None else y + bias), None

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The local shard of W ([out, in/tp]): columns cols[0]:cols[1]."""
        if self.layer_name is None:
            raise unnamed_error(self)
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
