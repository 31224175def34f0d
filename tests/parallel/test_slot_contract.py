"""The constructor contract with megatron-core's four linear slots, and bad-input errors.

``test_megatron_slot_keywords_are_accepted`` records, by building a GPTModel whose four slots hold
recording subclasses of megatron's own ColumnParallelLinear / RowParallelLinear, the positional
arguments and keywords megatron-core passes; it fails if our classes do not name every one of
them as a parameter, need one megatron does not pass (other than ``sl_config``), or hide the
mismatch behind ``**kwargs``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import megatron.core  # noqa: F401
from _dist import init_megatron, run_distributed

from megatron_sl.core import SLConfig, SLLinear
from megatron_sl.parallel import SLColumnParallelLinear, SLRowParallelLinear
from megatron_sl.parallel.layout import glu_layout, local_rows, qkv_layout, shard_rows


def _record_megatron_calls(rank, world_size):
    init_megatron(tp=world_size)
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    calls = []

    class RecordingColumn(ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            calls.append(("column", len(args), sorted(kwargs), kwargs.get("tp_comm_buffer_name")))
            super().__init__(*args, **kwargs)

    class RecordingRow(RowParallelLinear):
        def __init__(self, *args, **kwargs):
            calls.append(("row", len(args), sorted(kwargs), kwargs.get("tp_comm_buffer_name")))
            super().__init__(*args, **kwargs)

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attn, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attn.linear_qkv, attn.linear_proj = RecordingColumn, RecordingRow
    mlp.linear_fc1, mlp.linear_fc2 = RecordingColumn, RecordingRow
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=48, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
                            add_bias_linear=False, tensor_model_parallel_size=world_size,
                            use_cpu_initialization=True, params_dtype=torch.float32)
    GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=8,
             position_embedding_type="rope")
    return calls


@pytest.mark.slow
def test_megatron_slot_keywords_are_accepted():
    (calls,) = run_distributed(_record_megatron_calls, 1, timeout=120)
    assert {c[3] for c in calls} == {"qkv", "proj", "fc1", "fc2"}, calls
    for kind, nargs, keywords, slot in calls:
        cls = SLColumnParallelLinear if kind == "column" else SLRowParallelLinear
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
        kinds = {p.kind for p in params}
        assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds, \
            f"{cls.__name__} must not swallow unknown arguments"
        positional = [p.name for p in params if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional[:nargs] == ["input_size", "output_size"][:nargs] and len(positional) >= nargs, \
            f"slot {slot}: megatron passes {nargs} positional args, {cls.__name__} takes {positional}"
        names = {p.name for p in params if p.kind != inspect.Parameter.POSITIONAL_ONLY}
        missing = set(keywords) - names
        assert not missing, f"slot {slot}: megatron passes {sorted(missing)} which {cls.__name__} does not accept"
        required = {p.name for p in params if p.default is inspect.Parameter.empty} - set(positional[:nargs])
        extra = required - set(keywords)
        assert not extra, f"slot {slot}: {cls.__name__} requires {sorted(extra)} which megatron does not pass"


# ----------------------------------------------------------------------------- layouts (no processes)

def test_shard_rows_is_megatrons_split_rule():
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    for out, tp, stride in [(40, 2, 1), (40, 4, 1), (40, 2, 2), (40, 4, 2), (24, 3, 2), (12, 1, 2)]:
        for rank in range(tp):
            w = torch.empty(out // tp, 3)
            probe = lambda m: m.copy_(torch.arange(out, dtype=m.dtype)[:, None].expand(out, 3))  # noqa: E731
            _initialize_affine_weight_cpu(w, out, 3, out // tp, 0, probe, stride, rank=rank, world_size=tp)
            assert torch.equal(w[:, 0].long(), shard_rows(out, tp, rank, stride)), (out, tp, stride, rank)


def test_qkv_and_glu_layouts():
    lay = qkv_layout(num_heads=4, num_query_groups=2, head_dim=1)  # q0 q1 k0 v0 | q2 q3 k1 v1
    assert lay.parts == (("q", 4), ("k", 2), ("v", 2))
    assert lay.part_id.tolist() == [0, 0, 1, 2, 0, 0, 1, 2]
    assert lay.part_row.tolist() == [0, 1, 0, 0, 2, 3, 1, 1]
    glu = glu_layout(3)
    assert glu.part_id.tolist() == [0, 0, 0, 1, 1, 1] and glu.part_row.tolist() == [0, 1, 2, 0, 1, 2]
    # TP=1 qkv needs the interleave permutation; applying it to [q | k | v] gives the fused order
    loc = local_rows(lay, 1, 0)
    cat = torch.cat([torch.stack([torch.full_like(r, p), r], 1) for p, r in enumerate(loc.rows)])
    assert torch.equal(cat[loc.perm], torch.stack([lay.part_id, lay.part_row], 1))
    # TP=4 with 2 query groups: rank 1 holds k0 and v0 only (no q rows) -- megatron's ng < tp case
    loc1 = local_rows(qkv_layout(4, 2, 1), 4, 1)
    assert [r.tolist() for r in loc1.rows] == [[], [0], [0]]


def _cfg(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2, kv_channels=4,
                ffn_hidden_size=12, gated_linear_unit=True, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def _col(**kw):
    args = dict(config=_cfg(), init_method=None, bias=False, gather_output=False, skip_bias_add=False,
                tp_comm_buffer_name="qkv", sl_config=SLConfig(rank=2, density=0.2), layer_name="t.qkv")
    args.update(kw)
    return SLColumnParallelLinear(16, 32, **args)


def test_tp1_parts_equal_core_sllinear():
    layer = _col()
    for name, size in (("q", 16), ("k", 8), ("v", 8)):
        ref = SLLinear(16, size, 2, 0.2, 32.0, seed=0, name=f"t.qkv.{name}")
        part = layer.parts[name]
        assert torch.equal(part.A, ref.A) and torch.equal(part.values, ref.values) and torch.equal(part.B, ref.B)
        assert part.name == f"t.qkv.{name}"


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="sl_config"):
        _col(sl_config=None)
    with pytest.raises(ValueError, match="is_expert"):
        _col(is_expert=True)
    with pytest.raises(ValueError, match="layer_name"):
        _col(layer_name=None)  # not inside a TransformerLayer
    with pytest.raises(ValueError, match="qkv output_size=30"):
        SLColumnParallelLinear(16, 30, config=_cfg(), init_method=None, bias=False, tp_comm_buffer_name="qkv",
                               sl_config=SLConfig(rank=2), layer_name="t")
    with pytest.raises(ValueError, match=r"'t.qkv.k'.*rank=9"):
        _col(sl_config=SLConfig(rank=9, density=0.1))  # k is 8 x 16
    with pytest.raises(ValueError, match="stride"):
        SLRowParallelLinear(12, 16, config=_cfg(), init_method=None, bias=False, input_is_parallel=True,
                            skip_bias_add=True, stride=2, sl_config=SLConfig(rank=2), layer_name="t")
    with pytest.raises(ValueError, match="divisible"):
        shard_rows(10, 4, 0)


def test_state_dict_round_trip_checks_support_metadata():
    src, dst = _col(), _col()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    dst.load_state_dict(src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters()))
    other_seed = _col(sl_config=SLConfig(rank=2, density=0.2, seed=1))
    with pytest.raises(ValueError, match="SL support metadata mismatch for 't.qkv.q'"):
        other_seed.load_state_dict(src.state_dict())
