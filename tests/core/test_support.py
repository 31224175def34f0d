"""The fixed random support: determinism across calls and processes, independence from the
global RNG, uniformity, and the tensor-parallel shards that reassemble the global support."""

import subprocess
import sys

import pytest
import torch

from megatron_sl.core import support as sup


def test_deterministic_across_calls_and_global_rng():
    a = sup.global_support(50, 70, 0.05, seed=3, name="decoder.layers.0.mlp")
    torch.manual_seed(999)
    torch.rand(100)
    b = sup.global_support(50, 70, 0.05, seed=3, name="decoder.layers.0.mlp")
    assert torch.equal(a, b)
    assert a.dtype == torch.int32
    assert a.numel() == int(0.05 * 50 * 70)
    assert torch.all(a[1:] > a[:-1]), "sorted and distinct"
    assert int(a.min()) >= 0 and int(a.max()) < 50 * 70


def test_same_across_processes():
    code = ("from megatron_sl.core import support as s;"
            "print(s.support_hash(s.global_support(64, 96, 0.03, 7, 'x.y'), (64, 96)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == sup.support_hash(sup.global_support(64, 96, 0.03, 7, "x.y"), (64, 96))


def test_different_names_and_seeds_differ():
    base = sup.global_support(64, 96, 0.03, 7, "a")
    assert not torch.equal(base, sup.global_support(64, 96, 0.03, 7, "b"))
    assert not torch.equal(base, sup.global_support(64, 96, 0.03, 8, "a"))


@pytest.mark.parametrize("numel,k", [(20, 5), (200, 10)])  # randperm branch and sparse-draw branch
def test_uniform_inclusion(numel, k):
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(numel)
    draws = 3000
    for _ in range(draws):
        counts[sup.sample_uniform_subset(numel, k, g)] += 1
    freq = counts / draws
    expected = k / numel
    sd = (expected * (1 - expected) / draws) ** 0.5
    assert torch.all((freq - expected).abs() < 5 * sd), (freq.min(), freq.max(), expected)


def test_row_shards_union_is_global():
    out_f, in_f, tp = 30, 17, 3
    idx = sup.global_support(out_f, in_f, 0.2, 1, "col")
    seen = []
    for r in range(tp):
        rows = torch.arange(r * out_f // tp, (r + 1) * out_f // tp)
        local, pos = sup.select_rows(idx, in_f, rows)
        assert torch.all(local[1:] > local[:-1])
        glob = rows[local.long() // in_f] * in_f + local.long() % in_f
        assert torch.equal(glob, idx[pos].long())
        seen.append(pos)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(idx.numel()))


def test_strided_row_selection_for_fused_layouts():
    # rank 1 of 2 of a stride-2 [gate; up] matrix: rows 5..9 and 15..19 of 20
    idx = sup.global_support(20, 9, 0.3, 1, "fc1")
    rows = torch.cat([torch.arange(5, 10), torch.arange(15, 20)])
    local, pos = sup.select_rows(idx, 9, rows)
    dense = torch.zeros(20 * 9)
    dense[idx.long()] = torch.arange(1, idx.numel() + 1, dtype=torch.float)
    local_dense = torch.zeros(10 * 9)
    local_dense[local.long()] = (pos + 1).float()
    assert torch.equal(local_dense.view(10, 9), dense.view(20, 9)[rows])


def test_column_shards_union_is_global():
    out_f, in_f, tp = 11, 24, 4
    idx = sup.global_support(out_f, in_f, 0.25, 2, "row")
    dense = torch.zeros(out_f * in_f)
    dense[idx.long()] = torch.arange(1, idx.numel() + 1, dtype=torch.float)
    parts, seen = [], []
    w = in_f // tp
    for r in range(tp):
        local, pos = sup.select_cols(idx, out_f, in_f, r * w, (r + 1) * w)
        assert torch.all(local[1:] > local[:-1])
        ld = torch.zeros(out_f * w)
        ld[local.long()] = (pos + 1).float()
        parts.append(ld.view(out_f, w))
        seen.append(pos)
    assert torch.equal(torch.cat(parts, dim=1), dense.view(out_f, in_f))
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(idx.numel()))


def test_empty_support():
    idx = sup.global_support(5, 5, 0.0, 0, "none")
    assert idx.numel() == 0
    local, pos = sup.select_rows(idx, 5, [0, 1])
    assert local.numel() == 0 and pos.numel() == 0


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(sup, "TILE", 4)


def test_tile_counts_sum_to_nnz(small_tiles):
    counts = sup.tile_counts(10, 9, 37, seed=1, name="t")
    assert len(counts) == 3 * 3 and sum(counts) == 37
    assert all(0 <= c <= 16 for c in counts)


def test_restricted_samples_equal_the_full_sample(small_tiles):
    full = sup.sample_support(11, 10, 0.3, 4, "shard")
    assert full.idx.numel() == int(0.3 * 11 * 10)
    rows = torch.tensor([0, 5, 6, 7, 10])
    part = sup.sample_support(11, 10, 0.3, 4, "shard", rows=rows)
    keep = torch.isin(full.idx // 10, rows)
    assert torch.equal(part.idx, full.idx[keep]) and torch.equal(part.uniform, full.uniform[keep])
    part = sup.sample_support(11, 10, 0.3, 4, "shard", cols=(3, 7))
    keep = (full.idx % 10 >= 3) & (full.idx % 10 < 7)
    assert torch.equal(part.idx, full.idx[keep]) and torch.equal(part.uniform, full.uniform[keep])


def test_uniform_inclusion_across_tiles(small_tiles):
    # 6x7 matrix -> 4 tiles of different sizes; every cell must be included with probability k/numel
    numel, k, draws = 42, 9, 3000
    counts = torch.zeros(numel)
    for s in range(draws):
        counts[sup.sample_support(6, 7, k / numel + 1e-9, s, "u").idx] += 1
    freq, expected = counts / draws, k / numel
    sd = (expected * (1 - expected) / draws) ** 0.5
    assert torch.all((freq - expected).abs() < 5 * sd), (freq.min(), freq.max(), expected)


def test_stacked_supports_form_the_block_matrix():
    """SupportLayout.stacked: the parts' supports at their row offsets of one [rows, in] matrix
    (gaps and an empty part included), canonical again, and the same values land where each part
    had them; overlapping or misfitting parts are refused."""
    from megatron_sl.core.reference import SupportLayout, densify_reference

    n = 11
    parts = [(SupportLayout(sup.global_support(m, n, 0.3, 5, f"p{m}"), m, n), off)
             for m, off in ((7, 0), (5, 9), (3, 14))]
    parts.append((SupportLayout(torch.empty(0, dtype=torch.int32), 4, n), 17))  # a part without support
    st = SupportLayout.stacked(parts, 23, "cpu")
    assert st.shape == (23, n) and st.idx.dtype == torch.int32
    assert torch.all(st.idx[1:] > st.idx[:-1]), "canonical: sorted and distinct"
    vals = [torch.randn(lay.nnz, dtype=torch.float64) for lay, _ in parts]
    zeros = lambda r: (torch.zeros(r, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64))  # noqa: E731
    W = densify_reference(*zeros(23), torch.cat(vals), st.idx.long(), 1.0)
    expect = torch.zeros(23, n, dtype=torch.float64)
    for (lay, off), v in zip(parts, vals):
        expect[off:off + lay.shape[0]] = densify_reference(*zeros(lay.shape[0]), v, lay.idx.long(), 1.0)
    assert torch.equal(W, expect)
    with pytest.raises(ValueError, match="does not fit"):
        SupportLayout.stacked([parts[0], (parts[1][0], 5)], 23, "cpu")  # overlaps part 0's rows
    with pytest.raises(ValueError, match="does not fit"):
        SupportLayout.stacked(parts, 20, "cpu")  # the last part ends past the matrix
