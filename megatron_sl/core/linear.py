"""SLLinear: a single-device linear layer with W = (alpha/rank)·B A + S.

Parameters are ``B`` (out x r, zero-initialised), ``A`` (r x in) and ``values`` (nnz), with A and
values drawn U(±1/√in) as in the SLTrain paper, from a generator seeded by (seed, name) so the
same layer is initialised identically in every process and under every parallel layout.
``density=0`` is the paper's Low-Rank baseline; a dense ``nn.Linear`` stays the full-rank one.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from . import support as sup
from .config import validate_common, validate_shape
from .functional import SupportLayout, sl_linear


def init_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(sup.derive_seed(seed, name, "init"))


def uniform_(t: torch.Tensor, bound: float, generator: torch.Generator) -> torch.Tensor:
    """In-place U(-bound, bound) drawn on CPU in float32 from ``generator`` (device/dtype-independent)."""
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound))
    return t


def values_init(unit_uniform: torch.Tensor, bound: float) -> torch.Tensor:
    """Sparse values U(-bound, bound) from per-entry draws in [0, 1)."""
    return unit_uniform.mul(2 * bound).sub_(bound)


class SLLinear(nn.Module):
    """y = x Wᵀ + b with W = (alpha / rank)·B @ A + S, S on a fixed random support.

    Args:
        in_features, out_features: the dense shape (W is out x in).
        rank: r in [1, min(in, out)].
        density: delta in [0, 1); nnz = floor(delta·out·in).
        alpha: scale s = alpha / rank.
        bias: add a bias (init U(±1/√out), like the research code).
        seed, name: the support and init come from a generator seeded by (seed, name).
        dtype, device: parameter dtype (floating) and device.
        path: "auto" (cost model), "dense" or "factored"; see ``core.cost_model``.
        impl: optional replacement for ``core.functional.sl_linear`` (same signature). The default
            already runs the Triton kernels on CUDA tensors (``core.ops``), whatever was imported.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float, alpha: float,
                 bias: bool = False, seed: int = 0, name: str = "", *, dtype: Optional[torch.dtype] = None,
                 device=None, path: str = "auto", impl: Optional[Callable] = None):
        super().__init__()
        validate_common(rank, density, alpha)
        validate_shape(in_features, out_features, rank)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype")
        if path not in ("auto", "dense", "factored"):
            raise ValueError(f"path={path!r} must be 'auto', 'dense' or 'factored'")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.density, self.alpha = rank, float(density), float(alpha)
        self.seed, self.name, self.path = int(seed), str(name), path
        self.impl = impl or sl_linear

        sample = sup.sample_support(out_features, in_features, density, seed, name)
        idx = sample.idx.to(sup.index_dtype(out_features * in_features))
        self.register_buffer("idx", idx, persistent=False)
        self.layout = SupportLayout(self.idx, out_features, in_features)
        factory = {"dtype": dtype, "device": device}
        self.B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.values = nn.Parameter(torch.empty(idx.numel(), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters(sample)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def reset_parameters(self, sample: Optional[sup.SupportSample] = None) -> None:
        """B = 0; A and values U(±1/√in): A from the layer's init generator, each sparse value
        from its support tile's generator (``support.sample_support``), so any shard of the
        layer can be initialised identically without drawing the others."""
        if sample is None:
            sample = sup.sample_support(self.out_features, self.in_features, self.density, self.seed, self.name)
        g = init_generator(self.seed, self.name)
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.B.zero_()
            self.values.copy_(values_init(sample.uniform, bound))
        uniform_(self.A, bound, g)
        if self.bias is not None:
            uniform_(self.bias, 1.0 / math.sqrt(self.out_features), g)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.layout = SupportLayout(self.idx, self.out_features, self.in_features)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x, self.B, self.A, self.values, self.layout, self.scale, bias=self.bias, path=self.path)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """W = s·B A + S (out x in), in the parameter dtype."""
        W = torch.mm(self.B, self.A).mul_(self.scale)
        W.view(-1).index_add_(0, self.idx.to(W.device), self.values)
        return W

    def param_report(self) -> dict:
        """Parameter counts and bytes split into low-rank, sparse values and index."""
        return param_report(self.out_features, self.in_features, self.rank, self.nnz,
                            self.B.element_size(), self.idx.element_size(),
                            self.bias.numel() if self.bias is not None else 0)

    def get_extra_state(self):
        return {"seed": self.seed, "name": self.name, "density": self.density,
                "shape": [self.out_features, self.in_features], "nnz": self.nnz,
                "index_hash": sup.support_hash(self.idx.cpu(), (self.out_features, self.in_features))}

    def set_extra_state(self, state):
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"SL support metadata mismatch for layer {self.name!r}: checkpoint {state} vs model {mine}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density}, alpha={self.alpha}, nnz={self.nnz}, bias={self.bias is not None}, "
                f"name={self.name!r}")


def param_report(out_features: int, in_features: int, rank: int, nnz: int, value_bytes: int,
                 index_bytes_per_nnz: int, bias: int = 0) -> dict:
    low_rank = rank * (out_features + in_features)
    return {
        "dense_equivalent": out_features * in_features,
        "low_rank": low_rank,
        "sparse": nnz,
        "bias": bias,
        "trainable": low_rank + nnz + bias,
        "index_bytes": nnz * index_bytes_per_nnz,
        "index_bytes_per_nnz": index_bytes_per_nnz,
        "param_bytes": (low_rank + nnz + bias) * value_bytes,
    }
