"""A non-editable ``pip install .`` carries everything ``megatron-sl demo`` needs.

The project is built as a wheel and installed (``--no-deps``: torch, megatron-core, DeepSpeed, ...
come from the test interpreter's environment, which already has them) into a fresh target
directory that is put first on ``PYTHONPATH``; the installed ``megatron-sl`` script then runs a
shortened demo from a directory outside the source tree. It fails when the training configs or
the DeepSpeed templates are not package data, or when code finds files through the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT_DEMO = ["--source", "pydoc", "--vocab-size", "512", "--sample-tokens", "0", "model.num_layers=2",
              "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=32", "sl.rank=8",
              "train.train_iters=4", "eval.iters=1", "eval.interval=0", "run.progress_bar=false",
              "metrics.tensorboard=false"]


def _env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


@pytest.mark.slow
def test_wheel_install_runs_the_demo_from_another_directory(tmp_path):
    # build from a copy, so the build leaves nothing in the checkout
    src = tmp_path / "src"
    top_level = {".git", ".venv", "data", "runs", "logs", "build", ".pytest_cache"}

    def ignore(directory, names):
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (Path(directory) == REPO and n in top_level)]

    shutil.copytree(REPO, src, symlinks=True, ignore=ignore)
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    shutil.rmtree(src)  # nothing may be read from the source tree any more
    assert not list(site.glob("megatron_sl*.egg-link")) and not list(site.glob("__editable__*"))
    shipped = {p.relative_to(site / "megatron_sl").as_posix() for p in (site / "megatron_sl").rglob("*.*")}
    assert {"configs/tiny_sl.yaml", "configs/llama_7b_sl.yaml", "ds_configs/zero12.json"} <= shipped

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(site)
    where = subprocess.run([sys.executable, "-c", "import megatron_sl; print(megatron_sl.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()) == site / "megatron_sl" / "__init__.py", where.stdout + where.stderr

    # the README's commands: the shipped config by its documented path, then the demo
    check = subprocess.run([str(site / "bin" / "megatron-sl"), "plan", "--config", "configs/llama_7b_sl.yaml"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "sl preset '7b'" in check.stdout, check.stdout[-2000:] + check.stderr[-2000:]
    out = elsewhere / "runs" / "demo_sl"
    demo = subprocess.run([str(site / "bin" / "megatron-sl"), "demo", *SHORT_DEMO], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert re.search(r"\[demo\] sl: validation perplexity [\d.]+ before -> [\d.]+ after training", demo.stdout)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004\n"
    config = (out / "config.yaml").read_text()
    assert "num_layers: 2" in config and "zero_stage: 1" in config
    assert (elsewhere / "data" / "demo").is_dir() and not (elsewhere / "configs").exists()
