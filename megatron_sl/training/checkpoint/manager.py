"""Crash-safe training checkpoints: atomic saves, verified resume, keep-last-K.

Layout under ``<run_dir>/checkpoints/``::

    latest                      text file naming the resume point ("step_00000120\\n"), replaced last
    step_00000120/
        engine/...              this rank's engine files (DeepSpeed: ``engine/ds/*`` model + ZeRO shards)
        ranks/rank_00003.pt     per-rank state: RNG states and the SL support metadata of its shards
        client_state.pt         written by rank 0: step, consumed samples, resolved config, ...
        manifest.json           written LAST: every file above with its size and checksum
    .tmp-step_00000140/         a save in progress (ignored by resume, removed by the next save)

A save (all ranks call ``CheckpointManager.save``; ``run_dir`` must be on a filesystem every rank
sees, the usual shared FS of a cluster — checked on every save):

1. rank 0 creates ``.tmp-step_N`` (removing a stale one); barrier; every rank checks it sees it.
2. every rank writes its engine files and ``ranks/rank_R.pt``; rank 0 writes ``client_state.pt``.
3. barrier; rank 0 lists the files; each rank fsyncs and checksums an interleaved share of them
   (so hashing a 7B checkpoint is spread over the ranks); the results are gathered on rank 0.
4. rank 0 writes ``manifest.json``, fsyncs it and every directory of the tree, renames the temp dir
   to ``step_N`` and fsyncs ``checkpoints/``; then writes ``latest`` atomically (temp file, fsync,
   ``os.replace``, fsync of the directory) and prunes to the newest ``keep_last`` checkpoints.
5. barrier, so no rank exits (e.g. with code 75 after a preemption signal) before the commit.

Disk space: before writing, rank 0 compares the free space of the filesystem with the size of
the newest checkpoint (or the caller's estimate for a first save); too little, or a write error
on any rank (ENOSPC, EIO, ...), raises one ``CheckpointError`` on every rank naming the path and
the space needed, after removing the temp directory. Earlier checkpoints are untouched.

A crash anywhere before the rename leaves only a ``.tmp-*`` directory and ``latest`` unchanged;
between the rename and the pointer update it leaves a complete, verifiable ``step_N`` that resume
picks up (it is the newest complete checkpoint). A missing, dangling or stale ``latest`` is
repaired to name the checkpoint resumed from, with a warning.

Pruning keeps the ``keep_last`` newest complete checkpoints plus whatever ``latest`` and
``last_good`` name (``save(..., good=False)`` leaves ``last_good`` on the checkpoint before a run of
bad steps). Interrupted saves (``.tmp-*``) are removed; ``step_N.abandoned-*`` directories (a
timeline given up when an older checkpoint was resumed) are removed once the run has passed step
N again, and at most ``keep_last`` of them are kept.

Resume (``find_resumable``): candidates are the ``step_*`` directories, newest first. Each is
verified against its manifest (every file present, same size, same checksum — hashing again split
over the ranks); the first good one is returned and all ranks agree on it. A bad one yields a
``CheckpointWarning`` naming the checkpoint and the bad file, then the previous one is tried. If
checkpoints exist but none verifies, ``CheckpointError`` is raised: a run never silently starts from
scratch over existing checkpoints. Only an empty ``checkpoints/`` (or one holding just an
interrupted first save) means "start fresh".

Engine state goes through an adapter (``adapters``); each rank's RNG streams and SL support
metadata through ``rank_state``; file writes through ``atomic``; names and format versions are in
``names``. The pure file logic needs no DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .adapters import as_state_io
from .atomic import (HASHES, file_checksum, fsync_dir, human_bytes, list_files, replace_durable, torch_save_durable,
                     write_durable)
from .errors import CheckpointError, CheckpointWarning
from .names import (ABANDONED_RE, CHECKPOINTS_DIR, CLIENT_FORMAT, CLIENT_STATE, ENGINE_DIR, FORMAT, LAST_GOOD, LATEST,
                    MANIFEST, RANKS_DIR, RUN_CONFIG, STEP_RE, TMP_PREFIX, TRASH_PREFIX, format_problem, rank_file,
                    step_dirname)
from .rank_state import capture_rng_state, check_sl_support, restore_rng_state, sl_support_metadata


def read_client_state(path: Path) -> dict:
    """``client_state.pt`` of checkpoint ``path``, its format version checked (``CheckpointError``)."""
    client = torch.load(Path(path) / CLIENT_STATE, map_location="cpu", weights_only=False)
    if not isinstance(client, dict):
        raise CheckpointError(f"checkpoint {path}: {CLIENT_STATE} holds no client state dict")
    problem = format_problem(client.get("format"), CLIENT_FORMAT, f"checkpoint {path}: {CLIENT_STATE}")
    if problem is not None:
        raise CheckpointError(problem)
    return client


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint directory and its manifest."""

    path: Path
    step: int
    manifest: dict


