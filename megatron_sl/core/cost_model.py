"""Cost model that picks, per SL layer and token count T, how to run forward + backward.

Two exact paths compute y = x (s·B A + S)^T:

* ``dense``: materialise W = s·B A + S in forward and again in backward (nothing out x in is
  saved), then dense GEMMs; the values' gradient is a gather from the transient dense grad W.
  GEMM FLOPs: 6·T·m·n (the dense layer's) + 8·m·n·r (W twice, dB, dA), so its ratio to a dense
  layer is at least 1 + 4r/(3T) -- 1.33 at r=128, T=512.
* ``factored``: never form W: y = s·(x Aᵀ) Bᵀ + x Sᵀ; backward uses the low-rank chain, an SpMM
  with Sᵀ and an SDDMM for the values. GEMM FLOPs: 8·T·n·r + 6·T·m·r (x Aᵀ is recomputed in
  backward, not saved), plus 6·T·nnz sparse FLOPs that run at a fraction ``rho`` of GEMM
  efficiency.

cost(dense) = 6Tmn + 8mnr;  cost(factored) = 8Tnr + 6Tmr + 6·T·nnz / rho.
The factored path wins when r(m+n) is well below m·n and sparse kernels are not too slow:
``rho`` was measured on this project's CPU machines at 0.12-0.18 (CSR SpMM ≈ 24% and
``sampled_addmm`` ≈ 17% of the dense GEMM time at 3% density, 1 thread). On GPUs, unstructured
SpMM reaches roughly 1-2% of tensor-core GEMM efficiency (an estimate, not measured here), so
the default ``rho`` there is 0.02 and the dense path wins except at very small T.
Override with the environment variable ``MEGATRON_SL_SPARSE_EFFICIENCY``.
"""

from __future__ import annotations

import os

DEFAULT_RHO = {"cpu": 0.12, "cuda": 0.02}


def sparse_efficiency(device_type: str) -> float:
    env = os.environ.get("MEGATRON_SL_SPARSE_EFFICIENCY")
    if env:
        rho = float(env)
        if not rho > 0:
            raise ValueError(f"MEGATRON_SL_SPARSE_EFFICIENCY={env!r} must be > 0")
        return rho
    return DEFAULT_RHO.get(device_type, DEFAULT_RHO["cuda"])


def path_costs(tokens: int, out_features: int, in_features: int, rank: int, nnz: int, rho: float):
    """GEMM-equivalent FLOPs of forward + backward for both paths."""
    t, m, n, r = tokens, out_features, in_features, rank
    dense = 6 * t * m * n + 8 * m * n * r
    factored = 8 * t * n * r + 6 * t * m * r + 6 * t * nnz / rho
    return {"dense": dense, "factored": factored}


def choose_path(tokens: int, out_features: int, in_features: int, rank: int, nnz: int,
                device_type: str = "cpu") -> str:
    costs = path_costs(tokens, out_features, in_features, rank, nnz, sparse_efficiency(device_type))
    return "factored" if costs["factored"] < costs["dense"] else "dense"
