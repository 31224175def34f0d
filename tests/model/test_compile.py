"""``torch.compile(fullgraph=True)`` of the tiny SL GPTModel on CPU, for both execution paths of the
SL linear (dense materialisation and factored): one graph, and loss and every gradient equal to
eager at float32 tolerance; in evaluation (eval mode, no autograd) the compiled loss equals eager too.

The test compiles with the ``aot_eager`` backend: dynamo captures the whole model in one graph
(any graph break fails ``fullgraph=True``) and AOTAutograd traces forward and backward through the
custom ops' fake implementations, which is what can break; the inductor backend additionally
generates and builds C++ code, which takes minutes per graph on a 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

import megatron.core  # noqa: F401
from _dist import init_megatron, run_distributed

from megatron_sl.core.config import SLConfig
from megatron_sl.model import LlamaPreset

P = LlamaPreset("test", hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, num_layers=2,
                vocab_size=128, seq_length=32, rank=8, density=0.1, alpha=16.0)


def _loss_and_grads(model, run, batch):
    tokens, pos, labels = batch
    for p in model.parameters():
        p.grad = None
    loss = run(tokens, pos, None, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _run(rank, world_size, path):
    from megatron_sl.model import build_model, compile_model
    from megatron_sl.parallel import SLShard

    init_megatron(1)
    model = build_model(P, "sl", sl_config=SLConfig(rank=8, density=0.1, alpha=16.0, path=path))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero; a random B exercises every gradient
        for m in model.modules():
            if isinstance(m, SLShard):
                m.B.copy_(torch.randn(m.B.shape, generator=gen) * 0.05)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, P.vocab_size, (2, P.seq_length), generator=gen)
    batch = (tokens, torch.arange(P.seq_length).expand(2, -1), torch.roll(tokens, -1, dims=1))
    eager = _loss_and_grads(model, model, batch)
    model.eval()
    with torch.no_grad():  # evaluation: no autograd, megatron's in-place bias-dropout-add
        eval_loss = model(*batch[:2], None, labels=batch[2]).mean()
    model.train()
    compiled = _loss_and_grads(model, compile_model(model, backend="aot_eager"), batch)
    model.eval()
    with torch.no_grad():
        compiled_eval_loss = model(*batch[:2], None, labels=batch[2]).mean()
    return eager + (eval_loss,), compiled + (compiled_eval_loss,)


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_fullgraph_compile_matches_eager(path):
    (eager, compiled), = run_distributed(_run, 1, path, timeout=300)
    (loss, grads, eval_loss), (closs, cgrads, ceval_loss) = eager, compiled
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ceval_loss, eval_loss, rtol=1e-5, atol=1e-6)
    assert set(cgrads) == set(grads) and any(n.endswith(".values") for n in grads)
    for name, g in grads.items():
        assert g.abs().max() > 0 or name.endswith("bias"), name
        torch.testing.assert_close(cgrads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
