"""Cost model that picks, per SL layer and token count T, how to run forward + backward.

Two exact paths compute y = x (s·B A + S)^T:

* ``dense``: materialise W = s·B A + S in forward and again in backward (nothing out x in is
  saved), then dense GEMMs; the values' gradient is a gather from the transient dense grad W.
  GEMM FLOPs: 6·T·m·n (the dense layer's) + 8·m·n·r (W twice, dB, dA), so its ratio to a dense
  layer is at least 1 + 4r/(3T) -- 1.33 at r=128, T=512.
* ``factored``: never form W: y = s·(x Aᵀ) Bᵀ + x Sᵀ; backward uses the low-rank chain, an SpMM
  with Sᵀ and an SDDMM for the values. GEMM FLOPs: 8·T·n·r + 6·T·m·r (x Aᵀ is recomputed in
  backward, not saved), plus the two SpMMs (4·T·nnz sparse FLOPs at a fraction ``rho`` of GEMM
  efficiency) and the SDDMM: on CPU torch's ``sampled_addmm`` (2·T·nnz at ``rho``); on CUDA the
  Triton tiled SDDMM does the tensor-core GEMM of every tile that holds a support entry, i.e.
  about a dense dYᵀX (2·T·m·n).

cost(dense) = 6Tmn + 8mnr
cost(factored) = 8Tnr + 6Tmr + 4·T·nnz/rho + (2·T·nnz/rho on CPU | 2·T·m·n on CUDA).
The factored path wins when r(m+n) is well below m·n and sparse kernels are not too slow:
``rho`` on CPU is that of the numba kernels a one-thread rank runs (``megatron_sl.kernels.cpu_kernels``),
measured by ``benchmarks/bench_kernels.py`` at 0.11-0.12 (the SpMM takes 25-27% of the dense GEMM
time at 3% density, T = 256-4096, 1 thread; torch's CSR reference about half that efficiency). On GPUs, unstructured
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


def path_costs(tokens: int, out_features: int, in_features: int, rank: int, nnz: int, rho: float,
               device_type: str = "cpu"):
    """GEMM-equivalent FLOPs of forward + backward for both paths."""
    t, m, n, r = tokens, out_features, in_features, rank
    dense = 6 * t * m * n + 8 * m * n * r
    sddmm = 2 * t * nnz / rho if device_type == "cpu" else (2 * t * m * n if nnz else 0)
    factored = 8 * t * n * r + 6 * t * m * r + 4 * t * nnz / rho + sddmm
    return {"dense": dense, "factored": factored}


def choose_path(tokens: int, out_features: int, in_features: int, rank: int, nnz: int,
                device_type: str = "cpu") -> str:
    costs = path_costs(tokens, out_features, in_features, rank, nnz, sparse_efficiency(device_type), device_type)
    return "factored" if costs["factored"] < costs["dense"] else "dense"
