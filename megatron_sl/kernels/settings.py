"""Which implementation runs the SL primitives (Triton, numba or the torch reference), and with what blocks.

One source of truth for the kernel settings:

* backend: ``"auto"``, ``"triton"``, ``"numba"`` or ``"torch"``. ``"auto"`` is Triton on CUDA
  tensors; on CPU tensors the numba kernels (``cpu_kernels``) when torch runs one intra-op thread
  (how every rank of a CPU run is set up), else the torch reference, whose MKL sparse products are
  threaded. Precedence: an explicit ``backend=`` argument of an op > ``set_backend()`` /
  ``use_backend()`` > the environment variable ``MEGATRON_SL_KERNELS`` > ``"auto"``.
  Forcing ``"triton"`` on CPU tensors works only when the Triton kernels were imported under
  ``TRITON_INTERPRET=1`` (the interpreter is how CPU tests exercise them); forcing ``"numba"``
  works on CPU tensors only; otherwise they raise. A backend without an implementation of some
  primitive runs the torch reference for it (numba has no densify; Triton no SpMM).
* block sizes of the two kernels (``DensifyBlocks`` / ``SddmmBlocks``): GPU defaults are fixed
  here (and compiled ahead of time for sm_80/sm_90 by ``kernels/aot_compile.py``); under the
  interpreter the defaults are large because interpreter cost grows with the number of programs.
  ``set_blocks()`` / ``use_blocks()`` override them (tests pass small ones to exercise tiling).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Optional

import torch

ENV_BACKEND = "MEGATRON_SL_KERNELS"
BACKENDS = ("auto", "triton", "numba", "torch")


@dataclasses.dataclass(frozen=True)
class DensifyBlocks:
    """Tile of W per program (block_m x block_n), rank chunk per ``tl.dot`` (block_r), sparse
    entries handled per inner step (block_s), and the launch's warps/pipeline stages."""
    block_m: int = 128
    block_n: int = 128
    block_r: int = 32
    block_s: int = 256
    num_warps: int = 8
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class SddmmBlocks:
    """Tile of grad W per program (block_m x block_n, never written to memory), token chunk per
    ``tl.dot`` (block_t), sparse entries gathered per inner step (block_s), warps/stages."""
    block_m: int = 64
    block_n: int = 64
    block_t: int = 64
    block_s: int = 128
    num_warps: int = 4
    num_stages: int = 3


GPU_DENSIFY = DensifyBlocks()
GPU_SDDMM = SddmmBlocks()
# Interpreter: a handful of big programs is far cheaper than many small ones.
INTERPRETER_DENSIFY = DensifyBlocks(block_m=128, block_n=128, block_r=64, block_s=2048, num_warps=4, num_stages=1)
INTERPRETER_SDDMM = SddmmBlocks(block_m=128, block_n=128, block_t=128, block_s=2048, num_warps=4, num_stages=1)

_state = {"backend": None, "densify": None, "sddmm": None}


def _validate_backend(name, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}={name!r} is not one of {BACKENDS}")
    return name


def configured_backend() -> str:
    """The backend set by ``set_backend`` or, failing that, ``$MEGATRON_SL_KERNELS`` (default auto)."""
    if _state["backend"] is not None:
        return _state["backend"]
    return _validate_backend(os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto", ENV_BACKEND)


def set_backend(name: Optional[str]) -> None:
    """Force ``"triton"``/``"torch"`` (or ``"auto"``) for every op; ``None`` returns to the env var."""
    _state["backend"] = None if name is None else _validate_backend(name, "backend")


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    old = _state["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = old


def interpreter_active() -> bool:
    """True when the Triton kernels are (or, once imported, will be) interpreted on the CPU."""
    mod = sys.modules.get("megatron_sl.kernels.triton_kernels")
    if mod is not None:
        return mod.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device_type: str, requested: str = "auto") -> str:
    """``"triton"``, ``"numba"`` or ``"torch"`` for tensors on ``device_type``; raises for an
    impossible request."""
    name = _validate_backend(requested, "backend")
    if name == "auto":
        name = configured_backend()
    if name == "auto":
        if device_type == "cuda":
            return "triton"
        return "numba" if device_type == "cpu" and torch.get_num_threads() == 1 else "torch"
    if name == "numba" and device_type != "cpu":
        raise RuntimeError(f"backend 'numba' was forced for {device_type} tensors: the numba kernels run on CPU "
                           "tensors only")
    if name == "triton" and device_type != "cuda":
        if device_type != "cpu" or not interpreter_active():
            raise RuntimeError(
                f"backend 'triton' was forced for {device_type} tensors: Triton runs on CUDA tensors, or on CPU "
                f"tensors only when TRITON_INTERPRET=1 is set before megatron_sl.kernels.triton_kernels is imported")
    return name


def densify_blocks() -> DensifyBlocks:
    if _state["densify"] is not None:
        return _state["densify"]
    return INTERPRETER_DENSIFY if interpreter_active() else GPU_DENSIFY


def sddmm_blocks() -> SddmmBlocks:
    if _state["sddmm"] is not None:
        return _state["sddmm"]
    return INTERPRETER_SDDMM if interpreter_active() else GPU_SDDMM


def _check_blocks(b, kind):
    for f in dataclasses.fields(b):
        v = getattr(b, f.name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{kind}.{f.name}={v!r} must be a positive int")
        if f.name.startswith("block_") and (v & (v - 1)):
            raise ValueError(f"{kind}.{f.name}={v} must be a power of two (Triton block shapes)")
    for name in ("block_m", "block_n", "block_r", "block_t"):
        if hasattr(b, name) and getattr(b, name) < 16:
            raise ValueError(f"{kind}.{name}={getattr(b, name)} must be >= 16 (tl.dot operand size)")


def set_blocks(densify: Optional[DensifyBlocks] = None, sddmm: Optional[SddmmBlocks] = None) -> None:
    """Override the block sizes (``None`` restores the default for that kernel)."""
    if densify is not None:
        _check_blocks(densify, "DensifyBlocks")
    if sddmm is not None:
        _check_blocks(sddmm, "SddmmBlocks")
    _state["densify"], _state["sddmm"] = densify, sddmm


@contextlib.contextmanager
def use_blocks(densify: Optional[DensifyBlocks] = None, sddmm: Optional[SddmmBlocks] = None):
    old = (_state["densify"], _state["sddmm"])
    set_blocks(densify, sddmm)
    try:
        yield
    finally:
        _state["densify"], _state["sddmm"] = old
