"""The training configuration: one typed tree of dataclasses, loaded from YAML plus ``key=value``
overrides, and the single source of truth for every training setting.

Everything a run needs is a field below; nothing is read from anywhere else (the DeepSpeed JSON is
rendered from it, see ``ds_config``). Loading is strict: an unknown key, a value of the wrong type
or a value outside its allowed set raises ``ConfigError`` naming the key and the value. Checks that
need the world size, the model preset or the files on disk live in ``validate``.

YAML layout (every section optional, defaults below)::

    base: other.yaml          # optional: start from another config (path relative to this file)
    model:    {preset, variant, num_layers, hidden_size, ...}
    sl:       {rank, density, alpha, seed, targets, path}
    data:     {prefix, tokenizer, split, cache_dir}
    train:    {micro_batch_size, global_batch_size, gradient_accumulation_steps, train_iters, seed, precision}
    optim:    {name, lr, min_lr_ratio, warmup_iters, weight_decay, beta1, beta2, eps, clip_grad, per_layer, min_8bit_size}
    parallel: {tensor_parallel, sequence_parallel}
    deepspeed: {zero_stage, config_template, extra}
    eval:     {interval, iters, at_start}
    run:      {output_dir, overwrite, log_interval, progress_bar, save_at_end}
    launch:   {nproc_per_node, master_port, device}

Overrides use dotted keys, values parsed as YAML: ``optim.lr=1e-3 model.num_layers=2
deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0``.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    """A bad training configuration; the message names the key and the value."""


VARIANTS = ("sl", "lowrank", "dense")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
SL_PATHS = ("auto", "dense", "factored")
SL_SLOTS = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass
class ModelSection:
    """Which model: a LLaMA preset (``megatron_sl.model.presets``) and optional shape overrides.

    ``variant``: "sl" (W = s·BA + S), "lowrank" (W = s·BA, the δ=0 baseline) or "dense" (full rank).
    A ``None`` shape field keeps the preset's value. ``vocab_size`` ``None`` = the tokenizer's
    vocabulary, padded up to a multiple of ``make_vocab_size_divisible_by`` × TP (as megatron does).
    ``init_from``: a factored SL weight directory (``megatron-sl import-hf`` output or
    ``export-hf --sl``) whose weights replace the initialisation of a fresh run (a resume still
    loads its checkpoint); its shape and SL settings must equal this config's.
    """

    preset: str = "tiny"
    variant: str = "sl"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    seq_length: Optional[int] = None
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    init_from: Optional[str] = None


@dataclasses.dataclass
class SLSection:
    """SL settings; ``None`` keeps the preset's r / δ / α. Turned into ``megatron_sl.core.SLConfig``."""

    rank: Optional[int] = None
    density: Optional[float] = None
    alpha: Optional[float] = None
    seed: int = 0
    targets: List[str] = dataclasses.field(default_factory=lambda: list(SL_SLOTS))
    path: str = "auto"


@dataclasses.dataclass
class DataSection:
    """Megatron indexed dataset ``prefix`` (``prefix.bin``/``prefix.idx``, or the prefix given to
    ``prepare-data`` without ``_text_document``), the sentencepiece ``tokenizer`` model, the document
    ``split`` (train,valid,test weights) and the index cache dir (``None``: ``<data dir>/index_cache``,
    shared by runs over the same data)."""

    prefix: str = ""
    tokenizer: str = ""
    split: str = "95,5,0"
    cache_dir: Optional[str] = None


@dataclasses.dataclass
class TrainSection:
    """Batch sizes and length. global = micro × gradient_accumulation_steps × data-parallel size;
    ``gradient_accumulation_steps`` ``None`` = derived from the other two (it must divide)."""

    micro_batch_size: int = 4
    global_batch_size: int = 8
    gradient_accumulation_steps: Optional[int] = None
    train_iters: int = 100
    seed: int = 1234
    precision: str = "fp32"


@dataclasses.dataclass
class OptimSection:
    """AdamW ("adamw", torch) or 8-bit AdamW states ("adamw8bit", bitsandbytes), LR schedule
    (linear warmup, then cosine to ``min_lr_ratio`` × lr at ``train_iters``; ``warmup_iters``
    ``None`` = 10 % of train_iters) and clipping (``clip_grad`` 0 = off).

    ``per_layer``: step each parameter's optimizer inside its post-accumulate-grad hook at the
    gradient-accumulation boundary (no DeepSpeed; needs ``deepspeed.zero_stage=0``).
    ``min_8bit_size``: bitsandbytes keeps fp32 state for tensors (under ZeRO: flat partitions)
    smaller than this.
    """

    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_iters: Optional[int] = None
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    per_layer: bool = False
    min_8bit_size: int = 4096


@dataclasses.dataclass
class ParallelSection:
    """Tensor parallel size (data parallel = world size / TP) and megatron sequence parallelism."""

    tensor_parallel: int = 1
    sequence_parallel: bool = False


