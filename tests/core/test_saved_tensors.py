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


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_save_xa_keeps_one_tokens_by_rank_tensor_and_changes_no_result(path):
    """save_xa: the factored path also saves x·Aᵀ ([tokens, r]) and backward reads it; the dense
    path saves nothing more; outputs and every gradient are bitwise those without it."""
    from megatron_sl.core.functional import sl_linear

    in_f, out_f, rank, tokens = 40, 24, 4, 10
    layer = SLLinear(in_f, out_f, rank, 0.1, alpha=8.0, name="saved", path=path)
    x0 = torch.randn(tokens, in_f)
    runs = {}
    for save in (False, True):
        x = x0.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = sl_linear(x, layer.B, layer.A, layer.values, layer.layout, layer.scale, path=path, save_xa=save)
        layer.zero_grad()
        (y * torch.linspace(-1, 1, out_f)).sum().backward()
        runs[save] = (saved, [y, x.grad, layer.B.grad, layer.A.grad, layer.values.grad])
    (plain, ref), (kept, got) = runs[False], runs[True]
    shapes = [tuple(t.shape) for t in plain]
    extra = [t for t in kept if tuple(t.shape) not in shapes or shapes.remove(tuple(t.shape))]
    if path == "factored":
        assert [tuple(t.shape) for t in extra] == [(tokens, rank)], [tuple(t.shape) for t in kept]
        assert torch.equal(extra[0], x0 @ layer.A.detach().t())
    else:
        assert extra == [] and len(kept) == len(plain), [tuple(t.shape) for t in kept]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
