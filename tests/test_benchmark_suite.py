"""``python -m benchmarks``: tables printed by a benchmark become CSV rows with the machine, and
RESULTS.md shows the newest run per device kind, each labelled with its device."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_memory import format_table  # noqa: E402
from benchmarks.suite import append_rows, parse_tables, read_rows, render  # noqa: E402

MIB = 2**20


def _table(scale):
    return {f"case-{c}": [{"rank": r, "predicted": scale * (10 + c) * MIB, "measured": (10 + c + r) * MIB,
                           "error": scale * (10 + c) / (10 + c + r) - 1, "predicted_phase": "backward",
                           "measured_phase": "optimizer"} for r in (0, 1)] for c in (1, 2)}


def _machine(kind, load="0.5"):
    return {"device_kind": kind, "device": f"{kind}: test device", "cpu": "test cpu", "cores": 2, "load": load,
            "torch": "2.x"}


def test_tables_round_trip_and_results_show_newest_run_per_device(tmp_path):
    out = format_table(_table(1.0))
    (heading, rows), = parse_tables(out)
    assert heading.startswith("Memory planner vs measured")
    assert [r["case"] for r in rows] == ["case-1", "case-1", "case-2", "case-2"]
    assert rows[3]["rank"] == "1" and rows[3]["predicted MiB"] == "12.0" and rows[3]["measured MiB"] == "13.0"

    csv_path = tmp_path / "results" / "results.csv"
    assert append_rows("memory", format_table(_table(2.0)), _machine("CPU"), "2026-01-01T00:00:00Z", "old",
                       csv_path) == 4
    assert append_rows("memory", out, _machine("CPU", "1.5"), "2026-02-01T00:00:00Z", "new", csv_path) == 4
    assert len(read_rows(csv_path)) == 8
    md = render(csv_path, tmp_path / "RESULTS.md").read_text()
    memory = md[md.index("## memory"):md.index("## fidelity")]
    assert "**CPU** — CPU: test device" in memory and "commit new" in memory and "load average 1.5" in memory
    assert "| case-2 | 1 | 12.0 | 13.0 | -7.7% |" in memory
    assert "24.0" not in memory  # the older run (predicted 2x) is not shown
    assert "**GPU**: not measured yet." in memory
    # worst error of the newest CPU run: case-1 rank 1, 11/12 - 1
    assert "- CPU memory planner: worst error -8.3% (case-1, 4 rank measurements)" in md
    assert "## layer" in md and md.count("not measured yet") >= 2 * 5 - 1
