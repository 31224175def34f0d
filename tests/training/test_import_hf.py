"""``megatron-sl import-hf`` (beyond the paper): SL weights from a dense LLaMA made here with real
transformers (random init, ``save_pretrained``).

* At full rank (r = min(out, in) for every matrix, multi-head attention) the SVD is exact, so our
  model built from the import -- at TP=1 and at TP=2 -- gives the dense transformers model's logits.
* At rank 8 with GQA, the reported low-rank error of every matrix is the truncated-SVD tail
  sqrt(sum_{i>r} sigma_i^2) / ||W|| (computed here from the HF weights), S holds exactly the residual
  at its support entries (the error is zero there) and adding S lowers the error.
* ``megatron-sl train ... model.init_from=DIR`` starts from it; a mismatching SL rank is refused
  with exit code 2 before any rank starts.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from training_helpers import REPO, megatron_sl_cmd, rank_env, tiny_overrides

TOL = 1e-4


def _hf_model(path, kv_heads: int, vocab: int = 500):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                      num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=32, rms_norm_eps=1e-6,
                      rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF's init leaves norms at 1; make them matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def _cli(*args):
    return subprocess.run(megatron_sl_cmd(*args), cwd=REPO, env=rank_env(), capture_output=True, text=True,
                          timeout=600)


def _logits(rank, world, sl_dir, hf_dir):
    from _dist import init_megatron
    from transformers import LlamaForCausalLM

    from megatron_sl.model import build_model
    from megatron_sl.model.generate import _full_vocab
    from megatron_sl.model.hf import load_weights
    from megatron_sl.training.export import read_sl

    init_megatron(tp=world)
    w = read_sl(sl_dir)
    model = build_model(w.preset, variant="sl", sl_config=w.sl_config, vocab_size=w.vocab_size)
    load_weights(model, w)
    tokens = torch.randint(0, w.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = _full_vocab(model.eval()(tokens, torch.arange(32)[None].expand(2, -1), None))
        theirs = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(tokens).logits
    return (ours - theirs).abs().max().item(), theirs.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_full_rank_import_reproduces_the_dense_model(tmp_path, tp):
    from _dist import run_distributed

    hf = _hf_model(tmp_path / "hf", kv_heads=4)
    r = _cli("import-hf", str(hf), str(tmp_path / "sl"), "--rank", "64", "--density", "0.05")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "sl" / "import_report.json").read_text())
    assert len(report) == 14 and max(x["sl_rel_error"] for x in report) < 1e-5
    diff, scale = run_distributed(_logits, tp, str(tmp_path / "sl"), str(hf), timeout=300)[0]
    print(f"TP={tp}: full-rank import, logits max|ours - transformers| = {diff:.3g} (max |logit| {scale:.3g})")
    assert diff <= TOL


def test_low_rank_import_errors(tmp_path):
    from safetensors.torch import load_file

    from megatron_sl.training.export import read_sl

    hf = _hf_model(tmp_path / "hf", kv_heads=2)
    r = _cli("import-hf", str(hf), str(tmp_path / "sl"), "--rank", "8", "--density", "0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "low-rank err" in r.stdout and "model.init_from=" in r.stdout
    report = {x["name"]: x for x in json.loads((tmp_path / "sl" / "import_report.json").read_text())}
    dense = load_file(str(hf / "model.safetensors"))
    weights = read_sl(tmp_path / "sl")
    hf_w = weights.to_hf()
    names = {"decoder.layers.1.self_attention.linear_qkv.k": "model.layers.1.self_attn.k_proj.weight",
             "decoder.layers.0.mlp.linear_fc2.down": "model.layers.0.mlp.down_proj.weight"}
    for name, key in names.items():
        W = dense[key].double()
        sv = torch.linalg.svdvals(W)
        tail = sv[8:].pow(2).sum().sqrt() / W.norm()
        assert report[name]["lowrank_rel_error"] == pytest.approx(tail.item(), rel=1e-6)
        fp = weights.parts[name]
        resid = (W - fp.to_dense(torch.float64)).view(-1)
        assert resid[fp.index].abs().max() < 1e-6        # S is the residual on its support
        assert fp.index.numel() == int(0.1 * W.numel())
        assert torch.allclose(hf_w[key].double(), fp.to_dense(torch.float64), atol=1e-6)
    assert all(x["sl_rel_error"] < x["lowrank_rel_error"] for x in report.values())
    assert r.returncode == 0 and _cli("import-hf", str(tmp_path / "nothing"), str(tmp_path / "o")).returncode == 2


@pytest.mark.slow
def test_train_from_imported_weights(tiny_data, tmp_path):
    hf = _hf_model(tmp_path / "hf", kv_heads=2, vocab=512)  # the tokenizer's vocabulary
    assert _cli("import-hf", str(hf), str(tmp_path / "sl"), "--rank", "8", "--density", "0.03").returncode == 0
    base = ["--config", str(REPO / "configs" / "tiny_sl.yaml")]
    shape = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=32",
             "model.num_query_groups=2", "sl.rank=8", "sl.density=0.03", "sl.alpha=16.0"]
    common = [*tiny_overrides(tiny_data, tmp_path / "run", "train.train_iters=2", "train.global_batch_size=4",
                              "train.micro_batch_size=2", "eval.interval=0", "eval.iters=1", "launch.nproc_per_node=2",
                              "parallel.tensor_parallel=2"), *shape]
    bad = _cli("train", *base, *common, "sl.rank=4", f"model.init_from={tmp_path / 'sl'}")
    assert bad.returncode == 2 and "model.init_from=" in bad.stderr and "SL settings" in bad.stderr, bad.stderr
    assert not (tmp_path / "run").exists()
    good = _cli("train", *base, *common, f"model.init_from={tmp_path / 'sl'}")
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    fresh = _cli("train", *base, *common, "run.overwrite=true", f"run.output_dir={tmp_path / 'fresh'}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    other = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    # the imported model is a different starting point from the fresh initialisation
    assert summary["initial_val_loss"] != pytest.approx(other["initial_val_loss"], rel=1e-3)
