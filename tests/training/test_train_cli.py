"""The real entry points, as users run them (2 CPU ranks, the shrunk tiny model):

1. ``megatron-sl train --config configs/tiny_sl.yaml ...`` starting its own torchrun ranks: run
   directory contents (resolved config, rendered DeepSpeed config, metrics, summary, checkpoint);
2. the same trainer under the ``deepspeed`` launcher (``--module megatron_sl.cli.train``);
3. ``megatron-sl demo``: data preparation + training + perplexity before/after + checkpoint + run
   report (offline ``pydoc`` corpus source), and its refusal of a bad variant;
4. launcher environment mapping (Slurm / Open MPI variables -> torch's).
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from megatron_sl.training.config import load_config
from training_helpers import REPO, TINY_SHAPE, megatron_sl_cmd, run, tiny_overrides

TINY_SL = REPO / "configs" / "tiny_sl.yaml"


def loss_fell(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["last_loss"] < s["first_loss"] and s["final_val_loss"] < s["initial_val_loss"], s
    return s


@pytest.mark.slow
def test_train_cli_launches_torchrun_and_writes_the_run_dir(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run(megatron_sl_cmd("train", "--config", str(TINY_SL),
                               *tiny_overrides(tiny_data, out, "train.train_iters=8", "eval.interval=4",
                                               "eval.iters=2", "run.progress_bar=true")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert re.search(r"\[eval\] before training step 0: validation loss [\d.]+, perplexity [\d.]+", proc.stdout)
    assert "[eval] after training step 8" in proc.stdout and "[ckpt] saved" in proc.stdout
    assert "tok/s" in proc.stderr and "lr=" in proc.stderr  # the progress bar (rank 0 only)
    assert proc.stdout.count("[eval] before training") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.iterdir()) == [".megatron-sl.lock", "checkpoints", "config.yaml",
                                                      "ds_config.json", "metrics.jsonl", "summary.json", "tensorboard"]
    resolved = load_config(out / "config.yaml")
    assert resolved.train.train_iters == 8 and resolved.model.hidden_size == 64
    ds = json.loads((out / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"], ds["zero_optimization"]["stage"]) == (8, 4, 1, 1.0, 1)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008\n"
    assert (out / "checkpoints" / "step_00000008" / "engine" / "ds" / "mp_rank_00_model_states.pt").is_file()
    assert (out / "checkpoints" / "step_00000008" / "manifest.json").is_file()
    s = loss_fell(out)
    assert s["world_size"] == 2 and s["dp"] == 2 and s["checkpoint"].endswith("step_00000008")


@pytest.mark.slow
def test_train_under_the_deepspeed_launcher(tiny_data, tmp_path):
    from _dist import free_port

    out = tmp_path / "ds"
    deepspeed = [sys.executable, "-c", "import sys; from deepspeed.launcher.runner import main; sys.exit(main())"]
    proc = run([*deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "megatron_sl.cli.train",
                "--config", str(TINY_SL),
                *tiny_overrides(tiny_data, out, "train.train_iters=6", "eval.interval=0", "eval.iters=2",
                                "deepspeed.zero_stage=2", "optim.name=adamw8bit")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = loss_fell(out)
    assert s["world_size"] == 2 and s["zero_stage"] == 2 and s["opt_state_bytes_per_param"] < 3


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo_run"
    proc = run(megatron_sl_cmd("demo", "--data-dir", str(tmp_path / "data"), "--source", "pydoc", "--vocab-size",
                               "512", "--output-dir", str(out), *TINY_SHAPE, "train.train_iters=10", "eval.iters=2",
                               "eval.interval=5", "run.progress_bar=false"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"\[demo\] sl: validation perplexity ([\d.]+) before -> ([\d.]+) after training", proc.stdout)
    assert m and float(m.group(2)) < float(m.group(1)), proc.stdout
    ckpt = re.search(r"\[demo\] checkpoint: (\S+);", proc.stdout).group(1)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000010\n" and ckpt.endswith("step_00000010")
    assert (tmp_path / "data" / "demo").is_dir()
    report = re.search(r"\[demo\] report \(plots \+ HTML summary\): (\S+)", proc.stdout).group(1)
    assert report == str(out / "report" / "index.html")
    assert all((out / "report" / png).is_file() for png in ("loss.png", "throughput.png", "step_time.png"))
    sample = re.search(r"\[demo\] greedy sample: [\"'](.*)[\"']$", proc.stdout, re.M)
    assert sample and sample.group(1).startswith("It is a truth universally acknowledged"), proc.stdout[-2000:]
    assert len(sample.group(1)) > len("It is a truth universally acknowledged")


def test_demo_rejects_bad_variant_before_fetching(tmp_path, capsys):
    from megatron_sl.cli.demo import main

    assert main(["--data-dir", str(tmp_path / "d"), "variant=sparse"]) == 2
    assert "variant='sparse' is not one of" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path / "d"), "train.train_iters=0"]) == 2
    assert "train.train_iters=0 must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_launcher_environment_mapping():
    from megatron_sl.training.distributed import in_launcher, map_launcher_env, rank_env

    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_NODELIST": "nodeA", "MASTER_ADDR": "10.0.0.1", "SLURM_JOB_ID": "77"}
    map_launcher_env(slurm)
    assert (slurm["RANK"], slurm["WORLD_SIZE"], slurm["LOCAL_RANK"], slurm["MASTER_ADDR"]) == ("3", "4", "1", "10.0.0.1")
    assert rank_env(slurm).world_size == 4
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert in_launcher(ompi) and rank_env(ompi) == type(rank_env(ompi))(1, 2, 1)
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"}  # sbatch body, not srun
    assert not in_launcher(batch_script) and "RANK" not in batch_script
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "5", "SLURM_STEP_ID": "1"}
    map_launcher_env(torchrun)
    assert rank_env(torchrun).rank == 0  # a launcher's own variables win
