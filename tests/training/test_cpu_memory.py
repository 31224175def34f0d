"""CPU ranks keep freed memory for reuse (``distributed.retain_freed_memory``): measured with the
process's minor page faults, in fresh interpreters (the setting is process-wide and one-way)."""

import json
import os
import subprocess
import sys

import pytest

from megatron_sl.training.config import load_config

# A training step's pattern: the same blocks allocated and freed every step. glibc's mmap threshold is
# pinned at its 128 KiB start value (MALLOC_MMAP_THRESHOLD_), so by default every block is mapped and
# faulted in again each step; retain_freed_memory() must override that.
PROBE = """
import json, resource, sys, torch
from megatron_sl.training.distributed import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(30):
    a = torch.empty(2 * 2**20).fill_(1.0)       # 8 MiB
    b = torch.empty(3 * 2**20 // 2).fill_(1.0)  # 6 MiB
    del a, b
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""
STEP_PAGES = 14 * 256  # 14 MiB of 4 KiB pages


def _probe(mode: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_instead_of_faulted_in_again():
    default, retained = _probe("default"), _probe("retain")
    assert retained["applied"] is True
    assert default["faults"] >= 0.9 * 30 * STEP_PAGES, default  # every step faults its 14 MiB in again
    assert retained["faults"] <= 0.25 * default["faults"], (retained, default)  # the first steps' pages, reused


def test_retention_is_on_by_default_and_can_be_switched_off():
    assert load_config(None, []).launch.cpu_retain_freed_memory is True
    assert load_config(None, ["launch.cpu_retain_freed_memory=false"]).launch.cpu_retain_freed_memory is False
