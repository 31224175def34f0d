"""SLShard: one tensor-parallel rank's share of one SL matrix W = s·B A + S (out × in).

Owns the sharding rule of a single factorised matrix ("part": q, k, v, o, gate, up or down):

* row shard (column-parallel layers): the rank keeps an arbitrary list of global rows of W, i.e.
  those rows of B and of S; A is replicated.
* column shard (row-parallel layers): the rank keeps columns [c0, c1) of W, i.e. those columns
  of A and of S; B is replicated.

The shard's support is the part of the global support inside its rows or columns, sampled with
``core.support.sample_support(..., rows=/cols=)`` which generates only the support tiles the
shard touches (a 7B rank does not draw the whole matrix). A is drawn in full from the part's
generator ``init_generator(seed, name)`` and sliced; each sparse value comes from its support
tile's per-entry draw; B starts at zero. So every TP size holds the same W, and at TP=1 a part
equals ``SLLinear(in, out, ..., seed=seed, name=name)``.

Tensor-parallel attributes (read by megatron's grad-norm / DeepSpeed's ``is_model_parallel_parameter``):
the sharded factor (B of a row shard: partition_dim 0; A of a column shard: partition_dim 1) and
the 1-D ``values`` (partition_dim 0) are tagged ``tensor_model_parallel``; the replicated factor
carries no tag (its gradient is summed over TP inside ``sl_linear``; see ``layers``). For megatron's
layouts, concatenating a part's ``values`` over ranks in rank order gives the global support order
for row shards (each rank holds a contiguous block of the part's rows); for column shards it does
not, so every ``values`` parameter carries ``sl_global_index_fn``, a function returning the global
flat row-major index of each local entry (sorting gathered values by it gives the global support
order) -- a function, so no extra index bytes stay resident. TP=1 layers are tagged too (as
megatron does).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from megatron_sl.core import support as sup
from megatron_sl.core.config import SLConfig, validate_shape
from megatron_sl.core.functional import SupportLayout
from megatron_sl.core.linear import init_generator, uniform_, values_init


def _tag(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


class SLShard(nn.Module):
    """Parameters B, A, values of one part's shard plus its local support layout.

    Args:
        name: stable global name of the matrix (the support and init are seeded by it).
        out_features, in_features: the global shape of the part.
        sl_config: rank, density, alpha, seed.
        rows: global rows kept (row shard), or None.
        cols: (c0, c1) global columns kept (column shard), or None. Exactly one of rows/cols.
        dtype, device: parameter dtype / device (init happens on CPU in float32, then is copied).

    Attributes ``rows`` (global rows kept, or None) and ``cols`` ((c0, c1), or None) record the shard.
    """

    def __init__(self, name: str, out_features: int, in_features: int, sl_config: SLConfig, *,
                 rows: Optional[Sequence[int] | torch.Tensor] = None, cols: Optional[Tuple[int, int]] = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if (rows is None) == (cols is None):
            raise ValueError("SLShard needs exactly one of rows= (row shard) or cols= (column shard)")
        try:
            validate_shape(in_features, out_features, sl_config.rank)
        except ValueError as e:
            raise ValueError(f"SL matrix {name!r} ({out_features}x{in_features}): {e}") from None
        self.name, self.global_shape = name, (out_features, in_features)
        self.rank, self.density, self.seed = sl_config.rank, sl_config.density, sl_config.seed
        r = sl_config.rank

        self.global_nnz = sup.nnz_for(out_features, in_features, sl_config.density)
        bound = 1.0 / math.sqrt(in_features)
        A_full = uniform_(torch.empty(r, in_features), bound, init_generator(sl_config.seed, name))

        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.int64)
            sample = sup.sample_support(out_features, in_features, sl_config.density, sl_config.seed, name, rows=rows)
            local_idx, pos = sup.select_rows(sample.idx, in_features, rows)
            shape = (rows.numel(), in_features)
            A_local = A_full
            self.rows, self.cols = rows, None
            self.shard = ("rows", sup.support_hash(rows, (rows.numel(), 1)))
        else:
            c0, c1 = int(cols[0]), int(cols[1])
            if not 0 <= c0 < c1 <= in_features:
                raise ValueError(f"column shard {cols} out of range for {name!r} with {in_features} columns")
            sample = sup.sample_support(out_features, in_features, sl_config.density, sl_config.seed, name,
                                        cols=(c0, c1))
            local_idx, pos = sup.select_cols(sample.idx, out_features, in_features, c0, c1)
            shape = (out_features, c1 - c0)
            A_local = A_full[:, c0:c1]
            self.rows, self.cols = None, (c0, c1)
            self.shard = ("cols", c0, c1)
        self.local_shape = shape
        self.index_hash = sup.support_hash(local_idx, shape)
        # the canonical index lives with the parameters (moved by .to()); it is all that stays resident
        self.register_buffer("idx", local_idx.to(device=device), persistent=False)
        self.layout = SupportLayout(self.idx, *shape)

        f = {"dtype": dtype, "device": device}
        self.B = nn.Parameter(torch.zeros(shape[0], r, **f))
        self.A = nn.Parameter(A_local.to(**f).contiguous())
        self.values = nn.Parameter(values_init(sample.uniform[pos], bound).to(**f))
        self.values.sl_global_index_fn = self.global_flat_index
        if rows is not None:
            _tag(self.B, 0)
        else:
            _tag(self.A, 1)
        _tag(self.values, 0)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.layout = SupportLayout(self.idx, *self.local_shape)
        return out

    def global_flat_index(self) -> torch.Tensor:
        """Global flat row-major index (int64) of each local support entry, in local order."""
        local = self.idx.to(device="cpu", dtype=torch.int64)
        width = self.local_shape[1]
        r, c = local // width, local % width
        if self.rows is not None:
            return self.rows[r] * self.global_shape[1] + c
        return r * self.global_shape[1] + c + self.cols[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @torch.no_grad()
    def to_dense(self, scale: float) -> torch.Tensor:
        """This shard of W (local rows or columns), in the parameter dtype."""
        W = torch.mm(self.B, self.A).mul_(scale)
        W.view(-1).index_add_(0, self.layout.flat(W.device), self.values)
        return W

    def get_extra_state(self):
        return {"name": self.name, "shape": list(self.global_shape), "density": self.density, "seed": self.seed,
                "rank": self.rank, "global_nnz": self.global_nnz, "index_hash": self.index_hash,
                "shard": list(self.shard)}

    def set_extra_state(self, state):
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"SL support metadata mismatch for {self.name!r} (a different seed, density, shape or "
                             f"TP layout): checkpoint {state} vs model {mine}")

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, global_shape={self.global_shape}, local_shape={self.local_shape}, "
                f"rank={self.rank}, nnz={self.nnz}/{self.global_nnz}, shard={self.shard[0]}")
