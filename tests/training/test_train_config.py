"""Training configuration: typed loading, validation before any rank starts, the rendered DeepSpeed
config, the LR schedule and the optimizer param groups (single process, no distributed init).

1. loading: YAML + base + overrides, types, unknown keys/sections, bad choices;
2. plan checks: batch sizes that do not divide, TP vs heads / query groups / FFN / world, unknown
   preset, missing or unreadable data and tokenizer, per-layer + ZeRO, non-empty output dir;
3. ``megatron-sl train`` with a bad config: exit 2, one error line naming the value, no rank started,
   nothing written (in process, and once as a real subprocess);
4. DeepSpeed config rendering: train_batch_size = micro x GA x DP (not world), clipping explicit,
   templates cannot carry batch keys;
5. warmup + cosine to 10 %;
6. param groups: TP-sharded / replicated (/ no-decay) always separate.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from megatron_sl.training.config import ConfigError, load_config
from megatron_sl.training.config_checks import make_plan
from training_helpers import REPO, megatron_sl_cmd, run, tiny_overrides

TINY_SL = REPO / "configs" / "tiny_sl.yaml"


def cfg_for(data, out, *extra):
    return load_config(TINY_SL, tiny_overrides(data, out, *extra))


# 1. loading --------------------------------------------------------------------------------------
def test_configs_load_with_base_and_overrides(tiny_data, tmp_path):
    cfg = cfg_for(tiny_data, tmp_path / "run", "optim.lr=1e-3", "deepspeed.extra.wall_clock_breakdown=true")
    assert cfg.model.num_layers == 2 and cfg.optim.lr == 1e-3 and cfg.train.precision == "fp32"
    assert cfg.deepspeed.extra == {"wall_clock_breakdown": True}
    dense = load_config(REPO / "configs" / "tiny_dense.yaml")
    assert dense.model.variant == "dense" and dense.train.global_batch_size == 8  # inherited from tiny_sl
    assert load_config(REPO / "configs" / "tiny_lowrank.yaml").model.variant == "lowrank"
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)  # every shipped config parses


@pytest.mark.parametrize("override, needle", [
    ("optim.learning_rate=1", "unknown key 'optim.learning_rate'"),
    ("trainer.steps=3", "unknown section 'trainer'"),
    ("optim.lr=fast", "optim.lr='fast': expected a number"),
    ("train.train_iters=2.5", "train.train_iters=2.5: expected an integer"),
    ("optim.per_layer=maybe", "optim.per_layer='maybe': expected true/false"),
    ("optim.name=sgd", "optim.name='sgd' is not one of"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage=4 is not one of"),
    ("model.variant=sparse", "model.variant='sparse' is not one of"),
    ("sl.targets=[qkv,attn]", "unknown slot 'attn'"),
    ("optimlr=1", "key 'optimlr' must be section.key"),
    ("optim.lr", "must look like section.key=value"),
])
def test_bad_keys_and_types_are_named(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_SL, [override])
    assert needle in str(e.value)


def test_help_config_documents_every_key(capsys):
    from megatron_sl.cli.train import main
    from megatron_sl.training.config import TrainConfig

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    keys = [(s, k, f) for s, sf in TrainConfig.model_fields.items() for k, f in sf.annotation.model_fields.items()]
    assert len(keys) > 70
    for section, key, field in keys:
        assert field.description and f"  {section}.{key}  (" in out, (section, key)
    assert "  optim.lr  (number; default 0.003)" in out and "  deepspeed.zero_stage  (0 | 1 | 2 | 3; default 1)" in out


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny_dense.yaml").model.variant == "dense"  # its base: chain too
    assert load_config("llama_7b_sl.yaml").model.preset == "7b"
    with pytest.raises(ConfigError, match="config file 'configs/nope.yaml' does not exist"):
        load_config("configs/nope.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_sl.yaml").write_text("model: {num_layers: 3}\n")  # a file on disk wins
    assert load_config("configs/tiny_sl.yaml").model.num_layers == 3


# 2. plan checks ----------------------------------------------------------------------------------
def test_plan_derives_accumulation_and_padded_vocab(tiny_data, tmp_path):
    plan = make_plan(cfg_for(tiny_data, tmp_path / "r", "train.micro_batch_size=2", "train.global_batch_size=8"), 2)
    assert (plan.dp, plan.grad_accum, plan.tokenizer_vocab_size, plan.vocab_size) == (2, 2, 512, 512)
    plan = make_plan(cfg_for(tiny_data, tmp_path / "r", "parallel.tensor_parallel=2", "model.vocab_size=600",
                             "train.global_batch_size=8", "train.micro_batch_size=2"), 4)
    assert (plan.tp, plan.dp, plan.grad_accum, plan.vocab_size) == (2, 2, 2, 768)  # padded to 128 x TP
    assert plan.warmup_iters == 15  # 10 % of 150


@pytest.mark.parametrize("extra, world, needle", [
    (["train.global_batch_size=10"], 2, "train.global_batch_size=10 is not divisible by train.micro_batch_size=4 x "
                                        "data-parallel size 2"),
    (["train.gradient_accumulation_steps=2"], 2, "train.gradient_accumulation_steps=2 disagrees"),
    (["parallel.tensor_parallel=3"], 2, "parallel.tensor_parallel=3 does not divide the world size 2"),
    (["parallel.tensor_parallel=3", "train.global_batch_size=12", "train.micro_batch_size=4"], 6,
     "train.global_batch_size=12 is not divisible by train.micro_batch_size=4 x data-parallel size 2 (= world 6 / TP 3)"),
    (["parallel.tensor_parallel=3", "train.global_batch_size=8", "train.micro_batch_size=8"], 3,
     "parallel.tensor_parallel=3 does not divide model num_attention_heads=4"),
    (["parallel.tensor_parallel=2", "model.num_query_groups=1"], 2,
     "parallel.tensor_parallel=2 does not divide model num_query_groups=1"),
    (["parallel.tensor_parallel=2", "model.ffn_hidden_size=129"], 2,
     "parallel.tensor_parallel=2 does not divide model ffn_hidden_size=129"),
    (["model.preset=13b"], 2, "model.preset='13b' is not a known preset"),
    (["model.num_attention_heads=3"], 2, "hidden_size=64 is not divisible by num_attention_heads=3"),
    (["sl.rank=65"], 2, "sl.rank=65: preset 'tiny': rank=65 exceeds min(out, in)=64"),
    (["sl.rank=40"], 2, "rank=40 exceeds min(out, in)=32 of the k matrix (32x64)"),
    (["sl.density=1.5"], 2, "density=1.5 must be a number in [0, 1)"),
    (["model.variant=lowrank", "sl.density=0.1"], 2, "contradicts model.variant='lowrank'"),
    (["optim.per_layer=true", "deepspeed.zero_stage=1"], 2,
     "optim.per_layer=true cannot be combined with deepspeed.zero_stage=1"),
    (["optim.warmup_iters=500"], 2, "optim.warmup_iters=500 must be in [0, train.train_iters=150]"),
    (["optim.lr=0"], 2, "optim.lr=0.0 must be > 0"),
    (["optim.beta2=1.0"], 2, "optim.beta2=1.0 must be in [0, 1)"),
    (["model.vocab_size=100"], 2, "model.vocab_size=100 is smaller than the tokenizer's vocabulary (512)"),
    (["data.split=100,0,0"], 2, "has no validation share but eval.iters=8"),
    (["data.split=a,b"], 2, "data.split='a,b' must be 1-3 non-negative weights"),
    (["parallel.sequence_parallel=true"], 2, "needs parallel.tensor_parallel > 1"),
    (["deepspeed.extra.train_batch_size=16"], 2, "config key deepspeed.extra sets 'train_batch_size'"),
    (["deepspeed.extra.gradient_clipping=0.3"], 2, "sets 'gradient_clipping'"),
    (["deepspeed.config_template=/nonexistent/ds.json"], 2, "DeepSpeed config template '/nonexistent/ds.json' does not"),
])
def test_bad_plans_are_named(tiny_data, tmp_path, extra, world, needle):
    with pytest.raises(ConfigError) as e:
        make_plan(cfg_for(tiny_data, tmp_path / "r", *extra), world)
    assert needle in str(e.value)
    assert not (tmp_path / "r").exists()


def test_missing_or_unreadable_data_is_named(tiny_data, tmp_path):
    prefix, tok = tiny_data
    cases = []
    cases.append(([f"data.prefix={tmp_path}/nope_text_document"], "no indexed dataset at"))
    cases.append(([f"data.tokenizer={tmp_path}/nope.model"], "tokenizer model"))
    # a truncated .bin next to a valid .idx
    bad = tmp_path / "trunc_text_document"
    shutil.copy(prefix + ".idx", str(bad) + ".idx")
    (tmp_path / "trunc_text_document.bin").write_bytes(open(prefix + ".bin", "rb").read()[:1000])
    cases.append(([f"data.prefix={bad}"], "truncated or mismatched"))
    # an .idx that is not an index
    junk = tmp_path / "junk_text_document"
    (tmp_path / "junk_text_document.idx").write_bytes(b"not an index at all, definitely" * 4)
    shutil.copy(prefix + ".bin", str(junk) + ".bin")
    cases.append(([f"data.prefix={junk}"], "is not a megatron indexed-dataset index"))
    # a tokenizer that is not a sentencepiece model
    (tmp_path / "junk.model").write_bytes(b"\x00garbage" * 64)
    cases.append(([f"data.tokenizer={tmp_path}/junk.model"], "is not a sentencepiece model"))
    for extra, needle in cases:
        with pytest.raises(ConfigError) as e:
            make_plan(cfg_for(tiny_data, tmp_path / "r", *extra), 2)
        assert needle in str(e.value), (extra, str(e.value))
        assert "data." in str(e.value)  # names the config key


def test_non_empty_output_dir_is_refused(tiny_data, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        make_plan(cfg_for(tiny_data, out), 2)
    make_plan(cfg_for(tiny_data, out, "run.overwrite=true"), 2)


# 3. the CLI refuses before starting ranks -----------------------------------------------------------
def test_cli_bad_config_exits_2_before_any_rank(tiny_data, tmp_path, capsys):
    from megatron_sl.cli.train import main

    out = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra, needle in ([["train.global_batch_size=7"], "train.global_batch_size=7"],
                          [["model.preset=giant"], "model.preset='giant'"],
                          [["parallel.tensor_parallel=2", "model.ffn_hidden_size=127"], "ffn_hidden_size=127"],
                          [[f"data.prefix={tmp_path}/missing"], "data.prefix="],
                          [["optim.bogus=1"], "optim.bogus"]):
        rc = main(["--config", str(TINY_SL), *tiny_overrides(tiny_data, out, *extra)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("megatron-sl train: error:") and needle in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()
    assert main(["--check", "--config", str(TINY_SL), *tiny_overrides(tiny_data, out)]) == 0
    assert "config OK" in capsys.readouterr().out and not out.exists()


def test_cli_bad_config_subprocess(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run(megatron_sl_cmd("train", "--config", str(TINY_SL),
                               *tiny_overrides(tiny_data, out, "train.global_batch_size=12")), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and "train.global_batch_size=12 is not divisible" in lines[-1], proc.stderr
    assert "torch.distributed.run" not in proc.stderr and not out.exists()


# 4. DeepSpeed config ---------------------------------------------------------------------------------
def test_rendered_ds_config_takes_batches_from_training_config(tiny_data, tmp_path):
    from megatron_sl.training.ds_config import render_ds_config

    cfg = cfg_for(tiny_data, tmp_path / "r", "parallel.tensor_parallel=2", "train.micro_batch_size=2",
                  "train.global_batch_size=8", "deepspeed.zero_stage=2", "optim.clip_grad=0.7")
    ds = render_ds_config(cfg, make_plan(cfg, 4))  # world 4 = TP 2 x DP 2
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8  # micro x GA x DP, not x world (16)
    assert ds["gradient_clipping"] == 0.7 and ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    cfg0 = cfg_for(tiny_data, tmp_path / "r", "optim.clip_grad=0", "train.precision=bf16", "deepspeed.zero_stage=3")
    ds0 = render_ds_config(cfg0, make_plan(cfg0, 2))
    assert ds0["gradient_clipping"] == 0.0 and ds0["bf16"]["enabled"] is True
    assert ds0["zero_optimization"]["stage"] == 3
    from megatron_sl.resources import ds_template

    templates = sorted((REPO / "megatron_sl" / "ds_configs").glob("*.json"))
    assert templates and {ds_template(stage) for stage in range(4)} == set(templates)  # one per distinct layout
    assert len({p.read_text() for p in templates}) == len(templates) == 3
    for path in templates:  # templates never carry what the training config owns
        tmpl = json.loads(path.read_text())
        assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"} & set(tmpl), path
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ConfigError, match="sets 'train_micro_batch_size_per_gpu'"):
        make_plan(cfg_for(tiny_data, tmp_path / "r", f"deepspeed.config_template={bad}"), 2)
    with pytest.raises(ConfigError, match="zero_optimization.stage=1 but deepspeed.zero_stage=2"):
        bad.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
        make_plan(cfg_for(tiny_data, tmp_path / "r", f"deepspeed.config_template={bad}", "deepspeed.zero_stage=2"), 2)


# 5. schedule ---------------------------------------------------------------------------------------
def test_warmup_then_cosine_to_ten_percent():
    from megatron_sl.training.schedule import WarmupCosine

    s = WarmupCosine(peak_lr=3e-3, warmup_iters=10, total_iters=100, min_lr_ratio=0.1)
    lrs = [s.lr_at(i) for i in range(100)]
    assert lrs[0] == pytest.approx(3e-4) and lrs[9] == pytest.approx(3e-3)  # linear warmup, peak at its end
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[10] == pytest.approx(3e-3) and lrs[99] == pytest.approx(3e-4)  # ends at 10 % of peak
    mid = 10 + (99 - 10) / 2
    assert s.lr_at(int(mid)) == pytest.approx(3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    assert s.lr_lambda(99) == pytest.approx(0.1)
    assert WarmupCosine(1.0, 0, 1).lr_at(0) == pytest.approx(0.1)  # degenerate: one step, no warmup


# 6. param groups -----------------------------------------------------------------------------------
def test_param_groups_split_sharded_replicated_and_no_decay():
    from megatron_sl.training.optim import param_groups, state_bytes

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_B = torch.nn.Parameter(torch.zeros(4, 2))
            self.qkv_B.tensor_model_parallel = True
            self.qkv_A = torch.nn.Parameter(torch.zeros(2, 4))  # replicated factor
            self.values = torch.nn.Parameter(torch.zeros(3))
            self.values.tensor_model_parallel = True
            self.input_layernorm = torch.nn.Module()
            self.input_layernorm.weight = torch.nn.Parameter(torch.ones(4))
            self.bias = torch.nn.Parameter(torch.zeros(4))
            self.bias.tensor_model_parallel = True

    m = Tiny()
    names = {id(p): n for n, p in m.named_parameters()}
    g0 = param_groups(m, 0.0)
    assert [g["name"] for g in g0] == ["tp_sharded", "tp_replicated"]
    assert [sorted(names[id(p)] for p in g["params"]) for g in g0] == [
        ["bias", "qkv_B", "values"], ["input_layernorm.weight", "qkv_A"]]
    g1 = param_groups(m, 0.1)
    got = {g["name"]: (sorted(names[id(p)] for p in g["params"]), g["weight_decay"]) for g in g1}
    assert got == {"tp_sharded": (["qkv_B", "values"], 0.1), "tp_sharded_no_decay": (["bias"], 0.0),
                   "tp_replicated": (["qkv_A"], 0.1), "tp_replicated_no_decay": (["input_layernorm.weight"], 0.0)}
    opt = torch.optim.AdamW(g1, lr=1e-3)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    nbytes, numel = state_bytes([opt])
    assert numel == sum(p.numel() for p in m.parameters()) and nbytes == 8 * numel + 4 * 5  # moments + 5 step scalars
