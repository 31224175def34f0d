"""SLColumnParallelLinear / SLRowParallelLinear at TP=2 and TP=4 (gloo, CPU, float64) against
three references, for the four megatron slots (qkv with GQA, proj, gated fc1 with stride 2, fc2),
with and without sequence parallel, bias on/off, both execution paths, odd shapes.

Per case, on every rank:
1. plain-torch dense reference: the global per-part matrices W_p = s·B_p A_p + S_p (float64,
   autograd leaves B_p, A_p, values_p, bias) assembled by this test into megatron's fused global
   layout (GQA interleave / [gate; up]); y = x Wᵀ + b. The layer's local output and dX must equal
   the matching slice, and every parameter gradient, gathered over TP, the reference gradient.
2. megatron's own ColumnParallelLinear / RowParallelLinear (same TP group, same sequence-parallel
   setting) holding the materialised W: a probe init reveals which global rows/columns megatron
   puts on each rank; they must equal ours, and output / dX must match megatron's.
3. the same SL layer at TP=1 (a single-rank group): output and every gradient must equal the
   gathered TP=N ones, and the TP=N init (A, values) must gather to the TP=1 init.

Failure hints: a layout error shows up in step 2 (rows) and in y; a missing TP reduction of a
replicated factor (A for column, B or the SP bias for row layers) only in its gradient; a wrong
sequence-parallel gather/scatter in dX and y under ``sp=True``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import megatron.core  # noqa: F401 -- import once in the parent; forked ranks inherit it
from _dist import gather_sharded, init_megatron, run_distributed
from megatron_sl.parallel.grad_sync import finalize_sl_grads

D, NP, NG, HN, F = 37, 4, 2, 5, 20          # hidden, heads, query groups, head dim, ffn (all odd-ish)
S, BATCH = 12, 3                             # sequence (divisible by 2 and 4 for SP), micro-batch
RANK, DENSITY, ALPHA, SEED = 4, 0.3, 8.0, 11
SLOTS = {  # slot -> (kind, in, out, stride, megatron's skip_bias_add)
    "qkv": ("column", D, (NP + 2 * NG) * HN, 1, False),
    "proj": ("row", NP * HN, D, 1, True),
    "fc1": ("column", D, 2 * F, 2, True),
    "fc2": ("row", F, D, 1, True),
}
TOL = dict(rtol=1e-9, atol=1e-10)


def _config(tp, sp, bias):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=NP, num_query_groups=NG, kv_channels=HN,
                             ffn_hidden_size=F, gated_linear_unit=True, add_bias_linear=bias,
                             tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                             perform_initialization=True, params_dtype=torch.float64,
                             gradient_accumulation_fusion=False)


def _build_sl(slot, config, group, sl_config, bias, skip_bias_add):
    from megatron_sl.parallel import SLColumnParallelLinear, SLRowParallelLinear

    kind, fin, fout, stride, _ = SLOTS[slot]
    common = dict(config=config, init_method=None, bias=bias, skip_bias_add=skip_bias_add, is_expert=False,
                  tp_comm_buffer_name=slot, tp_group=group, sl_config=sl_config, layer_name=f"case.{slot}")
    if kind == "column":
        return SLColumnParallelLinear(fin, fout, gather_output=False, stride=stride, **common)
    return SLRowParallelLinear(fin, fout, input_is_parallel=True, **common)


def _fuse(slot, W):
    """The test's own assembly of megatron's global fused layout from per-part matrices."""
    if slot == "qkv":
        per = NP // NG * HN
        return torch.cat([torch.cat([W["q"][g * per:(g + 1) * per], W["k"][g * HN:(g + 1) * HN],
                                     W["v"][g * HN:(g + 1) * HN]]) for g in range(NG)])
    if slot == "fc1":
        return torch.cat([W["gate"], W["up"]])
    (w,) = W.values()
    return w


def _randomize(layer, slot, gen):
    """Random global B per part and bias (B starts at 0, which would make dA vanish); returns them."""
    B_global = {}
    for name, part in layer.parts.items():
        B = torch.randn(part.global_shape[0], RANK, generator=gen, dtype=torch.float64) * 0.3
        B_global[name] = B
        part.B.data.copy_(B[part.rows] if part.rows is not None else B)
    bias_global = torch.randn(SLOTS[slot][2], generator=gen, dtype=torch.float64)
    if layer.bias is not None:
        kind = SLOTS[slot][0]
        layer.bias.data.copy_(bias_global[layer.global_rows] if kind == "column" else bias_global)
    return B_global, bias_global


def _reference(slot, parts_global, bias_global, use_bias, x, g, scale):
    """float64 dense reference: y, dx, and grads of B, A, values per part and of the bias."""
    from megatron_sl.core.support import global_support

    leaves, W = {}, {}
    for name, (B, A, v, out, inp) in parts_global.items():
        B, A, v = (t.clone().requires_grad_(True) for t in (B, A, v))
        idx = global_support(out, inp, DENSITY, SEED, f"case.{slot}.{name}").long()
        Sm = torch.zeros(out * inp, dtype=torch.float64).scatter_add(0, idx, v).view(out, inp)
        W[name] = scale * B @ A + Sm
        leaves[name] = (B, A, v)
    Wf = _fuse(slot, W)
    b = bias_global.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y = xr @ Wf.t() + (b if use_bias else 0)
    (y * g).sum().backward()
    grads = {name: tuple(t.grad for t in ts) for name, ts in leaves.items()}
    return y.detach(), xr.grad, grads, b.grad, Wf.detach()


def _megatron_layer(slot, config, group, bias, skip_bias_add, W_fused, bias_global):
    """megatron's own layer holding W; a probe init first tells which rows/cols it keeps."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    kind, fin, fout, stride, _ = SLOTS[slot]
    if kind == "column":
        probe = lambda w: w.copy_(torch.arange(fout, dtype=w.dtype)[:, None].expand(fout, fin))  # noqa: E731
        m = ColumnParallelLinear(fin, fout, config=config, init_method=probe, bias=bias, gather_output=False,
                                 stride=stride, skip_bias_add=skip_bias_add, tp_group=group)
        index = m.weight[:, 0].round().long()
        m.weight.data.copy_(W_fused[index])
        if bias:
            m.bias.data.copy_(bias_global[index])
    else:
        probe = lambda w: w.copy_(torch.arange(fin, dtype=w.dtype)[None, :].expand(fout, fin))  # noqa: E731
        m = RowParallelLinear(fin, fout, config=config, init_method=probe, bias=bias, input_is_parallel=True,
                              skip_bias_add=skip_bias_add, tp_group=group)
        index = m.weight[0, :].round().long()
        m.weight.data.copy_(W_fused[:, index])
        if bias:
            m.bias.data.copy_(bias_global)
    return m, index


