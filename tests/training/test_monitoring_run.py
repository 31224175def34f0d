"""Run metrics of real 2-rank runs (SL and dense, the shrunk tiny model): TensorBoard event files
read back with tensorboard's EventAccumulator, the monitoring fields of ``metrics.jsonl`` (MFU
against the 6·N·tokens rule, per-rank figures, checkpoint sizes), ``megatron-sl report`` over
both runs, the ``metrics:`` config checks (exit 2, one message, before any rank starts), and the
registry's counters for skipped / non-finite steps and failed checkpoints (one gloo rank, textfile
sink parsed back).
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_sl.training.monitoring.registry import dir_bytes
from training_helpers import REPO, megatron_sl_cmd, run, tiny_overrides

STEPS = 12


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    outs = {}
    for variant in ("sl", "dense"):
        out = root / f"tiny_{variant}"
        proc = run(megatron_sl_cmd("train", "--config", str(REPO / "configs" / "tiny_sl.yaml"),
                                   *tiny_overrides(tiny_data, out, "launch.nproc_per_node=2", f"model.variant={variant}",
                                                   f"train.train_iters={STEPS}", "eval.interval=6", "eval.iters=1",
                                                   "run.save_interval=6")))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        outs[variant] = out
    return outs


@pytest.mark.slow
def test_tensorboard_event_files_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = runs["sl"]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_s", "throughput/mfu_sl",
                "throughput/mfu_dense_equivalent", "time/step_s", "time/data_s", "time/forward_backward_s",
                "time/optimizer_s", "memory/rank0_bytes", "memory/rank1_bytes", "throughput/rank1_tokens_per_s",
                "eval/val_loss", "eval/val_ppl", "checkpoint/duration_s", "checkpoint/size_bytes"):
        assert tag in tags, (tag, sorted(tags))
    recs = _records(out)
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == list(range(1, STEPS + 1)) == sorted(train)
    for step, v in loss.items():
        assert v == pytest.approx(train[step]["loss"], rel=1e-6)
    for tag, key in (("train/lr", "lr"), ("throughput/mfu_sl", "mfu"), ("time/optimizer_s", "optimizer_s")):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([train[s][key] for s in sorted(train)], rel=1e-5)
    evals = {r["step"]: r["val_ppl"] for r in recs if r["kind"] == "eval"}
    assert {e.step: pytest.approx(evals[e.step], rel=1e-5) for e in acc.Scalars("eval/val_ppl")} == evals
    assert sorted(e.step for e in acc.Scalars("checkpoint/size_bytes")) == [6, 12]
    assert "config/text_summary" in acc.Tags()["tensors"]


@pytest.mark.slow
def test_metrics_jsonl_monitoring_fields(runs):
    for variant, out in runs.items():
        recs = _records(out)
        (info,) = [r for r in recs if r["kind"] == "run"]
        summary = json.loads((out / "summary.json").read_text())
        assert (info["run"], info["job_id"], info["tp"], info["dp"]) == (out.name, "local", "1", "2")
        assert info["params_split"]["total"] == summary["params"] == info["params"]
        assert info["peak_flops_source"] == "measured" and info["peak_flops_per_device"] > 1e8
        # the dense model's FLOPs by the 6 x matmul-parameters x tokens rule (+ attention scores), from
        # the parameter count: every parameter but the embedding table and the RMSNorm weights is a GEMM's
        d, layers, seq, tokens = 64, 2, 32, info["tokens_per_step"]
        if variant == "dense":
            matmul_params = info["params"] - info["vocab_size"] * d - (2 * layers + 1) * d
            assert info["flops_per_step"] == 6 * tokens * matmul_params + 12 * tokens * layers * seq * d
        assert info["dense_equivalent_flops_per_step"] >= info["flops_per_step"]
        train = [r for r in recs if r["kind"] == "train"]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        for r in train:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples", "step_time_s"):
                assert r[key] is not None and math.isfinite(r[key]), (key, r)
            phases = r["data_s"] + r["forward_backward_s"] + r["optimizer_s"]
            assert 0 < phases <= r["step_time_s"] * 1.001 + 1e-4, r
            assert r["forward_backward_s"] > 0 and r["optimizer_s"] > 0
            assert len(r["rank_tokens_per_s"]) == len(r["rank_memory_bytes"]) == 2
            assert all(m > 50 * 2**20 for m in r["rank_memory_bytes"]) and r["memory_kind"] == "rss_peak"
            assert r["tokens_per_s"] == pytest.approx(info["tokens_per_step"] / r["step_time_s"])
            assert r["mfu"] == pytest.approx(info["flops_per_step"] / (r["step_time_s"] * 2 * info["peak_flops_per_device"]))
            assert 0 < r["mfu"] <= r["mfu_dense_equivalent"] < 1
            if variant == "dense":
                assert r["mfu"] == r["mfu_dense_equivalent"]
            assert r["opt_state_bytes"] == summary["opt_state_bytes"]
            assert r["nonfinite_loss_steps"] == 0 and r["skipped_steps"] == 0
        if variant == "sl":
            assert train[-1]["mfu"] < train[-1]["mfu_dense_equivalent"]
        assert train[6]["checkpoint_s"] > 0  # step 7's record carries the step-6 save
        ckpts = [r for r in recs if r["kind"] == "checkpoint"]
        assert [(c["step"], c["ok"]) for c in ckpts] == [(6, True), (12, True)]
        for c in ckpts:
            assert c["size_bytes"] == dir_bytes(c["path"]) > 0 and c["duration_s"] > 0


@pytest.mark.slow
def test_report_overlays_runs(runs, tmp_path):
    import matplotlib.image

    report = tmp_path / "report"
    proc = run(megatron_sl_cmd("report", str(runs["sl"]), str(runs["dense"]), "--output", str(report)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"[report] {report / 'index.html'}"
    page = (report / "index.html").read_text()
    for png in ("loss.png", "lr.png", "throughput.png", "memory.png", "step_time.png"):
        img = matplotlib.image.imread(report / png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500, (png, img.shape)
        assert img[..., :3].std() > 0.05  # not a blank canvas
        assert f'href="{png}"' in page
    assert "tiny_sl" in page and "tiny_dense" in page and "low_rank" in page
    assert "final validation perplexity" in page and "MFU % dense-equivalent" in page
    assert "train_iters: 12" in page  # the config


def test_report_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    from megatron_sl.cli.report import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"megatron-sl report: error: run directory {str(tmp_path)!r} has no metrics.jsonl " \
                  "(not a megatron-sl run directory?)"
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("override, message", [
    ("metrics.prometheus_port=70000", "metrics.prometheus_port=70000 must be a TCP port"),
    ("metrics.peak_tflops=0", "metrics.peak_tflops=0.0 must be > 0"),
    ("metrics.prometheus_textfile=/tmp/{host}.prom", "bad placeholder 'host'"),
    ("metrics.prometheus_textfile=/tmp/x.txt", "must end in .prom"),
    ("metrics.wandb_mode=cloud", "metrics.wandb_mode='cloud' is not one of ['offline', 'online']"),
])
def test_bad_metrics_config_exits_2_before_any_rank(tiny_data, tmp_path, capsys, override, message):
    from megatron_sl.cli.train import main

    out = tmp_path / "run"
    assert main(["--config", str(REPO / "configs" / "tiny_sl.yaml"), *tiny_overrides(tiny_data, out, override)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_wandb_true_needs_the_package(tiny_data, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the check is for machines without it")
    from megatron_sl.cli.train import main

    assert main(["--config", str(REPO / "configs" / "tiny_sl.yaml"),
                 *tiny_overrides(tiny_data, tmp_path / "run", "metrics.wandb=true")]) == 2
    assert "metrics.wandb=true needs the wandb package" in capsys.readouterr().err


def test_step_flops_order_of_the_variants():
    from megatron_sl.model.presets import get_preset
    from megatron_sl.model.param_count import default_sl_config
    from megatron_sl.parallel.variants import variant_sl_config
    from megatron_sl.training.monitoring.flops import step_flops

    preset = get_preset("tiny")
    slc = default_sl_config(preset)
    f = {v: step_flops(preset, variant_sl_config(slc, v), 4, 8, 8064, "cpu") for v in ("sl", "lowrank", "dense")}
    assert f["dense"]["sl"] == f["dense"]["dense_equivalent"] == f["sl"]["dense_equivalent"]
    assert f["lowrank"]["sl"] < f["sl"]["sl"] < f["dense"]["sl"]
    # forcing the dense-materialise path: each SL matrix costs 6Tmn + 8mnr (W formed twice, dB, dA)
    import dataclasses

    from megatron_sl.model.param_count import slot_matrices

    forced = step_flops(preset, dataclasses.replace(slc, path="dense"), 4, 8, 8064, "cpu")
    extra = 2 * preset.num_layers * sum(8 * m * n * slc.rank for mats in slot_matrices(preset).values()
                                         for _, m, n in mats)
    assert forced["sl"] == f["dense"]["sl"] + extra


def _registry_events(rank, world_size, out):
    """Inside a gloo rank: a registry with the textfile sink; two steps (one NaN), one skipped step,
    one committed and one failed checkpoint; returns what the textfile and metrics.jsonl hold."""
    from prometheus_client.parser import text_string_to_metric_families

    from megatron_sl.training.config import load_config
    from megatron_sl.training.metrics import MetricsLog
    from megatron_sl.training.monitoring import MetricsRegistry
    from megatron_sl.training.config_checks import make_plan
    import torch

    textfile = out / "msl.prom"
    cfg = load_config(REPO / "configs" / "tiny_sl.yaml",
                      ["launch.nproc_per_node=1", "train.global_batch_size=4", f"run.output_dir={out}",
                       "metrics.tensorboard=false", f"metrics.prometheus_textfile={textfile}", "metrics.peak_tflops=1"])
    plan = make_plan(cfg, world_size, check_inputs=False, check_outputs=False)
    log = MetricsLog(out / "metrics.jsonl")
    reg = MetricsRegistry(cfg, plan, run_dir=out, device="cpu", tdev=torch.device("cpu"), metrics_log=log,
                          state_bytes=lambda: (1000, 250), num_params=123)
    for step, loss in ((1, 5.0), (2, float("nan"))):
        reg.step_begin()
        reg.lap("data")
        reg.lap("forward_backward")
        reg.lap("optimizer")
        if step == 2:
            reg.step_skipped("nonfinite_loss")
        reg.step(step, loss, 1e-3, 1.0, 0.5)
    ckpt = out / "ckpt"
    ckpt.mkdir()
    (ckpt / "w.bin").write_bytes(b"x" * 4096)
    with reg.checkpointing(2) as rec:
        rec.path = str(ckpt)
    try:
        with reg.checkpointing(2):
            raise OSError("disk full")
    except OSError:
        pass
    reg.close()
    log.close()
    fams = {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
            for f in text_string_to_metric_families(textfile.read_text())}
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return fams, recs


def test_registry_counts_skips_nonfinite_losses_and_checkpoint_failures(tmp_path):
    from _dist import run_distributed

    (fams, recs), = run_distributed(_registry_events, 1, tmp_path)
    labels = (("dp", "1"), ("job_id", "local"), ("run", tmp_path.name), ("tp", "1"))
    one = lambda name: fams[name][labels]  # noqa: E731
    assert one("msl_nonfinite_loss_steps") == 1 and one("msl_train_steps") == 2
    assert fams["msl_skipped_steps"][tuple(sorted(labels + (("reason", "nonfinite_loss"),)))] == 1
    assert one("msl_checkpoints") == 1 and one("msl_checkpoint_failures") == 1
    assert one("msl_checkpoint_size_bytes") == 4096 and one("msl_run_finished") == 1
    assert math.isnan(one("msl_train_loss"))
    # MFU against the configured 1 TFLOP/s: model FLOPs per step / (0.5 s x 1 device x 1e12)
    flops = fams["msl_model_flops_per_step"][tuple(sorted(labels + (("basis", "sl"),)))]
    assert fams["msl_mfu_ratio"][tuple(sorted(labels + (("basis", "sl"),)))] == pytest.approx(flops / 0.5e12)
    train = [r for r in recs if r["kind"] == "train"]
    assert [(r["loss"], r["nonfinite_loss_steps"], r["skipped_steps"]) for r in train] == [(5.0, 0, 0), (None, 1, 1)]
    assert [(r["ok"], r["size_bytes"]) for r in recs if r["kind"] == "checkpoint"] == [(True, 4096), (False, None)]
