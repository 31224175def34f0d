"""``megatron-sl export-hf`` / ``generate`` against real transformers, from checkpoints written by
``megatron-sl train`` (the shrunk tiny SL preset, 2 gloo ranks) at TP=1 (DP=2) and TP=2 (DP=1).

For each TP size: the export is loaded with ``LlamaForCausalLM.from_pretrained`` in fp32 and its
logits are compared with OUR model at the checkpoint's own TP size, built with ``build_model`` on
that many gloo ranks and given each rank's saved module state as is (so the TP gathering, the
q/k/v and gate/up split and the RoPE/GQA layout are all checked against the model that trained,
not against a second conversion). Greedy generation must give the same tokens. The Meta-style
interleaved q/k row permutation (the other RoPE convention) must change the logits by far more
than the tolerance, so the test can tell the two conventions apart at these weights.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from training_helpers import REPO, megatron_sl_cmd, rank_env, tiny_overrides

TINY_SL = REPO / "configs" / "tiny_sl.yaml"
STEPS = 12
TOL = 1e-4


# name -> (TP size, extra overrides): SL with DeepSpeed ZeRO-1 at TP=1 (DP=2) and TP=2, and the dense
# variant with the per-layer engine at TP=2 (megatron's fused dense qkv / stride-2 fc1 weights)
RUNS = {"tp1": (1, []), "tp2": (2, []),
        "tp2_dense_per_layer": (2, ["model.variant=dense", "optim.per_layer=true", "deepspeed.zero_stage=0"])}


def _train(data, out: Path, tp: int, extra=()) -> Path:
    cmd = megatron_sl_cmd("train", "--config", str(TINY_SL),
                          *tiny_overrides(data, out, f"train.train_iters={STEPS}", "train.global_batch_size=4",
                                          "train.micro_batch_size=2", "eval.interval=0", "eval.iters=1",
                                          "eval.at_start=false", "launch.nproc_per_node=2",
                                          f"parallel.tensor_parallel={tp}", *extra))
    r = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out / "checkpoints" / f"step_{STEPS:08d}"


def _cli(*args, timeout=300):
    return subprocess.run(megatron_sl_cmd(*args), cwd=REPO, env=rank_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (tp, extra) in RUNS.items():
        ckpt = _train(tiny_data, root / f"run_{name}", tp, extra)
        r = _cli("export-hf", str(ckpt), str(root / f"hf_{name}"))
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = (ckpt, root / f"hf_{name}")
    return out


def _permute_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
    hd = w.shape[0] // heads
    return w.view(heads, hd // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _compare(rank, world, ckpt: str, hf_dir: str):
    """On ``world`` = TP ranks: our model from the checkpoint's own module states vs transformers."""
    from _dist import init_megatron
    from transformers import LlamaForCausalLM

    from megatron_sl.model import build_model
    from megatron_sl.model.generate import generate
    from megatron_sl.training.export import read_checkpoint

    init_megatron(tp=world)
    ck = read_checkpoint(ckpt)
    w = ck.weights
    model = build_model(w.preset, variant=ck.cfg.model.variant, sl_config=w.sl_config, vocab_size=w.vocab_size,
                        seed=ck.cfg.train.seed)
    engine = Path(ckpt) / "engine"
    f = (engine / f"per_layer_rank_{rank:05d}.pt" if ck.cfg.optim.per_layer
         else engine / "ds" / f"mp_rank_{rank:02d}_model_states.pt")
    blob = torch.load(f, map_location="cpu", weights_only=False)
    model.load_state_dict(blob["module"], strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, w.vocab_size, (2, w.preset.seq_length), generator=gen)
    pos = torch.arange(w.preset.seq_length)[None].expand(2, -1)
    from megatron_sl.model.generate import _full_vocab

    with torch.no_grad():
        ours = _full_vocab(model(tokens, pos, None))
    prompt = tokens[0, :6].tolist()
    our_ids = generate(model, prompt, 20)
    if rank != 0:
        return None
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ours runs the full 20 tokens too
    with torch.no_grad():
        theirs = hf(tokens).logits
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)[0].tolist()
        for layer in hf.model.layers:  # the other RoPE convention: must not pass
            a = layer.self_attn
            a.q_proj.weight.copy_(_permute_meta(a.q_proj.weight, hf.config.num_attention_heads))
            a.k_proj.weight.copy_(_permute_meta(a.k_proj.weight, hf.config.num_key_value_heads))
        permuted = hf(tokens).logits
    return {"shape": (tuple(ours.shape), tuple(theirs.shape)), "diff": (ours - theirs).abs().max().item(),
            "scale": ours.abs().max().item(), "permuted_diff": (permuted - ours).abs().max().item(),
            "ours": our_ids, "hf": hf_ids}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_export_hf_matches_transformers(exported, run):
    from _dist import run_distributed

    tp = RUNS[run][0]
    ckpt, hf_dir = exported[run]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 512 and cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == 4
    assert cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 10000.0
    res = run_distributed(_compare, tp, str(ckpt), str(hf_dir), timeout=300)[0]
    print(f"{run}: logits max|ours - transformers| = {res['diff']:.3g} (max |logit| {res['scale']:.3g}); "
          f"Meta-permuted q/k: {res['permuted_diff']:.3g}")
    assert res["shape"][0] == res["shape"][1] == (2, 32, 512)
    assert res["diff"] <= TOL
    assert res["permuted_diff"] > 10 * TOL
    assert res["ours"] == res["hf"]
    assert len(set(res["ours"][6:])) > 1  # a real continuation, not one repeated token