def _run(layer, x_local, g_local):
    x = x_local.clone().requires_grad_(True)
    y, b = layer(x)
    if b is not None:
        y = y + b
    (y * g_local).sum().backward()
    finalize_sl_grads(layer)  # replicated factors (and the SP row bias): partial gradients summed over TP
    return y.detach(), x.grad


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a, b, **TOL), f"{what}: max abs diff {(a - b).abs().max().item():.3e}"


def _case(rank, tp, group1, slot, sp, bias, path):
    from megatron.core import parallel_state as ps

    from megatron_sl.core import SLConfig

    kind, fin, fout, stride, mega_skip = SLOTS[slot]
    skip = mega_skip if path == "dense" else not mega_skip  # both skip_bias_add settings get covered
    tpg = ps.get_tensor_model_parallel_group()
    slc = SLConfig(rank=RANK, density=DENSITY, alpha=ALPHA, seed=SEED, path=path)
    layer = _build_sl(slot, _config(tp, sp, bias), tpg, slc, bias, skip)
    layer1 = _build_sl(slot, _config(1, False, bias), group1, slc, bias, skip)

    # init is TP-invariant: gathered A / values equal the TP=1 layer's
    for name, part in layer.parts.items():
        for attr in ("A", "values"):
            full = gather_sharded(getattr(part, attr).data, getattr(part, attr), tpg)
            _close(full, getattr(layer1.parts[name], attr).data, f"init {name}.{attr}")

    gen = torch.Generator().manual_seed(5)
    B_global, bias_global = _randomize(layer, slot, gen)
    _randomize(layer1, slot, torch.Generator().manual_seed(5))
    parts_global = {name: (B_global[name], p1.A.data, p1.values.data, *p1.global_shape)
                    for name, p1 in layer1.parts.items()}
    x = torch.randn(S, BATCH, fin, generator=gen, dtype=torch.float64)
    g = torch.randn(S, BATCH, fout, generator=gen, dtype=torch.float64)
    y_ref, dx_ref, grads_ref, db_ref, W_fused = _reference(slot, parts_global, bias_global, bias, x, g, slc.scale)

    seq = slice(rank * S // tp, (rank + 1) * S // tp) if sp else slice(None)
    if kind == "column":
        rows = layer.global_rows
        x_loc, g_loc = x[seq], g[:, :, rows]
        y_exp, dx_exp = y_ref[:, :, rows], dx_ref[seq]
        W_local = W_fused[rows]
    else:
        c0, c1 = layer.cols
        x_loc, g_loc = x[:, :, c0:c1], g[seq]
        y_exp, dx_exp = y_ref[seq], dx_ref[:, :, c0:c1]
        W_local = W_fused[:, c0:c1]
    _close(layer.to_dense(), W_local, "to_dense (local shard of W)")

    y, dx = _run(layer, x_loc, g_loc)
    _close(y, y_exp, "output vs dense reference")
    _close(dx, dx_exp, "dX vs dense reference")
    for name, part in layer.parts.items():
        for attr, ref in zip(("B", "A", "values"), grads_ref[name]):
            p = getattr(part, attr)
            _close(gather_sharded(p.grad, p, tpg), ref, f"grad {name}.{attr} (gathered) vs dense reference")
    if bias:
        gb = gather_sharded(layer.bias.grad, layer.bias, tpg)  # column bias: dim 0 with the layer's stride
        _close(gb, db_ref, "grad bias (gathered) vs dense reference")

    # megatron's own layer with the same W: same rows/cols on this rank, same output and dX
    mlayer, index = _megatron_layer(slot, _config(tp, sp, bias), tpg, bias, skip, W_fused, bias_global)
    if kind == "column":
        assert torch.equal(index, layer.global_rows), \
            f"local rows {layer.global_rows.tolist()} != megatron's {index.tolist()}"
    else:
        assert torch.equal(index, torch.arange(*layer.cols)), f"local cols {layer.cols} != megatron's"
    ym, dxm = _run(mlayer, x_loc, g_loc)
    _close(y, ym, "output vs megatron's layer")
    _close(dx, dxm, "dX vs megatron's layer")

    # TP=1: identical output and gradients
    y1, dx1 = _run(layer1, x, g)
    _close(y1, y_ref, "TP=1 output vs dense reference")
    _close(dx1, dx_ref, "TP=1 dX vs dense reference")
    for (name, part), part1 in zip(layer.parts.items(), layer1.parts.values()):
        for attr in ("B", "A", "values"):
            p = getattr(part, attr)
            _close(gather_sharded(p.grad, p, tpg), getattr(part1, attr).grad, f"grad {name}.{attr} TP={tp} vs TP=1")
    if kind == "column" and not sp and slot == "qkv":  # gather_output: full output in the global layout
        y_full, _ = layer(x, runtime_gather_output=True)
        _close(y_full.detach(), y_ref - bias_global if (bias and skip) else y_ref, "gather_output")


def _all_cases(rank, world_size):
    init_megatron(tp=world_size)
    singles = [dist.new_group([r]) for r in range(world_size)]
    done = 0
    for slot, sp, bias, path in itertools.product(SLOTS, (False, True), (False, True), ("dense", "factored")):
        try:
            _case(rank, world_size, singles[rank], slot, sp, bias, path)
        except AssertionError as e:
            raise AssertionError(f"[slot={slot} tp={world_size} sp={sp} bias={bias} path={path}] {e}") from None
        done += 1
    return done


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_sl_layers_match_dense_megatron_and_tp1(tp):
    done = run_distributed(_all_cases, tp, timeout=240)
    assert done == [len(SLOTS) * 8] * tp
