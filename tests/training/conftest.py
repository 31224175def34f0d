"""Fixtures of the training tests: a small real dataset, prepared once per session.

``tiny_data`` prepares the stdlib ``pydoc_data`` corpus (no network) with a 512-piece BPE through
the real data pipeline (``megatron_sl.corpus.prepare_demo_data``).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from megatron_sl.corpus import prepare_demo_data

    prepared = prepare_demo_data(tmp_path_factory.mktemp("data"), vocab_size=512, sources=("pydoc",))
    return str(prepared.prefix), str(prepared.tokenizer_model)
