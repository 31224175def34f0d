"""SL layers are named by module path after the model is built, and megatron's parallel state is
set up on CPU by one function.

* a GPTModel built from the SL spec holds SL layers without SL parameters until
  ``name_sl_layers(model)`` names them by module path (no call-stack inspection); until then a
  forward fails with a message naming the fix; afterwards every part equals ``SLLinear`` seeded by
  ``<module path>.<part>``, and naming again changes nothing;
* in a fresh interpreter (nothing applied before), ``initialize_model_parallel`` alone makes a
  standalone TP=2 ``SLColumnParallelLinear(..., gather_output=True)`` run on CPU (without the CPU
  shims it fails with "Torch not compiled with CUDA enabled"), and its gathered output is the
  single-device layer's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron.core  # noqa: F401
from _dist import init_megatron, run_distributed

HERE = Path(__file__).resolve().parent


def _spec_model(rank, world_size):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_sl.core import SLConfig, SLLinear
    from megatron_sl.parallel import SLColumnParallelLinear, SLRowParallelLinear, name_sl_layers
    from megatron_sl.parallel.spec import get_gpt_decoder_block_sl_spec

    init_megatron(1)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=48, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
                            add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32)
    slc = SLConfig(rank=4, density=0.1, alpha=8.0, seed=3)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_decoder_block_sl_spec(cfg, slc), vocab_size=64,
                     max_sequence_length=8, position_embedding_type="rope")
    sl = {n: m for n, m in model.named_modules() if isinstance(m, (SLColumnParallelLinear, SLRowParallelLinear))}
    assert len(sl) == 8 and all(m.layer_name is None and len(m.parts) == 0 for m in sl.values())
    tokens = torch.randint(0, 64, (2, 8))
    try:
        model(tokens, torch.arange(8).expand(2, -1), None)
        raise AssertionError("an unnamed SL layer ran")
    except RuntimeError as e:
        unnamed = str(e)
    named = name_sl_layers(model)
    assert sorted(named) == sorted(sl) and all(m.layer_name == n for n, m in sl.items())
    for path, layer in sl.items():
        for part, shard in layer.parts.items():
            assert shard.name == f"{path}.{part}"
            ref = SLLinear(shard.global_shape[1], shard.global_shape[0], 4, 0.1, 8.0, seed=3, name=shard.name)
            assert torch.equal(shard.A, ref.A) and torch.equal(shard.values, ref.values)
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert name_sl_layers(model) == named  # idempotent
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    loss = model(tokens, torch.arange(8).expand(2, -1), None, labels=tokens).mean()
    return unnamed, float(loss)


@pytest.mark.slow
def test_layers_are_named_by_module_path_after_build():
    ((unnamed, loss),) = run_distributed(_spec_model, 1, timeout=180)
    assert "name_sl_layers(model)" in unnamed
    assert loss == loss and loss > 0


STANDALONE = r'''
import torch
from _dist import run_distributed


def standalone(rank, world_size):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_sl.core import SLConfig, SLLinear
    from megatron_sl.parallel import SLColumnParallelLinear, cpu_shims, initialize_model_parallel

    assert not cpu_shims._APPLIED  # a fresh process: nothing applied the shims before
    initialize_model_parallel(world_size, seed=7)
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
                            tensor_model_parallel_size=world_size)
    slc = SLConfig(rank=2, density=0.2, alpha=4.0)
    layer = SLColumnParallelLinear(16, 24, config=cfg, init_method=None, bias=False, gather_output=True,
                                   sl_config=slc, layer_name="standalone.fc")
    with torch.no_grad():
        layer.parts["w"].B.normal_()
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(0))
    y, bias = layer(x)
    ref = SLLinear(16, 24, 2, 0.2, 4.0, seed=0, name="standalone.fc.w")
    B = [torch.empty(12, 2) for _ in range(world_size)]
    torch.distributed.all_gather(B, layer.parts["w"].B.detach().contiguous())
    with torch.no_grad():
        ref.B.copy_(torch.cat(B))
    assert bias is None and y.shape == (5, 2, 24)
    torch.testing.assert_close(y, F.linear(x, ref.to_dense()), rtol=1e-5, atol=1e-6)
    return True


assert run_distributed(standalone, 2, timeout=240) == [True, True]
print("standalone ok")
'''


@pytest.mark.slow
def test_standalone_column_layer_runs_on_cpu_after_the_one_set_up_function(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent),
                                                                            os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", STANDALONE], env=env, capture_output=True, text=True, timeout=420,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "standalone ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
