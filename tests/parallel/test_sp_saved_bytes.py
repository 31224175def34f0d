"""Sequence parallel: an SL column-parallel layer saves only its sequence shard for backward.

At TP=2 with sequence parallelism, the bytes autograd saves for one SL column layer (qkv with GQA:
three parts interleaved; gated fc1: gate and up with stride 2), not counting parameters, must not
exceed those of megatron-core's ColumnParallelLinear of the same shape, which saves the local
[s/tp, b, in] input and gathers it again in backward. Measured with
``torch.autograd.graph.saved_tensors_hooks``. Outputs and gradients of the same layers under SP are
checked against dense references in ``test_parallel_layers.py``. Under ``save_xa`` the layer keeps
exactly one [T, r] tensor more per part, and its gradients are bitwise those of recomputing it.
"""

from __future__ import annotations

import pytest
import torch

import megatron.core  # noqa: F401 -- import once in the parent; forked ranks inherit it
from _dist import init_megatron, run_distributed

D, NP, NG, HN, F = 64, 4, 2, 16, 96
S, BATCH, TP = 32, 2, 2


def _saved_bytes(layer, x, params):
    """Bytes of distinct storages autograd saves during layer(x), parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = layer(x)
    y.sum().backward()  # the saved graph is usable
    return sum(seen.values())


def _case(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_sl.core import SLConfig
    from megatron_sl.parallel import SLColumnParallelLinear

    init_megatron(tp=world_size)
    tpg = ps.get_tensor_model_parallel_group()
    config = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=NP, num_query_groups=NG,
                               kv_channels=HN, ffn_hidden_size=F, gated_linear_unit=True, add_bias_linear=False,
                               tensor_model_parallel_size=world_size, sequence_parallel=True,
                               use_cpu_initialization=True, params_dtype=torch.float32,
                               gradient_accumulation_fusion=False)
    out = {}
    for slot, fout, stride in (("qkv", (NP + 2 * NG) * HN, 1), ("fc1", 2 * F, 2)):
        for path in ("dense", "factored"):
            slc = SLConfig(rank=8, density=0.05, alpha=8.0, seed=3, path=path)
            sl = SLColumnParallelLinear(D, fout, config=config, init_method=None, bias=False, gather_output=False,
                                        stride=stride, skip_bias_add=False, tp_comm_buffer_name=slot, tp_group=tpg,
                                        sl_config=slc, layer_name=f"sp.{slot}")
            mega = ColumnParallelLinear(D, fout, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                        gather_output=False, stride=stride, skip_bias_add=False, tp_group=tpg)
            x = torch.randn(S // world_size, BATCH, D, requires_grad=True)
            out[f"{slot}/{path}"] = (_saved_bytes(sl, x, list(sl.parameters())),
                                     _saved_bytes(mega, x, list(mega.parameters())))
        # sl.save_xa: the same layer also keeps each part's x·Aᵀ ([S·BATCH, r], every token: the
        # input is gathered) and its gradients are bitwise those of recomputing it
        grads = {}
        for save in (False, True):
            slc = SLConfig(rank=8, density=0.05, alpha=8.0, seed=3, path="factored", save_xa=save)
            sl = SLColumnParallelLinear(D, fout, config=config, init_method=None, bias=False, gather_output=False,
                                        stride=stride, skip_bias_add=False, tp_comm_buffer_name=slot, tp_group=tpg,
                                        sl_config=slc, layer_name=f"sp.{slot}")
            torch.manual_seed(5)
            x = torch.randn(S // world_size, BATCH, D, requires_grad=True)
            saved = _saved_bytes(sl, x, list(sl.parameters()))
            grads[save] = [x.grad] + [p.grad for p in sl.parameters()]
            out[f"{slot}/save_xa={save}"] = (saved, len(sl.parts))
        out[f"{slot}/save_xa grads equal"] = all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    return out


@pytest.mark.slow
def test_sl_column_saves_only_the_sequence_shard():
    results = run_distributed(_case, TP, timeout=180)
    local_input = S // TP * BATCH * D * 4
    for rank_result in results:
        for case, (sl, mega) in ((c, v) for c, v in rank_result.items() if "save_xa" not in c):
            assert mega == local_input, (case, mega, local_input)  # megatron: the local shard only
            assert sl <= mega, f"{case}: SL layer saves {sl} bytes, megatron's ColumnParallelLinear {mega}"
        for slot in ("qkv", "fc1"):
            (plain, parts), (kept, _) = rank_result[f"{slot}/save_xa=False"], rank_result[f"{slot}/save_xa=True"]
            assert plain == local_input, (slot, plain)
            assert kept - plain == parts * S * BATCH * 8 * 4, (slot, plain, kept, parts)  # parts x [T, r] fp32
            assert rank_result[f"{slot}/save_xa grads equal"], slot
