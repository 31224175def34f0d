"""megatron-core GPTModel (LLaMA: RMSNorm, SwiGLU, RoPE, GQA) built by ``build_model`` with SL
linears: TP=2 (with and without sequence parallel) against TP=1, on CPU/gloo, float32.

One TP=1 run (world size 1) produces the reference for every variant ("sl", "lowrank", "dense"):
initial parameters, loss and every gradient on a fixed batch, the losses of a few torch AdamW
steps. One TP=2 run rebuilds the same models and checks, after gathering every sharded tensor by
its partition attributes:
* parameters at init equal TP=1's (supports and init are TP-independent), loss and all gradients
  equal TP=1's, with and without sequence parallel;
* the megatron-style grad norm (replicated parameters counted once) equals TP=1's;
* no parameter is tagged ``sequence_parallel`` and no replicated parameter ``tensor_model_parallel``;
* after several AdamW steps the losses still follow TP=1 and every replicated parameter
  (A of column layers, B of row layers, norms) is bit-identical on both TP ranks;
* analytical parameter counts equal the built model's (summed over ranks), and SL layer names
  equal their module paths.
B starts at zero in SL layers (so dA would be 0); the tests first set B to a random global matrix
(sliced per shard) so that every gradient is exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import megatron.core  # noqa: F401
from _dist import gather_sharded, init_megatron, run_distributed

from megatron_sl.model import LlamaPreset, count_parameters, get_preset
from megatron_sl.parallel.grad_sync import finalize_sl_grads

P = LlamaPreset("test", hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, num_layers=2,
                vocab_size=128, seq_length=16, rank=8, density=0.1, alpha=16.0)
VARIANTS = ("sl", "lowrank", "dense")
STEPS = 4
REL = 1e-5  # max |a - b| <= REL * max |b|: float32 TP reductions reorder sums (observed ~7e-7)


def _randomize_B(model):
    from megatron_sl.core.support import derive_seed
    from megatron_sl.parallel import SLShard

    for m in model.modules():
        if isinstance(m, SLShard):
            gen = torch.Generator().manual_seed(derive_seed(0, m.name, "test-B"))
            B = torch.randn(m.global_shape[0], m.rank, generator=gen) * 0.05
            m.B.data.copy_(B[m.rows] if m.rows is not None else B)


def _batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, P.vocab_size, (2, P.seq_length), generator=gen)
    position_ids = torch.arange(P.seq_length).expand(2, -1)
    return tokens, position_ids, torch.roll(tokens, -1, dims=1)


def _loss(model, mask=None):
    tokens, pos, labels = _batch()
    return model(tokens, pos, mask, labels=labels).mean()


def _gathered(model, grads=False):
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.data
        out[name] = gather_sharded(t, p).clone()
    return out


def _grad_norm(model):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    sq = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        if param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    return sq.sqrt().item()


def _counts(model):
    """Built model's counts: TP-sharded tensors summed over ranks, replicated ones counted once."""
    from megatron.core import parallel_state as ps

    from megatron_sl.parallel import SLShard

    kind = {}
    for m in model.modules():
        if isinstance(m, SLShard):
            kind.update({id(m.B): "low_rank", id(m.A): "low_rank", id(m.values): "sparse"})
    local = {"low_rank": 0, "sparse": 0, "dense": 0}
    replicated = dict(local)
    for p in model.parameters():
        bucket = local if getattr(p, "tensor_model_parallel", False) else replicated
        bucket[kind.get(id(p), "dense")] += p.numel()
    index = sum(m.layout.idx.numel() * m.layout.idx.element_size() for m in model.modules() if isinstance(m, SLShard))
    t = torch.tensor([local["low_rank"], local["sparse"], local["dense"], index], dtype=torch.int64)
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    low_rank, sparse, dense = (int(t[i]) + replicated[k] for i, k in enumerate(("low_rank", "sparse", "dense")))
    return {"total": low_rank + sparse + dense, "low_rank": low_rank, "sparse": sparse, "dense": dense,
            "index_bytes": int(t[3])}


def _check_counts(model, preset, variant, vocab=None):
    expect = count_parameters(preset, variant, vocab_size=vocab).as_dict()
    assert _counts(model) == expect, f"{preset.name}/{variant}: built {_counts(model)} != analytical {expect}"


def _check_names(model):
    from megatron_sl.parallel import SLShard

    shards = [(n, m) for n, m in model.named_modules() if isinstance(m, SLShard)]
    for fqn, m in shards:
        assert m.name == fqn.replace(".parts.", "."), (fqn, m.name)
    return len(shards)


