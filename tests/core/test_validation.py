"""Bad constructor arguments raise one ValueError naming the bad value, before any work."""

import pytest
import torch

from megatron_sl.core import SLConfig, SLLinear

GOOD = dict(in_features=16, out_features=8, rank=4, density=0.1, alpha=8.0)


@pytest.mark.parametrize("key,value,pattern", [
    ("rank", 0, "rank=0"),
    ("rank", 9, r"rank=9 must be in \[1, min"),
    ("rank", 2.5, "rank=2.5"),
    ("density", -0.1, "density=-0.1"),
    ("density", 1.0, "density=1.0"),
    ("density", "0.1", "density='0.1'"),
    ("alpha", 0.0, "alpha=0.0"),
    ("alpha", float("nan"), "alpha=nan"),
    ("in_features", 0, "in_features=0"),
    ("out_features", -3, "out_features=-3"),
    ("in_features", 4.0, "in_features=4.0"),
])
def test_bad_arguments(key, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        SLLinear(**{**GOOD, key: value})


def test_bad_dtype_and_path():
    with pytest.raises(ValueError, match="dtype=torch.int64"):
        SLLinear(**GOOD, dtype=torch.int64)
    with pytest.raises(ValueError, match="path='sparse'"):
        SLLinear(**GOOD, path="sparse")


def test_bad_input_features():
    layer = SLLinear(**GOOD)
    with pytest.raises(ValueError, match="input has 15 features"):
        layer(torch.randn(2, 15))


def test_slconfig_validation():
    assert SLConfig(rank=8, density=0.0, alpha=4.0).scale == 0.5
    with pytest.raises(ValueError, match="unknown slot 'attn'"):
        SLConfig(targets=("qkv", "attn"))
    with pytest.raises(ValueError, match="density=1.5"):
        SLConfig(density=1.5)
    with pytest.raises(ValueError, match="path='fast'"):
        SLConfig(path="fast")
