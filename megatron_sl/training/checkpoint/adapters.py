"""Engine adapters: how one rank's engine state goes into / comes out of ``<checkpoint>/engine/``.

``DeepSpeedState`` (``engine.save_checkpoint`` / ``load_checkpoint`` into ``engine/ds``: module,
ZeRO optimizer shards, LR scheduler), ``TorchState`` (state dicts of plain objects, one file per
rank), ``StateFns`` (two callables) or any object with ``save_state(dir)`` / ``load_state(dir)``
methods (the training engines); ``as_state_io`` picks. Nothing here needs DeepSpeed imported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .atomic import torch_save_durable
from .errors import CheckpointError


@dataclasses.dataclass
class StateFns:
    """Two callables: ``save(directory)`` writes this rank's engine files, ``load(directory)`` reads them."""

    save: Callable[[Path], None]
    load: Callable[[Path], None]
    module: Optional[torch.nn.Module] = None

    def save_state(self, directory: Path) -> None:
        self.save(directory)

    def load_state(self, directory: Path) -> None:
        self.load(directory)


class DeepSpeedState:
    """A DeepSpeed engine: ``save_checkpoint`` (model states, ZeRO shards of every rank, LR scheduler)
    into ``<dir>/ds`` without DeepSpeed's own ``latest`` file; ``load_checkpoint`` with optimizer
    and scheduler states."""

    TAG = "ds"

    def __init__(self, engine):
        self.engine = engine
        self.module = getattr(engine, "module", None)

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, client_state={}, save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {directory}/{self.TAG}")


class TorchState:
    """Plain objects with ``state_dict``/``load_state_dict`` (model, optimizer, scheduler, ...):
    each rank writes ``rank_XXXXX.pt`` holding all of them."""

    def __init__(self, module: Optional[torch.nn.Module] = None, **objects):
        self.module = module
        self.objects = dict(objects)
        if module is not None:
            self.objects = {"module": module, **self.objects}

    @staticmethod
    def _rank() -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def save_state(self, directory: Path) -> None:
        states = {k: v.state_dict() for k, v in self.objects.items()}
        torch_save_durable(states, directory / f"rank_{self._rank():05d}.pt")

    def load_state(self, directory: Path) -> None:
        path = directory / f"rank_{self._rank():05d}.pt"
        states = torch.load(path, map_location="cpu", weights_only=False)
        missing = sorted(set(self.objects) - set(states))
        if missing:
            raise CheckpointError(f"{path}: no state for {missing}")
        for k, v in self.objects.items():
            v.load_state_dict(states[k])


def as_state_io(obj):
    """The engine adapter for ``obj``: itself if it has ``save_state``/``load_state``; a DeepSpeed
    engine (or a wrapper exposing one as ``.engine``) -> ``DeepSpeedState``."""
    if hasattr(obj, "save_state") and hasattr(obj, "load_state"):
        return obj
    for cand in (obj, getattr(obj, "engine", None)):
        if cand is not None and hasattr(cand, "save_checkpoint") and hasattr(cand, "load_checkpoint") \
                and hasattr(cand, "zero_optimization_stage"):
            return DeepSpeedState(cand)
    raise TypeError(f"cannot checkpoint {type(obj).__name__}: expected a DeepSpeed engine, an object with "
                    f"save_state(dir)/load_state(dir), StateFns or TorchState")