@pytest.mark.slow
def test_export_tokenizer_and_sl_form(exported, tiny_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from megatron_sl.core import support as sup
    from megatron_sl.training.data import load_tokenizer
    from megatron_sl.training.export import read_sl

    ckpt, hf_dir = exported["tp2"]
    text = "def f(x):\n    return x  # 12 apples"
    assert AutoTokenizer.from_pretrained(hf_dir).encode(text) == load_tokenizer(tiny_data[1]).encode(text)

    r = _cli("export-hf", str(ckpt), str(tmp_path / "sl"), "--sl")
    assert r.returncode == 0, r.stdout + r.stderr
    weights = read_sl(tmp_path / "sl")
    dense = load_file(str(hf_dir / "model.safetensors"))
    for key, W in weights.to_hf().items():
        assert torch.allclose(W, dense[key], rtol=0, atol=1e-6), key
    meta = json.loads((tmp_path / "sl" / "sl_config.json").read_text())
    assert meta["step"] == STEPS and meta["sl_config"]["rank"] == 8
    for fp in weights.parts.values():  # the stored support is the one (seed, name) regenerates
        want = sup.sample_support(*fp.shape, fp.density, fp.seed, fp.name).idx.to(torch.int64).sort().values
        assert torch.equal(fp.index, want), fp.name


@pytest.mark.slow
def test_generate_cli_matches_transformers_greedy(exported, tiny_data):
    from transformers import LlamaForCausalLM

    from megatron_sl.training.data import load_tokenizer

    ckpt, hf_dir = exported["tp2"]
    prompt = "The module"
    r = _cli("generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(tiny_data[1])
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = hf.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    assert r.stdout.rstrip("\n") == tok.decode(ids.tolist())

    runs = [_cli("generate", str(ckpt), "--prompt", prompt, "--top-p", "0.9", "--temperature", "0.8",
                 "--seed", str(s), "--max-new-tokens", "12") for s in (1, 1, 2)]
    assert all(x.returncode == 0 for x in runs), [x.stderr for x in runs]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith(prompt)


def test_bad_inputs_exit_2(tmp_path):
    r = _cli("export-hf", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and "not a committed megatron-sl checkpoint" in r.stderr
    assert not (tmp_path / "out").exists()
    r = _cli("generate", str(tmp_path), "--prompt", "x", "--top-p", "1.5")
    assert r.returncode == 2 and "--top-p=1.5" in r.stderr
