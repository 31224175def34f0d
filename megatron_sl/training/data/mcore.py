"""Lazy, quiet imports of megatron-core's dataset classes.

Owns the one place the data package imports megatron-core: importing ``megatron.core`` takes
5-10 s on a small CPU box and warns about missing Transformer Engine / Apex, so argument checks
run first and the import happens only when real work starts, with those warnings silenced.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace


def megatron_datasets() -> SimpleNamespace:
    """``IndexedDataset``, ``IndexedDatasetBuilder``, ``DType``, ``GPTDataset``, ``GPTDatasetConfig``,
    ``BlendedMegatronDatasetBuilder``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        warnings.filterwarnings("ignore", message=".*(apex|transformer.engine|Apex).*")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
    return SimpleNamespace(IndexedDataset=IndexedDataset, IndexedDatasetBuilder=IndexedDatasetBuilder, DType=DType,
                           GPTDataset=GPTDataset, GPTDatasetConfig=GPTDatasetConfig,
                           BlendedMegatronDatasetBuilder=BlendedMegatronDatasetBuilder)
