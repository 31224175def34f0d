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
    run:      {output_dir, overwrite, log_interval, progress_bar, save_at_end, save_interval, keep_last, resume,
               allow_config_change}
    launch:   {nproc_per_node, master_port, device}
    metrics:  {jsonl, tensorboard, wandb, prometheus_port, prometheus_textfile, peak_tflops, ...}
    guard:    {skip_nonfinite, spike_factor, spike_window, max_bad_steps, step_timeout_s}

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
RECOMPUTE = ("none", "selective", "full")


@dataclasses.dataclass
class ModelSection:
    """Which model: a LLaMA preset (``megatron_sl.model.presets``) and optional shape overrides.

    ``variant``: "sl" (W = s·BA + S), "lowrank" (W = s·BA, the δ=0 baseline) or "dense" (full rank).
    A ``None`` shape field keeps the preset's value. ``vocab_size`` ``None`` = the tokenizer's
    vocabulary, padded up to a multiple of ``make_vocab_size_divisible_by`` × TP (as megatron does).
    ``recompute``: activation recompute through megatron-core's own mechanism: "none" (keep every
    activation for backward), "selective" (core attention is recomputed, so its b·heads·s² softmax
    probabilities are not kept) or "full" (each transformer layer keeps only its input and runs
    again in backward).
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
    recompute: str = "none"
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
    gradient-accumulation boundary (no DeepSpeed; needs ``deepspeed.zero_stage=0``). With
    ``train.precision=bf16`` the parameters are pure bf16 (no fp32 master copy), the paper's setting.
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
    Resuming with a config that changes what training means (model, SL, data, seed, optimizer;
    see ``training.resume_check``) is refused unless ``allow_config_change`` names the keys (or
    sections); ``megatron-sl train --allow-config-change KEY[,KEY]`` sets it. A changed TP / DP /
    ZeRO 0-2 layout is resharded (``training.checkpoint.reshard``).
    """

    output_dir: str = "runs/default"
    overwrite: bool = False
    log_interval: int = 1
    progress_bar: bool = True
    save_at_end: bool = True
    save_interval: int = 0
    keep_last: int = 3
    resume: bool = True
    allow_config_change: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LaunchSection:
    """How ``megatron-sl train`` starts ranks when it is not already inside a launcher
    (torchrun / deepspeed / Slurm): ``nproc_per_node`` local processes via torchrun. Under an
    external launcher these are ignored and the launcher's world size is used."""

    nproc_per_node: int = 1
    master_port: Optional[int] = None
    device: str = "auto"


@dataclasses.dataclass
class MetricsSection:
    """Run metrics (``training.monitoring``): one registry fed once per step; rank 0 gathers the
    per-rank figures and writes every sink switched on here.

    ``jsonl``: ``<run>/metrics.jsonl`` (train / eval / run / summary records).
    ``tensorboard``: TensorBoard event files in ``<run>/tensorboard``.
    ``wandb``: Weights & Biases: ``None`` (default) logs when the ``wandb`` package is importable (it
    is never installed by this project), ``true`` requires it, ``false`` never; ``wandb_mode`` "offline" (default,
    files under ``<run>/wandb``) or "online"; ``wandb_project`` the project name.
    ``prometheus_port``: rank 0 serves ``http://<prometheus_addr>:<port>/metrics`` (0: off); it keeps
    serving ``prometheus_linger_s`` seconds after the run ends so a last scrape sees
    ``msl_run_finished 1`` (set it above the scrape interval; default 20 s for the usual 15 s).
    ``prometheus_textfile``: also write the same metrics, atomically every step, to this ``.prom``
    file for node_exporter's textfile collector (``None``: off); ``{run}`` and ``{job_id}`` are filled in.
    ``run_name``: the ``run`` label (``None``: the run directory's name); ``job_id``: the ``job_id``
    label (``None``: ``$SLURM_JOB_ID``, else "local").
    ``peak_tflops``: peak TFLOP/s of ONE device that MFU is relative to (e.g. 989 for an H100 SXM in
    bf16). ``None``: measured once at start by timing a matmul in the training precision on rank 0's
    device -- an assumption (the achieved matmul rate of that device, not the vendor's peak).
    """

    jsonl: bool = True
    tensorboard: bool = True
    wandb: Optional[bool] = None
    wandb_mode: str = "offline"
    wandb_project: str = "megatron-sl"
    prometheus_port: int = 0
    prometheus_addr: str = "0.0.0.0"
    prometheus_linger_s: float = 20.0
    prometheus_textfile: Optional[str] = None
    run_name: Optional[str] = None
    job_id: Optional[str] = None
    peak_tflops: Optional[float] = None


@dataclasses.dataclass
class GuardSection:
    """Run-time guards (``training.guards``).

    A step whose global loss is NaN/inf (``skip_nonfinite``) or above ``spike_factor`` x the mean
    of the last ``spike_window`` good losses (``spike_factor`` 0 = no spike check) is skipped: the
    optimizer does not step (parameters and optimizer state untouched), the LR schedule and the
    data position advance, and the step is counted in ``metrics.jsonl`` (``skipped_steps``).
    ``max_bad_steps`` consecutive bad steps stop the run with exit code 3 (``EXIT_DIVERGED``); the
    last checkpoint saved before the bad steps is kept outside the ``run.keep_last`` window.
    ``step_timeout_s`` > 0: a step (or a validation batch / checkpoint save) that takes longer
    dumps every thread's stack (faulthandler) and exits with code 4 (``EXIT_STALLED``); 0 = off.
    """

    skip_nonfinite: bool = True
    spike_factor: float = 0.0
    spike_window: int = 20
    max_bad_steps: int = 5
    step_timeout_s: float = 1800.0


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
    metrics: MetricsSection = dataclasses.field(default_factory=MetricsSection)
    guard: GuardSection = dataclasses.field(default_factory=GuardSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Allowed-value sets per key (checked at load; everything else about values is in ``validate``).
CHOICES = {
    "model.variant": VARIANTS,
    "model.recompute": RECOMPUTE,
    "sl.path": SL_PATHS,
    "train.precision": PRECISIONS,
    "optim.name": OPTIMIZERS,
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "launch.device": DEVICES,
    "metrics.wandb_mode": ("offline", "online"),
}


_EXPECTED = {bool: "true/false", int: "an integer", float: "a number"}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` if it matches annotation ``tp`` (ints accepted for floats), else raise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if value is None:  # ``key=`` on the command line or ``key:`` in YAML
        if tp is str:
            return ""
        raise ConfigError(f"config key {key} is empty: expected {_EXPECTED.get(tp, 'a value')}")
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # data.split=100 read as a number
            return str(value)
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