def _train(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model)
        loss.backward()
        finalize_sl_grads(model)  # replicated factors: partial gradients summed over TP, once per step
        opt.step()
        losses.append(loss.item())
    return losses


def _tp1_reference(rank, world_size):
    from megatron_sl.model import build_model

    init_megatron(tp=1)
    ref = {}
    for variant in VARIANTS:
        model = build_model(P, variant=variant, seed=7)
        _check_counts(model, P, variant)
        _randomize_B(model)
        params = _gathered(model)
        loss = _loss(model)
        loss.backward()
        ref[variant] = {"params": params, "loss": loss.item(), "grads": _gathered(model, grads=True),
                        "norm": _grad_norm(model)}
    model = build_model(P, variant="sl", seed=7)
    assert _check_names(model) == P.num_layers * 7
    mask = torch.triu(torch.ones(1, 1, P.seq_length, P.seq_length, dtype=torch.bool), diagonal=1)
    assert torch.allclose(_loss(model), _loss(model, mask)), "explicit causal mask != default (shim C) mask"
    _randomize_B(model)
    ref["steps"] = _train(model)
    tiny = get_preset("tiny")
    _check_counts(build_model("tiny", variant="sl", seq_length=32), tiny, "sl")
    with pytest.raises(ValueError, match="sequence_parallel=True needs tensor-parallel size > 1"):
        build_model(P, sequence_parallel=True)
    return ref


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not a.numel():
        return
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= REL * scale + 1e-12, f"{what}: max abs diff {err:.3e} (ref max {scale:.3e})"


def _replicated_identical(model, what):
    from megatron.core import parallel_state as ps

    g = ps.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            continue
        other = [torch.empty_like(p.data) for _ in range(dist.get_world_size(g))]
        dist.all_gather(other, p.data.contiguous(), group=g)
        for o in other:
            assert torch.equal(o, p.data), f"{what}: replicated {name} differs across TP ranks " \
                                           f"(max {(o - p.data).abs().max():.3e})"


def _tp2_check(rank, world_size, ref):
    from megatron_sl.model import build_model
    from megatron_sl.parallel import SLShard

    init_megatron(tp=world_size)
    for variant in VARIANTS:
        for sp in (False, True):
            what = f"TP={world_size} {variant} sp={sp}"
            model = build_model(P, variant=variant, seed=7, sequence_parallel=sp)
            _check_counts(model, P, variant)
            for name, p in model.named_parameters():
                assert not getattr(p, "sequence_parallel", False), f"{what}: {name} is tagged sequence_parallel"
            for m in model.modules():
                if isinstance(m, SLShard):
                    replicated = m.A if m.rows is not None else m.B
                    assert not getattr(replicated, "tensor_model_parallel", False), \
                        f"{what}: replicated factor of {m.name} is tagged tensor_model_parallel"
            _randomize_B(model)
            r = ref[variant]
            for name, t in _gathered(model).items():
                _close(t, r["params"][name], f"{what}: init {name}")
            loss = _loss(model)
            loss.backward()
            finalize_sl_grads(model)
            assert abs(loss.item() - r["loss"]) <= 1e-5 * abs(r["loss"]), f"{what}: loss {loss.item()} != {r['loss']}"
            for name, t in _gathered(model, grads=True).items():
                _close(t, r["grads"][name], f"{what}: grad {name}")
            norm = _grad_norm(model)
            assert abs(norm - r["norm"]) <= 1e-5 * r["norm"], f"{what}: grad norm {norm} != {r['norm']}"
    for sp in (False, True):
        model = build_model(P, variant="sl", seed=7, sequence_parallel=sp)
        _randomize_B(model)
        losses = _train(model)
        for step, (a, b) in enumerate(zip(losses, ref["steps"])):
            assert abs(a - b) <= 1e-4 * abs(b), f"sp={sp} step {step}: loss {a} != TP=1 {b}"
        _replicated_identical(model, f"after {STEPS} AdamW steps sp={sp}")
    bad = LlamaPreset("bad", hidden_size=48, ffn_hidden_size=64, num_attention_heads=3, num_query_groups=3,
                      num_layers=1, vocab_size=128, seq_length=16, rank=4, density=0.1, alpha=8.0)
    with pytest.raises(ValueError, match="num_attention_heads=3 is not divisible by tensor-parallel size 2"):
        build_model(bad)
    with pytest.raises(ValueError, match="vocab_size=127"):
        build_model(P, vocab_size=127)
    return True


@pytest.mark.slow
def test_gpt_model_tp2_matches_tp1():
    (ref,) = run_distributed(_tp1_reference, 1, timeout=240)
    run_distributed(_tp2_check, 2, ref, timeout=300)
