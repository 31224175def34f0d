"""SLLinear numerics: output and every gradient equal autograd through the dense reference
W = s·B A + S (float64), for both execution paths, odd shapes, ranks and densities."""

import pytest
import torch
import torch.nn.functional as F

from megatron_sl.core import SLLinear

SHAPES = [(13, 7), (7, 13), (1, 5), (16, 16), (33, 9)]  # (in, out)


def dense_reference(layer: SLLinear):
    """Leaf copies of the parameters and the autograd-differentiable dense W built from them."""
    B = layer.B.detach().clone().requires_grad_()
    A = layer.A.detach().clone().requires_grad_()
    v = layer.values.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_() if layer.bias is not None else None
    W = (layer.scale * B @ A).reshape(-1).index_add(0, layer.idx.long(), v).reshape(layer.out_features, -1)
    return W, (B, A, v, b)


def check_against_reference(layer, x, atol=1e-10, rtol=1e-10):
    with torch.no_grad():  # B starts at zero; make the low-rank part non-trivial
        layer.B.normal_()
    x1 = x.clone().requires_grad_()
    y = layer(x1)
    W, (B, A, v, b) = dense_reference(layer)
    x2 = x.clone().requires_grad_()
    y_ref = F.linear(x2, W, b)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.to_dense(), W.detach(), atol=atol, rtol=rtol)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.B.grad, B.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.A.grad, A.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.values.grad, v.grad, atol=atol, rtol=rtol)
    if b is not None:
        torch.testing.assert_close(layer.bias.grad, b.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_dense_reference(path, in_f, out_f, density, bias):
    for rank in sorted({1, min(in_f, out_f)}):
        layer = SLLinear(in_f, out_f, rank, density, alpha=3.0, bias=bias, seed=5, name=f"l{in_f}x{out_f}",
                         dtype=torch.float64, path=path)
        check_against_reference(layer, torch.randn(3, 4, in_f, dtype=torch.float64))


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_tiny_density_single_nonzero(path):
    layer = SLLinear(10, 10, 2, 0.011, alpha=2.0, name="one", dtype=torch.float64, path=path)
    assert layer.nnz == 1
    check_against_reference(layer, torch.randn(5, 10, dtype=torch.float64))


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_rows_without_nonzeros(path):
    # 40 rows, 3 nnz: most rows are empty; exercise the CSR row pointers
    layer = SLLinear(6, 40, 3, 3 / 240 + 1e-9, alpha=1.0, name="sparse-rows", dtype=torch.float64, path=path)
    assert layer.nnz == 3
    check_against_reference(layer, torch.randn(7, 6, dtype=torch.float64))


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_gradcheck(path):
    layer = SLLinear(5, 4, 2, 0.3, alpha=2.0, bias=True, name="gc", dtype=torch.float64, path=path)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    A = layer.A.detach().clone().requires_grad_()
    v = layer.values.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def f(x, B, A, v, b):
        return layer.impl(x, B, A, v, layer.layout, layer.scale, bias=b, path=path)

    assert torch.autograd.gradcheck(f, (x, B, A, v, b))


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_bf16_close_to_float64(path):
    layer = SLLinear(48, 80, 8, 0.05, alpha=8.0, bias=True, name="bf", dtype=torch.bfloat16, path=path)
    with torch.no_grad():
        layer.B.normal_(std=0.1)
    x = torch.randn(16, 48)
    ref = SLLinear(48, 80, 8, 0.05, alpha=8.0, bias=True, name="bf", dtype=torch.float64, path=path)
    ref.load_state_dict({k: t.double() for k, t in layer.state_dict().items() if not k.endswith("_extra_state")},
                        strict=False)
    y = layer(x.bfloat16().requires_grad_())
    y_ref = ref(x.double())
    torch.testing.assert_close(y.double(), y_ref, atol=0.05, rtol=0.05)
    y.float().square().sum().backward()
    y_ref.square().sum().backward()
    for name in ("B", "A", "values", "bias"):
        g, g_ref = getattr(layer, name).grad.double(), getattr(ref, name).grad
        assert (g - g_ref).norm() <= 0.03 * g_ref.norm() + 1e-6, name


def test_both_paths_agree_and_auto_picks_one():
    torch.manual_seed(0)
    layers = {p: SLLinear(24, 40, 4, 0.1, alpha=4.0, name="same", dtype=torch.float64, path=p)
              for p in ("dense", "factored", "auto")}
    x = torch.randn(9, 24, dtype=torch.float64)
    with torch.no_grad():
        B = torch.randn(40, 4, dtype=torch.float64)
        for layer in layers.values():
            layer.B.copy_(B)
    outs = {p: layer(x) for p, layer in layers.items()}
    torch.testing.assert_close(outs["dense"], outs["factored"])
    torch.testing.assert_close(outs["auto"], outs["dense"])


def test_to_dense_and_report():
    layer = SLLinear(64, 32, 8, 0.05, alpha=16.0, name="rep")
    W = layer.to_dense()
    assert W.shape == (32, 64)
    # B is zero at init: W == S, with exactly nnz non-zeros at the support
    assert int((W != 0).sum()) == layer.nnz == int(0.05 * 32 * 64)
    assert torch.equal(W.view(-1)[layer.idx.long()], layer.values.detach())
    rep = layer.param_report()
    assert rep["low_rank"] == 8 * (32 + 64)
    assert rep["sparse"] == layer.nnz
    assert rep["index_bytes_per_nnz"] == 4
    assert rep["index_bytes"] == 4 * layer.nnz
    assert rep["trainable"] == sum(p.numel() for p in layer.parameters())


def test_init_matches_paper():
    layer = SLLinear(400, 300, 16, 0.1, alpha=32.0, name="init")
    bound = 1 / 400 ** 0.5
    assert torch.count_nonzero(layer.B) == 0
    for t in (layer.A, layer.values):
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.9 * bound  # really uniform over the full range
        assert abs(float(t.detach().mean())) < 0.1 * bound
    # same (seed, name) -> same init; different name -> different
    again = SLLinear(400, 300, 16, 0.1, alpha=32.0, name="init")
    other = SLLinear(400, 300, 16, 0.1, alpha=32.0, name="other")
    assert torch.equal(layer.A, again.A) and not torch.equal(layer.A, other.A)


def test_extra_state_checks_support():
    a = SLLinear(20, 10, 2, 0.2, alpha=1.0, seed=1, name="l")
    b = SLLinear(20, 10, 2, 0.2, alpha=1.0, seed=2, name="l")
    b.load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="support metadata mismatch"):
        b.load_state_dict(a.state_dict())


def test_factored_path_over_several_token_blocks():
    from megatron_sl.core import functional
    T = 2 * functional.TOKEN_CHUNK + 77  # three blocks, the last one ragged
    layer = SLLinear(12, 9, 3, 0.2, alpha=2.0, bias=True, name="blocks", dtype=torch.float64, path="factored")
    check_against_reference(layer, torch.randn(T, 12, dtype=torch.float64))
