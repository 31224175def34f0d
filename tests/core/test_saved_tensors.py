"""The autograd graph saves no tensor with out·in elements and no copy of A (checked with
saved_tensors_hooks); backward recomputes what it needs."""

import pytest
import torch

from megatron_sl.core import SLLinear


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_graph_saves_only_inputs_and_parameters(path):
    in_f, out_f, rank, tokens = 40, 24, 4, 10  # out·in = 960 is unique among all shapes here
    layer = SLLinear(in_f, out_f, rank, 0.1, alpha=8.0, name="saved", path=path)
    x = torch.randn(tokens, in_f, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved, "the SL Function must save its inputs"
    params = {layer.B.data_ptr(), layer.A.data_ptr(), layer.values.data_ptr()}
    for t in saved:
        assert t.numel() != out_f * in_f, f"saved a tensor with out*in elements: {tuple(t.shape)}"
        if tuple(t.shape) == (rank, in_f):
            assert t.data_ptr() == layer.A.data_ptr(), "saved a copy of A (e.g. a scaled A) instead of A"
        assert t.data_ptr() in params | {x.data_ptr()}, f"saved an intermediate {tuple(t.shape)}"
    y.sum().backward()
    assert layer.A.grad is not None and x.grad is not None
