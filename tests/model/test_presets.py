"""LLaMA presets and their parameter counts against the SLTrain paper's model sizes, the
``megatron-sl presets`` command, and bad-input errors (no processes, no megatron import needed).

The expected numbers were computed independently from the research code's configs
(andyjm3/SLTrain, arXiv 2406.02214), at the precision given here (M = 1e6 parameters; index GB at int64 = 8 bytes/nnz).
"""

from __future__ import annotations

import json

import pytest

from megatron_sl.core import SLConfig
from megatron_sl.model import PRESETS, count_parameters, get_preset
from megatron_sl.model.build import check_parallel_shape

# size: (Full, linear part, other, Low-Rank, SLTrain, SLTrain/Full, sparse values M, int64 index GB)
PAPER_COUNTS = {
    "60m": (58.1, 25.3, 32.8, 42.8, 43.5, 0.75, 0.76, 0.006),
    "130m": (134.1, 84.9, 49.2, 94.0, 96.5, 0.72, 2.5, 0.02),
    "350m": (368.0, 302.4, 65.6, 185.2, 194.3, 0.53, 9.1, 0.07),
    "1b": (1339.1, 1207.9, 131.2, 609.3, 645.5, 0.48, 36.2, 0.29),
    "7b": (6738.4, 6476.0, 262.4, 2820.9, 3144.7, 0.47, 324.0, 2.59),  # the 7B preset uses δ=0.05
}
PAPER_COUNTS_7B_DELTA_003 = (3015.2, 194.0, 1.55)  # SLTrain total, sparse (M), index GB at δ=0.03


def _digits(x) -> int:
    s = repr(x)
    return len(s.split(".")[1]) if "." in s else 0


def _rounded(value, like) -> float:
    return round(value, _digits(like))


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_counts_match_paper_sizes(name):
    full, linear, other, lowrank_total, sl_total, ratio, sparse, index_gb = PAPER_COUNTS[name]
    f, lr, sl = (count_parameters(name, v) for v in ("dense", "lowrank", "sl"))
    m = lambda n: n / 1e6  # noqa: E731
    assert _rounded(m(f.total), full) == full
    assert _rounded(m(f.total - sl.dense), linear) == linear
    assert _rounded(m(sl.dense), other) == other
    assert _rounded(m(lr.total), lowrank_total) == lowrank_total
    assert _rounded(m(sl.total), sl_total) == sl_total
    assert _rounded(sl.total / f.total, ratio) == ratio
    sparse_m = m(sl.sparse)
    assert _rounded(sparse_m, sparse) == sparse or round(sparse_m) == sparse  # "194M"-style entries
    assert _rounded(sl.sparse * 8 / 1e9, index_gb) == index_gb
    assert sl.index_bytes == 4 * sl.sparse  # we store int32 (every matrix < 2^31 entries)
    assert lr.sparse == 0 and lr.low_rank == sl.low_rank and f.low_rank == 0 and f.dense == f.total


def test_7b_at_paper_table_density():
    p = get_preset("7b")
    c = count_parameters(p, "sl", SLConfig(rank=p.rank, density=0.03, alpha=p.alpha))
    total, sparse, index_gb = PAPER_COUNTS_7B_DELTA_003
    assert round(c.total / 1e6, 1) == total and round(c.sparse / 1e6) == sparse
    assert round(c.sparse * 8 / 1e9, 2) == index_gb


def test_preset_defaults():
    assert get_preset("7B").density == 0.05 and get_preset("60m").alpha == 32.0
    for name in ("60m", "130m", "350m", "1b", "7b"):
        p = PRESETS[name]
        assert (p.vocab_size, p.seq_length, p.num_query_groups) == (32000, 256, p.num_attention_heads)
    tiny = get_preset("tiny")
    assert (tiny.hidden_size, tiny.num_query_groups, tiny.vocab_size) == (256, 2, 8000)


def test_cli_table_and_json(capsys):
    from megatron_sl.cli.presets import main

    assert main([]) == 0
    table = capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines()[1:]] == list(PRESETS)
    row_60m = next(line for line in table.splitlines() if line.split()[0] == "60m").split()
    assert row_60m[9:12] == ["58.1M", "42.8M", "43.5M"] and row_60m[14] == "0.76M"
    assert main(["--preset", "7b", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["sl"] == count_parameters("7b", "sl").as_dict() and row["full"] == count_parameters("7b", "dense").total


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown preset '3b'; valid presets: tiny, 60m, 130m, 350m, 1b, 7b"):
        get_preset("3b")
    from megatron_sl.cli.presets import main
    assert main(["--preset", "3b"]) == 2
    with pytest.raises(ValueError, match="variant='full'"):
        count_parameters("60m", "full")
    with pytest.raises(ValueError, match=r"rank=600 exceeds min\(out, in\)=512 of the q matrix"):
        count_parameters("60m", "sl", SLConfig(rank=600))
    p = get_preset("60m")
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tensor-parallel size 3"):
        check_parallel_shape(p, 3, 32000, 256, False)
    with pytest.raises(ValueError, match="ffn_hidden_size=5461 is not divisible by tensor-parallel size 2"):
        check_parallel_shape(get_preset("1b"), 2, 32000, 256, False)
    with pytest.raises(ValueError, match="seq_length=255"):
        check_parallel_shape(p, 2, 32000, 255, True)
    check_parallel_shape(get_preset("tiny"), 4, 8000, 256, True)  # GQA with 2 groups < TP=4 is allowed
