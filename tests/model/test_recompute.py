"""Activation recompute (``build_model(recompute=...)``, megatron-core's own ``CheckpointFunction``)
on CPU: loss and every gradient equal the no-recompute run's, bit for bit, at TP=2 (2 ranks) and
TP=1 x DP=2, with dropout on so the recomputed forward must replay the same random streams (the
CPU RNG-tracker shim's save/restore). Also: recompute actually keeps fewer saved activations.
"""

from __future__ import annotations

import pytest
import torch

import megatron.core  # noqa: F401
from _dist import init_megatron, run_distributed

from megatron_sl.model import LlamaPreset

P = LlamaPreset("test", hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, num_layers=2,
                vocab_size=128, seq_length=16, rank=8, density=0.1, alpha=16.0)
MODES = ("none", "selective", "full")


def _run(rank, world, tp, variant):
    from megatron_sl.core.support import derive_seed
    from megatron_sl.model import build_model
    from megatron_sl.parallel import SLShard
    from megatron_sl.parallel.cpu_shims import seed_model_parallel

    init_megatron(tp=tp)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, P.vocab_size, (2, P.seq_length), generator=gen)
    pos = torch.arange(P.seq_length).expand(2, -1)
    labels = torch.roll(tokens, -1, dims=1)
    out = {}
    for mode in MODES:
        model = build_model(P, variant=variant, seed=7, recompute=mode,
                            config_overrides={"hidden_dropout": 0.1, "attention_dropout": 0.1})
        for m in model.modules():  # B starts at 0: make every SL gradient non-trivial
            if isinstance(m, SLShard):
                g = torch.Generator().manual_seed(derive_seed(0, m.name, "test-B"))
                B = torch.randn(m.global_shape[0], m.rank, generator=g) * 0.05
                m.B.data.copy_(B[m.rows] if m.rows is not None else B)
        seed_model_parallel(99)  # same random streams for the forward of every mode
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        out[mode] = {"loss": loss.detach(), "saved": sum(saved),
                     "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}
    ref = out["none"]
    return {mode: {"loss_equal": bool(torch.equal(r["loss"], ref["loss"])),
                   "grads_equal": all(torch.equal(r["grads"][n], g) for n, g in ref["grads"].items()),
                   "max_grad_diff": max(float((r["grads"][n] - g).abs().max()) for n, g in ref["grads"].items()),
                   "saved": r["saved"], "loss": float(r["loss"])}
            for mode, r in out.items()}


@pytest.mark.parametrize("tp,variant", [(2, "sl"), (1, "sl"), (2, "dense")])
def test_recompute_gives_identical_loss_and_gradients(tp, variant):
    results = run_distributed(_run, 2, tp, variant, timeout=240)
    for rank, res in enumerate(results):
        for mode in ("selective", "full"):
            r = res[mode]
            assert r["loss_equal"] and r["grads_equal"], (rank, mode, r)
        assert res["full"]["saved"] < res["selective"]["saved"] < res["none"]["saved"], (rank, res)