# --------------------------------------------------------------------------------------------
# communication: torch.distributed when initialised, else a single process
# --------------------------------------------------------------------------------------------
LOCAL = "local"  # CheckpointManager(group=LOCAL): this process alone, even inside a process group (offline tools)


class _Comm:
    def __init__(self, group=None):
        self.group = group
        self.on = group != LOCAL and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.on else 0
        self.world = dist.get_world_size(group) if self.on else 1

    def barrier(self) -> None:
        if self.on and self.world > 1:
            dist.barrier(group=self.group)

    def all_gather(self, obj) -> list:
        if not self.on or self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.on or self.world == 1:
            return obj
        box = [obj]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


# --------------------------------------------------------------------------------------------
# the manager
# --------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves and resumes ``<run_dir>/checkpoints/step_XXXXXXXX`` (see the module docstring).

    ``keep_last``: number of newest complete checkpoints kept (>= 1). ``checksum``: "sha256" or
    "crc32". ``verify``: "checksum" (re-hash on resume) or "size" (sizes only, for huge runs where
    re-reading every shard costs too much). ``group``: the process group of all ranks (default: world;
    ``LOCAL``: this process alone, for offline tools run inside a process group).
    Every rank must call ``save``/``find_resumable``/``load`` collectively.
    """

    def __init__(self, run_dir, keep_last: int = 3, *, checksum: str = "sha256", verify: str = "checksum",
                 group=None):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be an integer >= 1")
        if checksum not in HASHES:
            raise ValueError(f"checksum={checksum!r} must be one of {HASHES}")
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify={verify!r} must be 'checksum' or 'size'")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.checksum = checksum
        self.verify = verify
        self.group = group

    # test hook: called between the phases of a save; tests make it raise to simulate a crash
    def _fault(self, stage: str) -> None:
        return None

    # -- listing ---------------------------------------------------------------------------
    def step_dirs(self) -> List[Path]:
        """``step_*`` directories, newest step first (complete or not)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def read_latest(self) -> Optional[str]:
        """The directory name in ``latest`` (None if there is no pointer)."""
        p = self.root / LATEST
        if not p.exists():
            return None
        try:
            return p.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            return f"<unreadable: {e}>"

    def complete(self) -> List[CheckpointInfo]:
        """Committed checkpoints (a parseable manifest), newest first; files are not re-hashed."""
        out = []
        for p in self.step_dirs():
            try:
                out.append(self._read_manifest(p))
            except CheckpointError:
                continue
        return out

    def _read_manifest(self, path: Path) -> CheckpointInfo:
        mf = path / MANIFEST
        if not mf.is_file():
            raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (an incomplete or foreign directory)")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {path}: file {MANIFEST} is corrupt: {e}") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"checkpoint {path}: file {MANIFEST} is not a {FORMAT} manifest")
        problem = format_problem(manifest.get("format"), FORMAT, f"checkpoint {path}: file {MANIFEST}")
        if problem is None and not isinstance(manifest.get("files"), dict):
            problem = f"checkpoint {path}: file {MANIFEST} lists no files"
        if problem is not None:
            raise CheckpointError(problem)
        return CheckpointInfo(path=path, step=int(manifest["step"]), manifest=manifest)

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, engine_or_state_fns, client_state: Optional[dict] = None, *,
             model: Optional[torch.nn.Module] = None, run_config: Optional[dict] = None, good: bool = True,
             expected_bytes: Optional[int] = None) -> Path:
        """Write checkpoint ``step`` atomically (all ranks call this); returns its directory.

        ``client_state``: the run position and settings (step, consumed samples, resolved config,
        LR scheduler state if the engine does not hold it, ...), written by rank 0. Each rank also
        stores its RNG states and the SL support metadata of ``model`` (default: the engine's module).
        ``run_config``: a JSON-able record written as ``run_config.json`` (read without torch before a
        resume, see ``training.resume_check``). ``good``: False keeps ``last_good`` on the previous
        good checkpoint. ``expected_bytes``: size estimate for the free-space check of a first save.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative integer")
        client_state = dict(client_state or {})
        client_state.setdefault("step", step)
        client_state.setdefault("format", CLIENT_FORMAT)
        if client_state["format"] != CLIENT_FORMAT:
            raise ValueError(f"client_state['format']={client_state['format']!r}; this version writes {CLIENT_FORMAT!r}")
        if client_state["step"] != step:
            raise ValueError(f"client_state['step']={client_state['step']!r} differs from step={step}")
        state_io = as_state_io(engine_or_state_fns)
        model = model if model is not None else getattr(state_io, "module", None)
        comm = _Comm(self.group)
        name = step_dirname(step)
        final = self.root / name
        tmp = self.root / f"{TMP_PREFIX}{name}"

        # 1. temp dir (rank 0), seen by every rank; an existing committed step_N is kept as is. Free
        # space is checked first (rank 0 decides for all: a rank failing inside DeepSpeed's save
        # would leave the others waiting in its barrier)
        exists, short = None, None
        if comm.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_leftovers()
            if final.exists():  # saved before (e.g. preempted right after resuming from it): keep if intact
                try:
                    info = self._read_manifest(final)
                    exists = not self._verify_files(final, info.manifest, sorted(info.manifest["files"]))
                except CheckpointError:
                    exists = False
                if not exists:
                    final.rename(self.root / f"{TRASH_PREFIX}{name}-{time.time_ns()}")
            if not exists:
                short = self._space_problem(expected_bytes)
                if short is None:
                    tmp.mkdir()
        exists, short = comm.broadcast((exists, short))
        if short is not None:
            raise CheckpointError(short)
        if exists:
            if comm.rank == 0:
                self._update_latest(name)
                self._prune(step)
            comm.barrier()
            return final
        comm.barrier()
        seen = comm.all_gather(tmp.is_dir())
        if not all(seen):
            blind = [r for r, ok in enumerate(seen) if not ok]
            raise CheckpointError(f"ranks {blind} do not see {tmp} created by rank 0: run_dir {self.run_dir} must be "
                                  f"on a filesystem shared by all ranks")

        # 2. every rank: engine files + its own RNG / SL metadata; rank 0: client state
        engine_dir = tmp / ENGINE_DIR
        if comm.rank == 0:
            engine_dir.mkdir()
            (tmp / RANKS_DIR).mkdir()
        comm.barrier()
        error = None
        try:
            state_io.save_state(engine_dir)
            torch_save_durable({"rank": comm.rank, "world_size": comm.world, "rng": capture_rng_state(),
                                "sl_support": sl_support_metadata(model)},
                               rank_file(tmp, comm.rank))
            if comm.rank == 0:
                torch_save_durable(client_state, tmp / CLIENT_STATE)
                if run_config is not None:
                    write_durable(tmp / RUN_CONFIG, (json.dumps(run_config, indent=1, sort_keys=True) + "\n").encode())
            self._fault("after_write")
        except (OSError, RuntimeError) as e:  # torch.save reports ENOSPC as RuntimeError (iostream error)
            error = self._write_error(tmp, e)
        errors = [e for e in comm.all_gather(error) if e is not None]
        if errors:
            if comm.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            comm.barrier()
            raise CheckpointError(errors[0])

        # 3. fsync + checksum, split over the ranks
        files = comm.broadcast(list_files(tmp) if comm.rank == 0 else None)
        mine = {rel: {"size": (tmp / rel).stat().st_size, self.checksum: file_checksum(tmp / rel, self.checksum, fsync=True)}
                for rel in files[comm.rank::comm.world]}
        parts = comm.all_gather(mine)
        self._fault("after_checksum")

        # 4. rank 0: manifest, rename, pointer, prune
        if comm.rank == 0:
            entries = {}
            for part in parts:
                entries.update(part)
            manifest = {"format": FORMAT, "step": step, "world_size": comm.world, "checksum": self.checksum,
                        "created_unix": time.time(),
                        "client": {k: client_state[k] for k in ("step", "consumed_samples") if k in client_state},
                        "files": {rel: entries[rel] for rel in files}}
            try:
                write_durable(tmp / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
            except OSError as e:
                error = self._write_error(tmp, e)
                shutil.rmtree(tmp, ignore_errors=True)
        error = comm.broadcast(error)
        if error is not None:
            raise CheckpointError(error)
        if comm.rank == 0:
            for d in sorted({(tmp / rel).parent for rel in files} | {tmp}, key=lambda p: -len(p.parts)):
                fsync_dir(d)
            self._fault("before_rename")
            os.rename(tmp, final)
            fsync_dir(self.root)
            self._fault("after_rename")
            previous = self.read_latest()
            self._update_latest(name)
            self._mark_good(name, good, previous)
            self._fault("after_latest")
            self._prune(step)
        comm.barrier()
        return final

    def _update_latest(self, name: str) -> None:
        replace_durable(self.root / LATEST, (name + "\n").encode())

    def _mark_good(self, name: str, good: bool, previous: Optional[str]) -> None:
        """``last_good`` exists only while the newest checkpoints were saved during bad steps: it
        then names the newest checkpoint from before them (kept by ``_prune``)."""
        pointer = self.root / LAST_GOOD
        if good:
            if pointer.exists():
                pointer.unlink()
                fsync_dir(self.root)
        elif not pointer.exists() and previous and STEP_RE.match(previous) and previous != name:
            replace_durable(pointer, (previous + "\n").encode())

    def last_good(self) -> Optional[str]:
        """The checkpoint kept as the last good one, if the newest ones were saved during bad steps."""
        return self._read_pointer(LAST_GOOD)

    def _checkpoint_bytes(self) -> Optional[int]:
        """Size of the newest complete checkpoint (from its manifest), None without one."""
        for info in self.complete():
            return sum(int(f.get("size", 0)) for f in info.manifest["files"].values())
        return None

    def _space_problem(self, expected_bytes: Optional[int]) -> Optional[str]:
        need = self._checkpoint_bytes() or expected_bytes
        if not need:
            return None
        free = shutil.disk_usage(self.root).free
        if free >= need * 1.05 + (1 << 20):
            return None
        return (f"not enough space to write a checkpoint in {self.root}: {human_bytes(free)} free, about {human_bytes(need)} "
                f"needed (free some space or point run.output_dir elsewhere; earlier checkpoints are intact)")

    def _write_error(self, tmp: Path, e: BaseException) -> str:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        need = self._checkpoint_bytes()
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
        need_s = f"about {human_bytes(need)}" if need else f"more than the {human_bytes(written)} written so far"
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or free < (1 << 20) or "iostream" in str(e)
        cause = "no space left on device" if full else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return (f"cannot write checkpoint {tmp} ({cause}): {human_bytes(free)} free, {need_s} needed; the partial "
                f"checkpoint was removed and earlier checkpoints are intact")

    def _clean_leftovers(self) -> None:
        """Remove interrupted saves and half-deleted checkpoints (rank 0, before a save)."""
        for p in self.root.iterdir():
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self, current: int) -> None:
        """Keep the ``keep_last`` newest complete checkpoints up to ``current`` (and whatever ``latest``
        and ``last_good`` name). Directories of steps after ``current`` belong to an abandoned timeline
        (the run resumed from an older checkpoint because they did not verify): renamed
        ``step_N.abandoned-<ns>``, not deleted, until the run passes step N again (at most
        ``keep_last`` kept). Deletion renames to ``.trash-*`` first so a half-deleted directory never
        looks complete; interrupted saves (``.tmp-*``) are removed."""
        latest = self.read_latest()
        pinned = {latest, self._read_pointer(LAST_GOOD)}
        kept = 0
        for info in self.complete():
            if info.step > current:
                dst = info.path.with_name(f"{info.path.name}.abandoned-{time.time_ns()}")
                info.path.rename(dst)
                warnings.warn(f"checkpoint {info.path} is newer than the step being saved ({current}); the run "
                              f"resumed from an older checkpoint, so it was moved to {dst.name}", CheckpointWarning,
                              stacklevel=3)
                continue
            if kept < self.keep_last or info.path.name in pinned:
                kept += 1
                continue
            info.path.rename(self.root / f"{TRASH_PREFIX}{info.path.name}-{time.time_ns()}")
        abandoned = sorted(((int(m.group(1)), p.name, p) for p in self.root.iterdir()
                            if p.is_dir() and (m := ABANDONED_RE.match(p.name))), reverse=True)
        for i, (step, _, path) in enumerate(abandoned):
            if step <= current or i >= self.keep_last:
                path.rename(self.root / f"{TRASH_PREFIX}{path.name}")
        for p in self.root.iterdir():
            if p.name.startswith(TRASH_PREFIX) or (p.is_dir() and p.name.startswith(TMP_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(self.root)

    def _read_pointer(self, name: str) -> Optional[str]:
        try:
            return (self.root / name).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    # -- verify / resume -------------------------------------------------------------------
    def _verify_files(self, path: Path, manifest: dict, files: Sequence[str]) -> List[str]:
        algo = manifest.get("checksum", self.checksum)
        problems = []
        for rel in files:
            want = manifest["files"][rel]
            f = path / rel
            if not f.is_file():
                problems.append(f"file {rel} is missing")
                continue
            size = f.stat().st_size
            if size != want["size"]:
                problems.append(f"file {rel} is truncated or changed: {size} bytes, manifest says {want['size']}")
                continue
            if self.verify == "checksum" and file_checksum(f, algo) != want[algo]:
                problems.append(f"file {rel} is corrupt: {algo} checksum does not match the manifest")
        return problems

    def verify_checkpoint(self, path: Path) -> CheckpointInfo:
        """Verify one checkpoint (collective); raises ``CheckpointError`` naming the bad file."""
        comm = _Comm(self.group)
        head = None
        if comm.rank == 0:
            try:
                head = self._read_manifest(path)
            except CheckpointError as e:
                head = str(e)
        head = comm.broadcast(head)
        if isinstance(head, str):
            raise CheckpointError(head)
        files = sorted(head.manifest["files"])
        problems = [p for part in comm.all_gather(self._verify_files(path, head.manifest, files[comm.rank::comm.world]))
                    for p in part]
        if problems:
            raise CheckpointError(f"checkpoint {path}: " + "; ".join(problems))
        return head

    def find_resumable(self) -> Optional[CheckpointInfo]:
        """The newest complete, verified checkpoint (same on every rank), or None when there is
        nothing to resume. Skipped checkpoints give a ``CheckpointWarning`` naming the bad file; if
        checkpoints exist and none verifies, raises ``CheckpointError`` (never a silent fresh start)."""
        comm = _Comm(self.group)
        listing = None
        if comm.rank == 0:
            dirs = self.step_dirs()
            tmps = sorted(p.name for p in self.root.iterdir() if p.name.startswith(TMP_PREFIX)) if self.root.is_dir() else []
            listing = ([str(p) for p in dirs], self.read_latest(), tmps)
        dirs, latest, tmps = comm.broadcast(listing)
        if tmps and comm.rank == 0:
            warnings.warn(f"ignoring interrupted checkpoint save(s) in {self.root}: {tmps}", CheckpointWarning, stacklevel=2)
        failures = []
        for d in map(Path, dirs):
            try:
                info = self.verify_checkpoint(d)
            except CheckpointError as e:
                failures.append(str(e))
                if comm.rank == 0:
                    warnings.warn(f"{e}; falling back to the previous checkpoint", CheckpointWarning, stacklevel=2)
                continue
            if latest != d.name and comm.rank == 0:
                if latest is None:
                    why = f"{self.root / LATEST} is missing"
                elif (self.root / latest).is_dir() or not STEP_RE.match(latest):
                    why = (f"{self.root / LATEST} names {latest!r} but the newest complete checkpoint is {d.name} "
                           "(a save was interrupted after its rename, or the pointer is stale)")
                else:
                    why = f"{self.root / LATEST} names {latest!r}, which does not exist (a dangling pointer)"
                warnings.warn(f"{why}; resuming from {d.name} and repairing the pointer", CheckpointWarning,
                              stacklevel=2)
                try:
                    self._update_latest(d.name)
                except OSError as e:
                    warnings.warn(f"cannot repair {self.root / LATEST}: {e}", CheckpointWarning, stacklevel=2)
            return info
        if failures or latest is not None:
            detail = "; ".join(failures) if failures else f"{LATEST} names {latest!r} but no step_* directory exists"
            raise CheckpointError(f"checkpoints exist in {self.root} but none can be resumed (refusing to start "
                                  f"from scratch; move the directory away to do that): {detail}")
        return None

    def load(self, info: CheckpointInfo, engine_or_state_fns, *, model: Optional[torch.nn.Module] = None,
             restore_rng: bool = True, reshard: Optional[Callable[[CheckpointInfo, dict], bool]] = None) -> dict:
        """Load ``info`` into the engine (collective); checks world size and SL support metadata
        first, restores this rank's RNG states last; returns the client state.

        ``reshard(info, client_state)``: called first on every rank; it returns True when it loaded
        the checkpoint itself (written at another parallel layout, or layout-free; see ``reshard``),
        then the engine files and per-rank RNG states of the old layout are not used."""
        comm = _Comm(self.group)
        state_io = as_state_io(engine_or_state_fns)
        model = model if model is not None else getattr(state_io, "module", None)
        if reshard is not None:
            try:
                client_state = read_client_state(info.path)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"checkpoint {info.path}: cannot read {e}") from e
            if reshard(info, client_state):
                comm.barrier()
                return client_state
        saved_world = info.manifest.get("world_size")
        if saved_world != comm.world:
            raise CheckpointError(f"checkpoint {info.path} was written by {saved_world} ranks, this run has "
                                  f"{comm.world}; resuming with a different world size is not supported")
        mine = rank_file(info.path, comm.rank)
        try:
            rank_state = torch.load(mine, map_location="cpu", weights_only=True)
            client_state = read_client_state(info.path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint {info.path}: cannot read {e}") from e
        check_sl_support(model, rank_state["sl_support"], f"checkpoint {mine}")
        state_io.load_state(info.path / ENGINE_DIR)
        if restore_rng:
            restore_rng_state(rank_state["rng"])
        comm.barrier()
        return client_state

    def resume(self, engine_or_state_fns, *, model: Optional[torch.nn.Module] = None,
               reshard: Optional[Callable[[CheckpointInfo, dict], bool]] = None) -> Optional[dict]:
        """``find_resumable`` + ``load``: the client state of the resumed checkpoint, or None (fresh run)."""
        info = self.find_resumable()
        if info is None:
            return None
        return self.load(info, engine_or_state_fns, model=model, reshard=reshard)