@dataclasses.dataclass
class DeepSpeedSection:
    """ZeRO stage 0-3; ``config_template`` ``None`` = ``ds_configs/zero{stage}_{precision}.json``.
    ``extra`` is deep-merged into the template; batch sizes and clipping may not appear in either
    (they are written from this config)."""

    zero_stage: int = 1
    config_template: Optional[str] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalSection:
    """Validation every ``interval`` steps (0 = only at the end) on ``iters`` micro-batches per
    data-parallel rank (a fixed held-out set), plus once before training if ``at_start``."""

    interval: int = 50
    iters: int = 4
    at_start: bool = True


@dataclasses.dataclass
class RunSection:
    """Outputs: run directory (metrics.jsonl, resolved config, DeepSpeed config, checkpoints).

    Checkpoints go to ``<output_dir>/checkpoints/step_XXXXXXXX`` (atomic, ``latest`` pointer,
    newest ``keep_last`` kept; see ``training.checkpoint``): every ``save_interval`` steps (0: off),
    at the end (``save_at_end``), on SIGUSR2, and on SIGUSR1/SIGTERM before exiting with code 75.
    With ``resume`` (default) a run whose directory holds checkpoints continues from the newest
    complete one; a run directory with outputs but no checkpoints is refused unless ``overwrite``.
    """

    output_dir: str = "runs/default"
    overwrite: bool = False
    log_interval: int = 1
    progress_bar: bool = True
    save_at_end: bool = True
    save_interval: int = 0
    keep_last: int = 3
    resume: bool = True


@dataclasses.dataclass
class LaunchSection:
    """How ``megatron-sl train`` starts ranks when it is not already inside a launcher
    (torchrun / deepspeed / Slurm): ``nproc_per_node`` local processes via torchrun. Under an
    external launcher these are ignored and the launcher's world size is used."""

    nproc_per_node: int = 1
    master_port: Optional[int] = None
    device: str = "auto"


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    sl: SLSection = dataclasses.field(default_factory=SLSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    launch: LaunchSection = dataclasses.field(default_factory=LaunchSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Allowed-value sets per key (checked at load; everything else about values is in ``validate``).
CHOICES = {
    "model.variant": VARIANTS,
    "sl.path": SL_PATHS,
    "train.precision": PRECISIONS,
    "optim.name": OPTIMIZERS,
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "launch.device": DEVICES,
}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` if it matches annotation ``tp`` (ints accepted for floats), else raise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}={value!r}: expected true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key}={value!r}: expected a string")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}={value!r}: expected a list")
        (item,) = typing.get_args(tp)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}={value!r}: expected a mapping")
        return copy.deepcopy(value)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # programming error


def _section_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(data: dict, *, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a nested mapping; unknown sections/keys and bad types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    cfg = TrainConfig()
    sections = _section_types(TrainConfig)
    for sec_name, sec_val in data.items():
        if sec_name not in sections:
            raise ConfigError(f"{source}: unknown section {sec_name!r}; known sections: {', '.join(sections)}")
        if sec_val is None:
            continue
        if not isinstance(sec_val, dict):
            raise ConfigError(f"{source}: section {sec_name!r} must be a mapping, got {sec_val!r}")
        section = getattr(cfg, sec_name)
        fields = _section_types(type(section))
        for key, value in sec_val.items():
            full = f"{sec_name}.{key}"
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {full!r}; keys of [{sec_name}]: {', '.join(fields)}")
            value = _check_type(full, value, fields[key])
            if full in CHOICES and value not in CHOICES[full]:
                raise ConfigError(f"config key {full}={value!r} is not one of {list(CHOICES[full])}")
            setattr(section, key, value)
    for t in cfg.sl.targets:
        if t not in SL_SLOTS:
            raise ConfigError(f"config key sl.targets: unknown slot {t!r}; expected a subset of {list(SL_SLOTS)}")
    return cfg


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path, _seen: Optional[set] = None) -> dict:
    """Read a config YAML, resolving ``base:`` chains (paths relative to the including file)."""
    path = Path(path)
    seen = set() if _seen is None else _seen
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    key = path.resolve()
    if key in seen:
        raise ConfigError(f"config file {str(path)!r}: 'base' chain is circular")
    seen.add(key)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config file {str(path)!r}: base={base!r} must be a path string")
        data = _deep_merge(read_yaml(path.parent / base, seen), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r}: key {key!r} must be section.key (e.g. optim.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML: {e}") from None
    return parts, value


def apply_overrides(data: dict, overrides: List[str]) -> dict:
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section/mapping")
            node = node[p]
        node[parts[-1]] = value
    return out


def load_config(path: Optional[str | Path], overrides: Optional[List[str]] = None) -> TrainConfig:
    """YAML file (or defaults if ``path`` is None) + overrides -> TrainConfig (type-checked)."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(data, source=str(path) if path is not None else "config")


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())
