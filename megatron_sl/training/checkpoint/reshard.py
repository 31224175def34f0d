"""Resume on another parallel layout: a checkpoint written at TP=a, DP=b, ZeRO stage z continues at
any other valid TP, DP and ZeRO stage (0-3; per-layer runs at any TP / DP).

The mechanism is DeepSpeed's universal checkpoint: the training state as one fp32 tensor per
parameter (``fp32``, ``exp_avg``, ``exp_avg_sq``), independent of how ranks split it, from which any
layout takes its slices. What we add is the tensor-parallel rule of the SL layers, which
DeepSpeed's TP merge (concatenation along one dimension) cannot express:

* ``read_engine_state``: every rank reads the engine files of the old layout. ZeRO-1/2 partitions
  are cut into parameters with the ``param_slice_mappings`` DeepSpeed stores in each optimizer
  shard (the fragments of a parameter, concatenated in DP rank order, are the parameter). ZeRO-3
  partitions every parameter on its own: each DP rank holds ceil(numel / DP) elements of each
  (zero-padded at the end), and its flat partition per sub-group is those pieces concatenated in
  the order of the ``param_shapes`` DeepSpeed records in the model-states files
  (``zero3_partition``; the layout DeepSpeed's own ``ds_to_universal`` cuts). ZeRO-0 and
  per-layer states are per parameter already. Per TP rank this gives module-shaped dicts of
  fp32 weights and moments, which ``model.hf.gather_weights`` merges over TP exactly as the
  export does (B / S rows or A / S columns concatenated, replicated factors taken once, sparse
  values put in the global support order at ``SLShard.global_flat_index()``, every re-created
  shard checked against the support metadata the old ranks saved).
* ``UniversalState``: the merged form. The sparse ``values`` are stored in the global sorted
  support order only; the support itself is never stored: every layout re-derives it from
  (seed, name), and the index hash of every shard is still checked.
* ``apply``: each rank of the new layout takes its slices with ``model.hf.local_weights`` (the
  same rule the layers are built with) and the engine puts them in place
  (``load_universal``: module parameters, ZeRO fp32 partitions, Adam moments, step counters, LR
  schedule position; at ZeRO-3 each rank's padded partition of every parameter, filled as
  DeepSpeed's stage-3 universal loader fills it).
* ``write_universal`` / ``read_universal``: the merged form on disk, in DeepSpeed's universal
  layout (``zero/<param name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, each ``{"param": tensor}``)
  under ``engine/universal/`` with ``meta.json``; ``megatron-sl checkpoint convert`` writes it, and
  a resume at any layout reads it.

What is carried: model weights and fp32 masters, AdamW moments and step count, the LR schedule
position, the step and the data position (samples are a function of the step and the global
batch size, which may not change: a run at another DP size reads the same samples per step).
8-bit AdamW states are dequantized per block to fp32 and re-quantized per block in the new
layout's blocks: a block's absmax changes when its elements change, so the states are not
bit-exact (each element moves by at most half a quantization step of its new block). What is
not carried: per-rank RNG streams (a different number of ranks has different streams; the new
ranks keep their start-up seeding, so dropout masks differ from a same-layout resume). When the
padded vocabulary changes (``model.make_vocab_size_divisible_by`` x TP), ``repad_vocab`` carries
the rows both paddings have and starts new padding rows at zero, as Megatron's universal
checkpoint does; those rows are in the output softmax, so the loss moves.

Memory: every rank builds the merged state of the whole model (three fp32 copies); for large
models convert offline once (``megatron-sl checkpoint convert``), then resume from that.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .errors import CheckpointError
from .names import CLIENT_STATE, ENGINE_DIR, UNIVERSAL_DIR, rank_file

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
UNIVERSAL_FORMAT = "megatron-sl-universal/1"
UNIVERSAL_META = "meta.json"
PARAM_NAMES_KEY = "megatron_sl_param_names"  # per optimizer group, the parameter names (DeepSpeed engine files)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run splits its state: TP and DP sizes, ZeRO stage (None for the per-layer engine)."""

    tp: int
    dp: int
    zero_stage: Optional[int]

    @classmethod
    def of(cls, cfg, world_size: int) -> "Layout":
        tp = int(cfg.parallel.tensor_parallel)
        return cls(tp, int(world_size) // tp, None if cfg.optim.per_layer else int(cfg.deepspeed.zero_stage))

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(int(d["tp"]), int(d["dp"]), None if d.get("zero_stage") is None else int(d["zero_stage"]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        engine = "per-layer" if self.zero_stage is None else f"ZeRO={self.zero_stage}"
        return f"TP={self.tp} DP={self.dp} {engine}"


def saved_layout(client_state: dict, world_size: Optional[int]) -> Optional[Layout]:
    """The layout a checkpoint was written at (None for a layout-free one); from its resolved config
    and world size when the client state predates the recorded layout."""
    if client_state.get("universal"):
        return None
    if client_state.get("layout") is not None:
        return Layout.from_dict(client_state["layout"])
    if "config" not in client_state or world_size is None:
        return None
    from ..config import from_dict

    return Layout.of(from_dict(client_state["config"], source=CLIENT_STATE), int(world_size))


def is_universal(path: Path) -> bool:
    return (Path(path) / ENGINE_DIR / UNIVERSAL_DIR / UNIVERSAL_META).is_file()


@dataclasses.dataclass
class UniversalState:
    """The layout-free training state (see the module docstring)."""

    tensors: Dict[str, "object"]   # STATE_KEYS -> model.hf.GlobalWeights
    opt_step: int                  # AdamW step count (bias correction)
    schedule_step: int             # optimizer updates taken by the LR schedule
    source: Optional[Layout]


# --------------------------------------------------------------------------------------------
# reading the old layout's engine files
# --------------------------------------------------------------------------------------------
def _load(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint engine file {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=False)


def _group_states(base_state) -> List[dict]:
    """Per optimizer group, its state entry (a ZeRO optimizer steps one flat tensor per group)."""
    if isinstance(base_state, list):  # DeepSpeed's elastic checkpoint: a list of per-group states
        return base_state
    st = base_state["state"]
    return [st[k] for k in sorted(st)]


def _per_layer_rank(path: Path):
    """(module-shaped fp32 / exp_avg / exp_avg_sq dicts, AdamW step, schedule step) of one per-layer file."""
    from ..optim import adam_moments

    blob = _load(path)
    out = {k: {} for k in STATE_KEYS}
    steps = []
    for name, sd in blob["optimizer_states"].items():
        p = blob["module"][name]
        out["fp32"][name] = p.float()
        entries = list(sd["state"].values())
        if entries:
            ea, eas, step = adam_moments(entries[0])
            steps.append(step)
        else:  # never stepped
            ea, eas = torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)
        out["exp_avg"][name], out["exp_avg_sq"][name] = ea.reshape(p.shape), eas.reshape(p.shape)
    return out, max(steps, default=0), int(blob["global_steps"])


def _deepspeed_rank(ds_dir: Path, t: int, dp: int, zero_stage: int):
    """The same for TP rank ``t`` of a DeepSpeed ZeRO 0-2 checkpoint (all ``dp`` optimizer shards)."""
    from ..optim import adam_moments

    model_states = _load(ds_dir / f"mp_rank_{t:02d}_model_states.pt")
    module = model_states["module"]
    out = {k: {} for k in STATE_KEYS}
    steps = []
    if zero_stage == 0:
        names = model_states.get(PARAM_NAMES_KEY)
        if names is None:
            raise CheckpointError(f"{ds_dir}: the engine files do not record the optimizer's parameter names "
                                  f"(written by an older megatron-sl); this checkpoint cannot be resharded")
        sd = model_states["optimizer"]
        order = [n for group in names for n in group]
        for i, name in enumerate(order):
            p = module[name]
            out["fp32"][name] = p.float()
            if i in sd["state"]:
                ea, eas, step = adam_moments(sd["state"][i])
                steps.append(step)
            else:
                ea = eas = torch.zeros(p.shape)
            out["exp_avg"][name], out["exp_avg_sq"][name] = ea.reshape(p.shape), eas.reshape(p.shape)
    else:
        pieces: Dict[str, Dict[str, list]] = {k: {} for k in STATE_KEYS}
        for d in range(dp):
            osd = _load(ds_dir / f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")["optimizer_state_dict"]
            groups = _group_states(osd["base_optimizer_state"])
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                flat = {"fp32": osd["single_partition_of_fp32_groups"][g].float()}
                flat["exp_avg"], flat["exp_avg_sq"], step = adam_moments(groups[g])
                steps.append(step)
                for name, frag in mapping.items():
                    for k in STATE_KEYS:
                        pieces[k].setdefault(name, []).append(flat[k].reshape(-1).narrow(0, frag.start, frag.numel))
        for name, p in module.items():
            if name not in pieces["fp32"]:
                continue
            for k in STATE_KEYS:
                full = torch.cat(pieces[k][name])
                if full.numel() != p.numel():
                    raise CheckpointError(f"{ds_dir}: the ZeRO shards of {name!r} hold {full.numel()} elements, the "
                                          f"parameter has {p.numel()}")
                out[k][name] = full.reshape(p.shape)
    sched = model_states.get("lr_scheduler") or {}
    return out, max(steps, default=0), int(sched.get("last_epoch", model_states.get("global_steps", 0)))


def zero3_partition(numel: int, dp: int, d: int):
    """(start, stored, padded) of DP rank ``d``'s ZeRO-3 partition of a parameter of ``numel`` elements:
    every rank holds ``padded = ceil(numel / dp)`` elements of it (zero padding after the end),
    ``stored`` of them real, from ``start`` (DeepSpeed's ``_partition_param`` rule)."""
    padded = -(-int(numel) // int(dp))
    start = d * padded
    return start, max(0, min(padded, int(numel) - start)), padded


def _zero3_rank(ds_dir: Path, t: int, dp: int):
    """The same for TP rank ``t`` of a ZeRO-3 checkpoint. Each DP rank's optimizer file holds, per
    sub-group, one flat fp32 partition and its moments: the concatenation, in the sub-group's
    parameter order (``param_shapes`` of the model-states files), of every parameter's own padded
    partition (``zero3_partition``), unlike ZeRO-1/2's one flat group cut across ranks. A
    parameter is its ranks' partitions concatenated in DP rank order (as DeepSpeed's
    ``extract_zero_shards_stage3`` / ``merge_zero3_slices`` rebuild it)."""
    from ..optim import adam_moments

    model_states = _load(ds_dir / f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt")
    shapes = model_states.get("param_shapes")
    if not shapes:
        raise CheckpointError(f"{ds_dir}: the ZeRO-3 model states of TP rank {t} record no parameter shapes")
    pieces: Dict[str, Dict[str, list]] = {k: {} for k in STATE_KEYS}
    steps = []
    for d in range(dp):
        osd = _load(ds_dir / f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")["optimizer_state_dict"]
        if int(osd.get("partition_count", dp)) != dp:
            raise CheckpointError(f"{ds_dir}: ZeRO-3 partitions over {osd['partition_count']} ranks, the recorded "
                                  f"layout has DP={dp}")
        states = osd["optimizer_state_dict"]["state"]
        for g, group in enumerate(shapes):
            flat = {"fp32": osd["fp32_flat_groups"][g].float().reshape(-1)}
            if g in states:
                flat["exp_avg"], flat["exp_avg_sq"], step = adam_moments(states[g])
                steps.append(step)
            else:  # never stepped
                flat["exp_avg"] = flat["exp_avg_sq"] = torch.zeros_like(flat["fp32"])
            offset = 0
            for name, shape in group.items():
                numel = int(torch.Size(shape).numel())
                _, stored, padded = zero3_partition(numel, dp, d)
                if offset + padded > flat["fp32"].numel():
                    raise CheckpointError(f"{ds_dir}: the ZeRO-3 partition of sub-group {g} on DP rank {d} ends "
                                          f"before {name!r}")
                for k in STATE_KEYS:
                    pieces[k].setdefault(name, []).append(flat[k].reshape(-1).narrow(0, offset, stored))
                offset += padded
    out = {k: {} for k in STATE_KEYS}
    for group in shapes:
        for name, shape in group.items():
            for k in STATE_KEYS:
                out[k][name] = torch.cat(pieces[k][name]).reshape(tuple(shape))
    sched = model_states.get("lr_scheduler") or {}
    return out, max(steps, default=0), int(sched.get("last_epoch", model_states.get("global_steps", 0)))


def read_engine_state(path: Path, source: Optional[Layout], preset, sl_config) -> UniversalState:
    """The merged state of checkpoint ``path`` written at layout ``source`` (any process)."""
    from ...model.hf import ExportError, gather_weights

    path = Path(path)
    if is_universal(path):
        return read_universal(path, preset, sl_config)
    engine = path / ENGINE_DIR
    if source is None:
        raise CheckpointError(f"checkpoint {path} records neither its parallel layout nor a layout-free form")
    per_rank, opt_steps, sched_steps = [], [], []
    for t in range(source.tp):
        if source.zero_stage is None:
            # per-layer files are per global rank; ranks 0..tp-1 are data-parallel replica 0
            st, opt_step, sched = _per_layer_rank(engine / f"per_layer_rank_{t:05d}.pt")
        elif source.zero_stage == 3:
            st, opt_step, sched = _zero3_rank(engine / "ds", t, source.dp)
        else:
            st, opt_step, sched = _deepspeed_rank(engine / "ds", t, source.dp, source.zero_stage)
        per_rank.append(st)
        opt_steps.append(opt_step)
        sched_steps.append(sched)
    support = []
    for t in range(source.tp):
        f = rank_file(path, t)
        support.append(torch.load(f, map_location="cpu", weights_only=True)["sl_support"] if f.is_file() else {})
    try:
        merged = {k: gather_weights([s[k] for s in per_rank], preset, sl_config, support) for k in STATE_KEYS}
    except (ExportError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot merge the TP shards: {e}") from None
    return UniversalState(merged, max(opt_steps), max(sched_steps), source)


# --------------------------------------------------------------------------------------------
# the universal form on disk
# --------------------------------------------------------------------------------------------
def _param_tensors(weights) -> Dict[str, torch.Tensor]:
    """``{module parameter name: global tensor}`` of a GlobalWeights (SL values in global support order)."""
    out = dict(weights.dense)
    for name, fp in weights.parts.items():
        layer, part = name.rsplit(".", 1)
        base = f"{layer}.parts.{part}"
        out.update({f"{base}.B": fp.B, f"{base}.A": fp.A, f"{base}.values": fp.values})
    return out


def write_universal(state: UniversalState, directory: Path) -> None:
    """``directory/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`` + ``meta.json`` (DeepSpeed's universal layout)."""
    from .atomic import torch_save_durable, write_durable

    directory = Path(directory)
    tensors = {k: _param_tensors(state.tensors[k]) for k in STATE_KEYS}
    for name in tensors["fp32"]:
        for k in STATE_KEYS:
            torch_save_durable({"param": tensors[k][name].contiguous()}, directory / "zero" / name / f"{k}.pt")
    w = state.tensors["fp32"]
    meta = {"format": UNIVERSAL_FORMAT, "opt_step": state.opt_step, "schedule_step": state.schedule_step,
            "source_layout": None if state.source is None else state.source.to_dict(), "vocab_size": w.vocab_size,
            "params": sorted(tensors["fp32"]),
            "sl_parts": {name: {"shape": list(fp.shape), "seed": fp.seed, "density": fp.density, "scale": fp.scale}
                         for name, fp in w.parts.items()}}
    write_durable(directory / UNIVERSAL_META, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())


def read_universal(path: Path, preset, sl_config) -> UniversalState:
    """Inverse of ``write_universal`` for checkpoint ``path``; the support of every SL matrix is
    re-derived from (seed, name)."""
    from ...core import support as sup
    from ...model.hf import FactoredPart, GlobalWeights
    from .names import format_problem

    directory = Path(path) / ENGINE_DIR / UNIVERSAL_DIR
    meta = json.loads((directory / UNIVERSAL_META).read_text())
    problem = format_problem(meta.get("format"), UNIVERSAL_FORMAT, f"{directory / UNIVERSAL_META}")
    if problem:
        raise CheckpointError(problem)
    merged = {}
    for k in STATE_KEYS:
        flat = {n: torch.load(directory / "zero" / n / f"{k}.pt", map_location="cpu", weights_only=True)["param"]
                for n in meta["params"]}
        parts = {}
        for name, m in meta["sl_parts"].items():
            layer, part = name.rsplit(".", 1)
            base = f"{layer}.parts.{part}"
            out_f, in_f = m["shape"]
            index = sup.sample_support(out_f, in_f, m["density"], m["seed"], name).idx
            values = flat.pop(f"{base}.values")
            if values.numel() != index.numel():
                raise CheckpointError(f"{directory}: {base}.values has {values.numel()} entries, the support of "
                                      f"(seed {m['seed']}, {name!r}) has {index.numel()}")
            parts[name] = FactoredPart(name, flat.pop(f"{base}.B"), flat.pop(f"{base}.A"), values, index,
                                       float(m["scale"]), int(m["seed"]), float(m["density"]))
        merged[k] = GlobalWeights(preset, int(meta["vocab_size"]), sl_config, parts, flat)
    src = meta.get("source_layout")
    return UniversalState(merged, int(meta["opt_step"]), int(meta["schedule_step"]),
                          None if src is None else Layout.from_dict(src))


# --------------------------------------------------------------------------------------------
# into the new layout
# --------------------------------------------------------------------------------------------
def repad_vocab(weights, rows: int):
    """``weights`` (a GlobalWeights: fp32 weights or a moment) with ``rows`` embedding / output rows:
    the rows both paddings have are carried (every tokenizer row and the common padding rows),
    padding rows the old layout lacks are zero (weights and moments, as Megatron's universal
    checkpoint re-pads), rows the new padding lacks are dropped. The padding rows are in the output
    softmax, so the loss changes with their number (``config_checks.vocab_change_note``)."""
    from ...model.hf import EMBEDDING, OUTPUT

    if weights.vocab_size == rows:
        return weights
    keep = min(weights.vocab_size, rows)
    dense = dict(weights.dense)
    for name in (EMBEDDING, OUTPUT):
        t = dense[name][:keep]
        dense[name] = torch.cat([t, t.new_zeros(rows - keep, *t.shape[1:])])
    return dataclasses.replace(weights, vocab_size=rows, dense=dense)


def apply(state: UniversalState, engine, model: torch.nn.Module, padded_vocab: int) -> None:
    """This rank's slices of ``state`` into ``engine`` (which implements ``load_universal``); a
    changed padded vocabulary is re-padded first (``repad_vocab``)."""
    from ...model.hf import ExportError, local_weights

    tensors = {k: repad_vocab(state.tensors[k], padded_vocab) for k in STATE_KEYS}
    try:
        with engine.gathered_params():  # ZeRO-3: the parameters' full shapes (no data is changed here)
            local = {k: local_weights(model, tensors[k]) for k in STATE_KEYS}
    except ExportError as e:
        raise CheckpointError(f"cannot reshard the checkpoint onto this model: {e}") from None
    engine.load_universal(local, opt_step=state.opt_step, schedule_step=state.schedule_step)
