"""Fixtures of the Slurm tests: a real local Slurm cluster (2 emulated nodes n1, n2 with 8 fake GPUs
each, started by scripts/slurm/up.sh and stopped by pid by scripts/slurm/down.sh) and a tiny
prepared dataset. Every test here is marked ``slurm``; they skip with the reason when the cluster
cannot be started here (not root, or Slurm missing and no apt-get to install it). CI runs as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = os.environ.get("SLURM_CI_BASE", "/tmp/slurm-ci")
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slurm)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm tests start a local Slurm cluster and need root (CI runs them as root)"
    if not all(shutil.which(b) for b in SLURM_BINARIES) and not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is not available to install it"
    return None


def _env() -> dict:
    env = dict(os.environ, NODES="2", FAKE_GPUS="8", SLURM_CI_BASE=BASE)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    why = _why_not()
    if why:
        pytest.skip(why)
    up = subprocess.run(["bash", str(REPO / "scripts/slurm/up.sh")], env=_env(), capture_output=True, text=True,
                        timeout=600)
    if up.returncode != 0:
        subprocess.run(["bash", str(REPO / "scripts/slurm/down.sh")], env=_env(), capture_output=True, timeout=120)
        pytest.fail(f"scripts/slurm/up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    print(up.stdout.strip().splitlines()[-1])
    yield BASE
    down = subprocess.run(["bash", str(REPO / "scripts/slurm/down.sh")], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 0, down.stderr
    for pidfile in Path(BASE).glob("*.pid"):
        pid = int(pidfile.read_text().strip() or 0)
        if pid:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":  # zombies of a non-init PID 1 are fine
                pytest.fail(f"{pidfile.name}: daemon {pid} still running after down.sh")


@pytest.fixture(scope="session")
def slurm_data(slurm_cluster, tmp_path_factory):
    """A 512-piece BPE over the stdlib pydoc corpus, prepared by the real pipeline (no network)."""
    from megatron_sl.corpus import prepare_demo_data

    prepared = prepare_demo_data(tmp_path_factory.mktemp("slurm-data"), vocab_size=512, sources=("pydoc",))
    return str(prepared.prefix), str(prepared.tokenizer_model)
