"""The memory planner (``megatron_sl.training.memory_plan``), ``megatron-sl plan`` and
``megatron-sl train --dry-run``.

* predicted per-rank peaks are within 10 % of the live-tensor peaks measured in real 2-rank trainings
  (``benchmarks/bench_memory.py``) for three engines: DeepSpeed ZeRO-0 AdamW TP1xDP2, ZeRO-2 TP2
  dense, per-layer pure-bf16 8-bit AdamW (which must also train: finite losses);
* the 7B plan needs no data, no ranks, < 10 s of CPU and < 2 GiB of memory;
* the dry-run keeps the format the Slurm test parses, outside a launcher and under one (only rank
  0 prints, every rank exits 0);
* per-rank tensors add up to the model's parameter count, recompute lowers planned activations,
  ZeRO partitions states, the paper's Fig. 3 setting is printed beside the paper's bars.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys

import pytest

from training_helpers import REPO, rank_env

from megatron_sl.model import count_parameters, get_preset
from megatron_sl.training.config import load_config
from megatron_sl.training.memory_plan import local_tensors, plan_ranks, resolve_plan

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MEASURED_CASES = ("tiny-sl-z0-adamw", "tiny-dense-z2-adamw-tp2", "tiny-sl-perlayer-bf16-adamw8bit")
TOLERANCE = 0.10


def test_planner_within_tolerance_of_measured_peaks(tiny_data, tmp_path):
    from benchmarks.bench_memory import format_table, run_cases

    table = run_cases(MEASURED_CASES, tiny_data, steps=2, workdir=tmp_path)
    report = format_table(table)
    for name, rows in table.items():
        assert len(rows) == 2, report
        for r in rows:
            assert "error_msg" not in r, (name, r.get("traceback"))
            assert abs(r["error"]) <= TOLERANCE, report
            assert all(math.isfinite(x) for x in r["losses"]) and r["losses"], (name, r["losses"])


def _plan(*overrides, world=None, config="configs/tiny_sl.yaml"):
    cfg = load_config(REPO / config, list(overrides))
    plan, _ = resolve_plan(cfg, world or cfg.launch.nproc_per_node)
    return cfg, plan


def test_plan_cli_7b_runs_anywhere_fast_and_small():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "megatron_sl.cli.main", "plan", "--config",
                           "configs/llama_7b_sl.yaml", "--json"], cwd=REPO, env=rank_env(), capture_output=True,
                          text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu_s < 10, cpu_s
    assert after.ru_maxrss < 2 * 2**20, after.ru_maxrss  # KiB
    out = json.loads(proc.stdout)
    assert out["world_size"] == 8 and out["tp"] == 1 and out["dp"] == 8 and "data not read" in out["note"]
    total = count_parameters("7b", "sl").total
    assert [r["rank"] for r in out["ranks"]] == list(range(8))
    for r in out["ranks"]:
        assert r["params"] == total
        assert sum(r["components_at_peak"].values()) == pytest.approx(r["peak_bytes"])
        assert 0 < r["model_state_bytes"] < r["peak_bytes"]
        assert r["components_at_peak"]["index"] == pytest.approx(4 * r["sparse"])


def test_tp_shards_add_up_to_the_model():
    p = get_preset("tiny")
    from megatron_sl.model.param_count import default_sl_config

    for variant in ("sl", "lowrank", "dense"):
        total = count_parameters(p, variant, default_sl_config(p)).total
        for tp in (1, 2, 4):
            shards = [local_tensors(p, variant, default_sl_config(p), p.vocab_size, tp, r) for r in range(tp)]
            sharded = sum(t.numel for s in shards for t in s if t.tp_sharded)
            replicated = sum(t.numel for t in shards[0] if not t.tp_sharded)
            assert sharded + replicated == total, (variant, tp)


def test_recompute_zero_and_tp_lower_the_plan():
    def rank0(*ov):
        return plan_ranks(*_plan(*ov), device="cpu")[0]

    acts = {m: rank0(f"model.recompute={m}").phases["forward"] for m in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]
    opt = {z: rank0(f"deepspeed.zero_stage={z}", "launch.nproc_per_node=4",
                    "train.global_batch_size=16").components["optimizer"] for z in (0, 1)}
    assert opt[1] == pytest.approx(opt[0] / 4, rel=0.05)
    one = rank0("model.seq_length=512", "launch.nproc_per_node=2", "train.global_batch_size=16")
    two = rank0("model.seq_length=512", "launch.nproc_per_node=4", "train.global_batch_size=16",
                "parallel.tensor_parallel=2")  # same DP, same accumulation
    assert two.params < one.params and two.phases["forward"] < one.phases["forward"]


def test_save_xa_adds_one_tokens_by_rank_tensor_per_sl_part():
    """sl.save_xa keeps x·Aᵀ, [T, r] for every token (also at TP=2: column parts' A is replicated), for
    each of a layer's 7 SL parts (q, k, v, o, gate, up, down) in every layer's forward peak."""
    from megatron_sl.training.memory_plan import activation_model, setting_from_config

    for tp in (1, 2):
        ov = ("sl.path=factored", "launch.nproc_per_node=2", f"parallel.tensor_parallel={tp}")
        per_layer = {}
        for save in (False, True):
            cfg, plan = _plan(*ov, f"sl.save_xa={str(save).lower()}")
            s = setting_from_config(cfg, plan, device="cpu")
            tensors = local_tensors(s.preset, s.variant, s.sl_config, s.vocab, s.tp, 0)
            per_layer[save] = activation_model(s, tensors)["per_layer"]
        T = plan.seq_length * cfg.train.micro_batch_size
        assert per_layer[True] - per_layer[False] == 7 * T * plan.sl_config.rank * 4, (tp, per_layer)
        assert plan.sl_config.save_xa


def test_plan_cli_table_and_bad_config(capsys):
    from megatron_sl.cli.main import main

    assert main(["plan", "--config", str(REPO / "configs/tiny_sl.yaml"), "model.recompute=full"]) == 0
    out = capsys.readouterr().out
    assert "[plan] sl preset 'tiny'" in out and "recompute full" in out and "activations" in out
    assert main(["plan", "--config", str(REPO / "configs/tiny_sl.yaml"), "parallel.tensor_parallel=3"]) == 2
    assert "parallel.tensor_parallel=3 does not divide the world size 2" in capsys.readouterr().err
    assert main(["plan", "--config", str(REPO / "configs/tiny_sl.yaml"), "model.recompute=some"]) == 2
    assert "model.recompute='some' is not one of" in capsys.readouterr().err


def _dry_rows(out: str, n: int):
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:4] == ["rank", "tp", "dp", "params"])
    return [lines[head + 1 + r].split() for r in range(n)]


def test_dry_run_without_a_launcher_needs_no_data_and_no_ranks(capsys, monkeypatch):
    from megatron_sl.cli.main import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train", "--config", str(REPO / "configs/llama_7b_sl.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[dry-run]" in out and "world 8 = TP 1 x DP 8" in out
    rows = _dry_rows(out, 8)
    assert [int(r[0]) for r in rows] == list(range(8))
    assert all(int(r[3].replace(",", "")) == count_parameters("7b", "sl").total and float(r[-1]) > 0 for r in rows)


def test_dry_run_under_a_launcher_rank0_prints_all_exit_0(capsys, monkeypatch):
    from megatron_sl.cli.main import main

    cfg = str(REPO / "configs/tiny_sl.yaml")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(["train", "--config", cfg, "--dry-run", "parallel.tensor_parallel=2"]) == 0
        out = capsys.readouterr().out
        if rank:
            assert out == ""
        else:
            assert "world 4 = TP 2 x DP 2" in out
            rows = _dry_rows(out, 4)
            assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]


def test_paper_fig3_table(capsys):
    from megatron_sl.cli.main import main

    assert main(["plan", "--paper-fig3", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert [rows[m]["paper_GB"] for m in rows] == [67.4, 29.4, 22.0, 18.3]
    assert rows["GaLore 8-bit + per-layer"]["ours_GB"] is None
    ours = [rows[m]["ours_GB"] for m in ("Adam (bf16)", "8-bit Adam + per-layer", "SLTrain 8-bit + per-layer")]
    assert ours[0] > ours[1] > ours[2]
    assert ours[2] < rows["SLTrain 8-bit + per-layer"]["paper_GB"]
    sl = rows["SLTrain 8-bit + per-layer"]
    assert sl["params"] == count_parameters("7b", "sl").total
    assert sum(sl["components_GB"].values()) == pytest.approx(sl["ours_GB"])
    assert main(["plan", "--paper-fig3"]) == 0
    assert "paper GB" in capsys.readouterr().out
