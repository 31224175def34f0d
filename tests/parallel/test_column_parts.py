"""The column layer's Function (``_ColumnSL``) over several parts in one process (TP=1), float64,
against a plain-torch dense reference: parts of odd sizes, one without support, a permuted local
layout, and every mix of the two execution paths across parts (the factored parts' sparse products
run stacked in one call, the dense parts fold S into W), with and without ``save_xa``: output, dX
and every parameter gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_sl.core.reference import SupportLayout, densify_reference
from megatron_sl.core.support import global_support
from megatron_sl.parallel import layers

N_IN, RANK, SCALE, TOKENS = 13, 3, 0.7, 9
SIZES = (7, 5, 9)  # part output sizes; the middle part gets no support


def _parts():
    g = torch.Generator().manual_seed(3)
    layouts, params = [], []
    for i, m in enumerate(SIZES):
        idx = torch.empty(0, dtype=torch.int32) if i == 1 else global_support(m, N_IN, 0.3, 4, f"part{i}")
        layouts.append(SupportLayout(idx, m, N_IN))
        params += [torch.randn(m, RANK, generator=g, dtype=torch.float64).requires_grad_(),
                   torch.randn(RANK, N_IN, generator=g, dtype=torch.float64).requires_grad_(),
                   torch.randn(idx.numel(), generator=g, dtype=torch.float64).requires_grad_()]
    return layouts, params


@pytest.mark.parametrize("paths,save_xa", [(p, s) for p in itertools.product(("dense", "factored"), repeat=3)
                                           for s in (False, True) if s is False or "factored" in p])
def test_column_parts_match_dense_reference(monkeypatch, paths, save_xa):
    layouts, params = _parts()
    out = sum(SIZES)
    perm = torch.randperm(out, generator=torch.Generator().manual_seed(5))  # local layout <- part-major
    chosen = iter(paths * 2)  # forward asks per part; backward reuses the forward's choice
    monkeypatch.setattr(layers, "choose", lambda *a: next(chosen))
    x = torch.randn(TOKENS, N_IN, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(TOKENS, out, dtype=torch.float64)
    y = layers._ColumnSL.apply(x, None, False, layouts, perm, torch.argsort(perm), SCALE, "auto", save_xa, out,
                               *params)
    y.backward(dy)
    got = [x.grad] + [p.grad for p in params]

    ref_params = [p.detach().clone().requires_grad_() for p in params]
    xr = x.detach().clone().requires_grad_()
    W = torch.cat([densify_reference(ref_params[3 * i], ref_params[3 * i + 1], ref_params[3 * i + 2],
                                     lay.idx.long(), SCALE) for i, lay in enumerate(layouts)])
    yr = xr @ W[perm].t()
    yr.backward(dy)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(["x"] + [f"{k}{i}" for i in range(3) for k in ("B", "A", "values")], got,
                          [xr.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in ref_params]):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"grad {name}: {m}")
