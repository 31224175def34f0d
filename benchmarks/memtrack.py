"""Exact live-tensor memory accounting on any device, for benchmarks.

``LiveTensorTracker`` is a TorchDispatchMode that sees every aten op (forward and the autograd
backward, which runs on the calling thread for CPU tensors), registers each new output storage
and frees it when the storage dies, so ``peak`` is the largest number of bytes held at once by
tensors created inside the region (``torch.cuda.max_memory_allocated`` for any device, when the
tracker is entered before the model is built). ``mark(label)`` closes a phase: it records the
bytes live at that point and the peak reached since the previous mark, so a training step can be
split into set-up / forward / backward / optimizer step. ``saved_bytes`` measures what autograd
keeps for backward.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0
        self.phases = []  # (label, bytes live at the mark, peak since the previous mark)
        self._phase_peak = 0

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        self._phase_peak = max(self._phase_peak, self.current)
        weakref.finalize(st, self._free, key)

    def mark(self, label: str) -> None:
        self.phases.append((label, self.current, self._phase_peak))
        self._phase_peak = self.current

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._track(t)
        return out


def saved_bytes(fn, params=()) -> int:
    """Bytes of distinct tensors autograd saves while running fn(), not counting tensors that
    share storage with ``params`` (a saved parameter or a view of it costs nothing extra)."""
    seen = {}
    param_storages = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in param_storages:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
