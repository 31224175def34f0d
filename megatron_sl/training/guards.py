"""Run-time guards of the training loop: bad-step skipping, divergence stop, step watchdog; and the
exit codes of ``megatron-sl train``.

``StepGuard`` judges each step's global loss (the same value on every rank, so every rank decides
alike) before the update is applied: NaN/inf (``guard.skip_nonfinite``) or a spike above
``guard.spike_factor`` x the mean of the last ``guard.spike_window`` good losses marks the step
bad. A bad step is skipped by ``guard_optimizer``: the wrapped optimizers' ``step`` does nothing,
so parameters and optimizer state (moments, 8-bit codes, step counts) stay as they were; the
engines still clear the gradients, and the LR schedule and the data position advance. After
``guard.max_bad_steps`` consecutive bad steps the run stops (``Diverged``, exit code 3).

``Watchdog``: a daemon thread; if ``beat()`` is not called for ``guard.step_timeout_s`` seconds
(a hung collective, a dead peer, a stuck file system) it dumps every thread's stack with
faulthandler, prints one line naming the rank and what it was doing, and exits with code 4.
"""

from __future__ import annotations

import faulthandler
import functools
import math
import os
import sys
import threading
import time
from collections import deque
from typing import Iterable, Optional

EXIT_BAD_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_STALLED = 4
EXIT_CHECKPOINT_FAILED = 5
EXIT_ABORTED = 130  # a second Ctrl-C: stopped without a checkpoint


class Diverged(RuntimeError):
    """Too many consecutive bad steps; the message names the steps, the losses and the last good checkpoint."""


class StepGuard:
    def __init__(self, skip_nonfinite: bool = True, spike_factor: float = 0.0, spike_window: int = 20,
                 max_bad_steps: int = 5):
        self.skip_nonfinite = skip_nonfinite
        self.spike_factor = spike_factor
        self.max_bad_steps = max_bad_steps
        self.history: deque = deque(maxlen=spike_window)
        self.min_history = min(spike_window, 5)
        self.consecutive = 0
        self.skipped_total = 0
        self.skip_update = False
        self.bad_losses: list = []

    @classmethod
    def from_config(cls, g) -> "StepGuard":
        return cls(g.skip_nonfinite, g.spike_factor, g.spike_window, g.max_bad_steps)

    def judge(self, loss: float) -> Optional[str]:
        """Decide on a step from its global loss (call before the update is applied). Returns the
        reason it is bad (and arms the skip), or None."""
        reason = None
        if not math.isfinite(loss):
            if self.skip_nonfinite:
                reason = f"non-finite loss {loss}"
        elif self.spike_factor > 0 and len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            if loss > self.spike_factor * mean:
                reason = f"loss spike {loss:.4g} > {self.spike_factor:g} x recent mean {mean:.4g}"
        self.skip_update = reason is not None
        if reason is None:
            self.consecutive = 0
            self.bad_losses = []
            if math.isfinite(loss):
                self.history.append(loss)
        else:
            self.consecutive += 1
            self.skipped_total += 1
            self.bad_losses.append(loss)
        return reason

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_bad_steps

    def guard_optimizer(self, optimizers: Iterable) -> None:
        """Make each optimizer's ``step`` a no-op while the current step is judged bad (an instance
        attribute wrapping whatever ``step`` is now, e.g. an LR scheduler's counter)."""
        for opt in optimizers:
            inner = opt.step

            def step(*args, _inner=inner, **kwargs):
                if self.skip_update:
                    return None
                return _inner(*args, **kwargs)

            functools.update_wrapper(step, inner)  # keeps the LR scheduler's step-tracking marker
            opt.step = step


class Watchdog:
    """See the module docstring. ``start()`` / ``beat(what)`` / ``stop()``; ``timeout_s`` 0 = off."""

    def __init__(self, timeout_s: float, exit_code: int = EXIT_STALLED):
        self.timeout_s = float(timeout_s)
        self.exit_code = exit_code
        self._last = time.monotonic()
        self._what = "starting"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 and self._thread is None:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        self._last = time.monotonic()
        self._what = what

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        poll = min(max(self.timeout_s / 10, 0.05), 5.0)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                rank = os.environ.get("RANK", "0")
                msg = (f"[watchdog] rank {rank}: no progress for {idle:.0f} s (guard.step_timeout_s="
                       f"{self.timeout_s:g}) while {self._what}; stack dumps of every thread follow; exiting "
                       f"with code {self.exit_code}\n")
                os.write(2, msg.encode())
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os.write(2, msg.encode())  # again after the long dump, so it is the last line
                os._exit(self.exit_code)
