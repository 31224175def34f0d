"""The training configuration: one typed tree of pydantic models, loaded from YAML plus
``section.key=value`` overrides, and the single source of truth for every training setting.

Everything a run needs is a field below; nothing is read from anywhere else (the DeepSpeed JSON is
rendered from it, see ``ds_config``). Each field's ``description`` is its documentation
(``megatron-sl train --help-config`` prints them all). Loading is strict: an unknown section or
key, a value of the wrong type or one outside its allowed set raises ``ConfigError`` naming the key
and the value. Checks that need the world size, the model preset or the files on disk live in
``config_checks``.

Adding a setting is one edit: a ``Field`` with its default and description in its section.

YAML layout: the sections below, each optional; ``base: other.yaml`` starts from another config
(path relative to the including file). Overrides use dotted keys with values parsed as YAML:
``optim.lr=1e-3 model.num_layers=2 deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0``.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from ..constants import SL_PATHS, SL_SLOTS, VARIANTS
from ..resources import resolve_config


class ConfigError(ValueError):
    """A bad training configuration; the message names the key and the value."""


# --- value types ---------------------------------------------------------------------------------
# YAML gives ints, floats, bools, strings and None; the types below accept exactly what a config
# author means: no bool where a number is meant, no float where an int is meant, a number where a
# string is meant (``data.split=100``), a numeric string where a float is meant (YAML 1.1 reads
# ``1e-3`` without a dot as a string), and an empty value for a string is "".
def _not_bool(kind: str):
    def check(value):
        if isinstance(value, bool):
            raise PydanticCustomError(kind, "bool given")
        return value
    return check


def _empty_is_blank(value):
    return "" if value is None else value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Number = Annotated[float, BeforeValidator(_not_bool("float_type"))]
Text = Annotated[str, BeforeValidator(_empty_is_blank)]


def _choice(*values):
    """A value from a fixed set (a bool is never one of them; an empty string choice is "")."""
    if isinstance(values[0], int):
        return Annotated[Literal[values], BeforeValidator(_not_bool("int_type"))]
    return Annotated[Literal[values], BeforeValidator(_not_bool("string_type")), BeforeValidator(_empty_is_blank)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


# --- sections ------------------------------------------------------------------------------------
class ModelSection(_Section):
    """Which model: a LLaMA preset (``megatron_sl.model.presets``) and optional shape overrides."""

    preset: Text = Field("tiny", description="LLaMA preset: tiny, 60m, 130m, 350m, 1b or 7b (`megatron-sl presets`)")
    variant: _choice(*VARIANTS) = Field(
        "sl", description="sl: W = s·BA + S; lowrank: W = s·BA (the δ=0 baseline); dense: full rank")
    num_layers: Optional[Int] = Field(None, description="transformer layers (null: the preset's)")
    hidden_size: Optional[Int] = Field(None, description="model width (null: the preset's)")
    ffn_hidden_size: Optional[Int] = Field(None, description="SwiGLU inner width (null: the preset's)")
    num_attention_heads: Optional[Int] = Field(None, description="attention heads (null: the preset's)")
    num_query_groups: Optional[Int] = Field(None, description="key/value heads, GQA (null: the preset's)")
    seq_length: Optional[Int] = Field(None, description="tokens per sequence (null: the preset's)")
    vocab_size: Optional[Int] = Field(
        None, description="vocabulary before padding (null: the tokenizer's); padded up to a multiple of "
                          "make_vocab_size_divisible_by x TP, as megatron does")
    make_vocab_size_divisible_by: Int = Field(128, description="vocabulary padding multiple (times TP)")
    recompute: _choice("none", "selective", "full") = Field(
        "none", description="activation recompute (megatron-core's): none keeps every activation; selective "
                            "recomputes core attention (no b·heads·s² softmax kept); full keeps only each layer's "
                            "input and runs the layer again in backward")
    init_from: Optional[Text] = Field(
        None, description="factored SL weight directory (`import-hf` output or `export-hf --sl`) that replaces "
                          "a fresh run's initialisation (a resume still loads its checkpoint); its shape and SL "
                          "settings must equal this config's")


class SLSection(_Section):
    """SL settings, turned into ``megatron_sl.core.SLConfig``."""

    rank: Optional[Int] = Field(None, description="r, the inner dimension of B (out x r) and A (r x in); null: the "
                                                  "preset's")
    density: Optional[Number] = Field(None, description="δ, the fraction of S's entries on its support; null: the "
                                                        "preset's (0 under model.variant=lowrank)")
    alpha: Optional[Number] = Field(None, description="α; the low-rank scale is s = α / r; null: the preset's")
    seed: Int = Field(0, description="support and init seed; each layer's come from (seed, layer name)")
    targets: List[Text] = Field(default_factory=lambda: list(SL_SLOTS),
                                description=f"megatron linear slots made SL, a subset of {list(SL_SLOTS)}; the "
                                            "others stay dense")
    path: _choice(*SL_PATHS) = Field("auto", description="auto: the cost model picks dense materialisation or "
                                                         "the factored path per call; dense / factored force one")
    save_xa: Bool = Field(False, description="the factored path keeps x·Aᵀ (T x r per SL part) for backward "
                                             "instead of recomputing it: one GEMM less per part and micro-batch "
                                             "for T·r more activation elements; same results")

    @field_validator("targets")
    @classmethod
    def _known_slots(cls, targets):
        for t in targets:
            if t not in SL_SLOTS:
                raise ValueError(f"unknown slot {t!r}; expected a subset of {list(SL_SLOTS)}")
        return targets


class DataSection(_Section):
    """The megatron indexed dataset and its sentencepiece tokenizer."""

    prefix: Text = Field("", description="indexed dataset prefix (PREFIX.bin / PREFIX.idx, or the prefix given to "
                                         "prepare-data without _text_document)")
    tokenizer: Text = Field("", description="sentencepiece tokenizer model")
    split: Text = Field("95,5,0", description="document split weights train,valid,test")
    cache_dir: Optional[Text] = Field(None, description="dataset index cache (null: <data dir>/index_cache, shared "
                                                        "by runs over the same data)")


class TrainSection(_Section):
    """Batch sizes, length, seed and precision; global = micro x accumulation x data-parallel size."""

    micro_batch_size: Int = Field(4, description="sequences per rank per forward/backward")
    global_batch_size: Int = Field(8, description="sequences per optimizer step, over all data-parallel ranks")
    gradient_accumulation_steps: Optional[Int] = Field(
        None, description="micro-batches per step (null: global / (micro x DP), which must divide)")
    train_iters: Int = Field(100, description="optimizer steps")
    seed: Int = Field(1234, description="data order and non-SL initialisation seed")
    precision: _choice("fp32", "bf16") = Field("fp32", description="training precision")
    compile: _choice("off", "inductor", "aot_eager") = Field(
        "off", description="torch.compile the model as one graph (fullgraph), in place: off, inductor (generated "
                           "code) or aot_eager (traced forward/backward graphs run op by op; quick to compile)")


class OptimSection(_Section):
    """Optimizer, LR schedule (linear warmup, then cosine to min_lr_ratio x lr at train_iters), clipping."""

    name: _choice("adamw", "adamw8bit") = Field(
        "adamw", description="adamw (torch) or adamw8bit (bitsandbytes 8-bit states)")
    lr: Number = Field(3e-3, description="peak learning rate")
    min_lr_ratio: Number = Field(0.1, description="final lr as a fraction of lr, in (0, 1]")
    warmup_iters: Optional[Int] = Field(None, description="linear warmup steps (null: 10 % of train_iters)")
    weight_decay: Number = Field(0.0, description="AdamW weight decay")
    beta1: Number = Field(0.9, description="AdamW β1, in [0, 1)")
    beta2: Number = Field(0.999, description="AdamW β2, in [0, 1)")
    eps: Number = Field(1e-8, description="AdamW ε")
    clip_grad: Number = Field(1.0, description="global gradient-norm clip (0: off)")
    per_layer: Bool = Field(
        False, description="step each parameter's optimizer in its post-accumulate-grad hook at the accumulation "
                           "boundary (no DeepSpeed; needs deepspeed.zero_stage=0); with train.precision=bf16 the "
                           "parameters are pure bf16 without an fp32 master copy (the paper's setting)")
    min_8bit_size: Int = Field(4096, description="bitsandbytes keeps fp32 state for tensors (under ZeRO: flat "
                                                 "partitions) smaller than this")


class ParallelSection(_Section):
    """Model parallelism; data parallel = world size / TP."""

    tensor_parallel: Int = Field(1, description="tensor-parallel size")
    sequence_parallel: Bool = Field(False, description="megatron sequence parallelism (needs tensor_parallel > 1)")


class DeepSpeedSection(_Section):
    """DeepSpeed ZeRO; batch sizes and clipping are written into its JSON from train.* / optim.*."""

    zero_stage: _choice(0, 1, 2, 3) = Field(1, description="ZeRO stage")
    config_template: Optional[Text] = Field(
        None, description="DeepSpeed JSON template (null: the shipped one for zero_stage); may not set batch "
                          "sizes, clipping, optimizer or scheduler")
    extra: Dict[str, Any] = Field(default_factory=dict,
                                  description="deep-merged into the template; the same keys are forbidden")


class EvalSection(_Section):
    """Validation on a fixed held-out set."""

    interval: Int = Field(50, description="validate every this many steps (0: only at the end)")
    iters: Int = Field(4, description="micro-batches per data-parallel rank per validation")
    at_start: Bool = Field(True, description="also validate once before training")


class RunSection(_Section):
    """Outputs, checkpoints (``<output_dir>/checkpoints/step_XXXXXXXX``, see ``training.checkpoint``) and resume."""

    output_dir: Text = Field("runs/default", description="run directory: metrics.jsonl, resolved config, DeepSpeed "
                                                         "config, checkpoints")
    overwrite: Bool = Field(False, description="reuse a run directory that has outputs but no checkpoints")
    log_interval: Int = Field(1, description="steps between log lines")
    progress_bar: Bool = Field(True, description="show a progress bar on rank 0")
    save_at_end: Bool = Field(True, description="checkpoint after the last step")
    save_interval: Int = Field(0, description="checkpoint every this many steps (0: off); SIGUSR2 saves too, and "
                                              "SIGUSR1/SIGTERM save before exiting with code 75")
    keep_last: Int = Field(3, description="newest checkpoints kept")
    resume: Bool = Field(True, description="continue from the newest complete checkpoint in output_dir")
    allow_config_change: List[Text] = Field(
        default_factory=list, description="keys (or sections) whose change against the resumed checkpoint's config "
                                          "is accepted although it changes what training means (model, sl, data, "
                                          "seed, optimizer; see training.resume_check); "
                                          "`train --allow-config-change KEY[,KEY]` sets it. A changed TP / DP / "
                                          "ZeRO layout needs none: it is resharded (training.checkpoint.reshard)")


class LaunchSection(_Section):
    """How ``megatron-sl train`` starts ranks outside a launcher (under torchrun / deepspeed / Slurm
    the launcher's world size is used and these are ignored)."""

    nproc_per_node: Int = Field(1, description="local ranks started through torchrun")
    master_port: Optional[Int] = Field(None, description="rendezvous port (null: a free one)")
    device: _choice("auto", "cpu", "cuda") = Field("auto", description="auto: CUDA when available, else CPU")
    cpu_retain_freed_memory: Bool = Field(
        True, description="on CPU every rank keeps freed memory for reuse (glibc mallopt: no mmap for large "
                          "blocks, no heap trimming) instead of faulting its step buffers in again every step; "
                          "resident memory stays at the high-water mark (any launcher)")


class MetricsSection(_Section):
    """Run metrics (``training.monitoring``): rank 0 gathers the per-rank figures each step and writes
    every sink switched on here."""

    jsonl: Bool = Field(True, description="<run>/metrics.jsonl (train / eval / run / summary records)")
    tensorboard: Bool = Field(True, description="TensorBoard event files in <run>/tensorboard")
    wandb: Optional[Bool] = Field(None, description="Weights & Biases: null logs when the wandb package is "
                                                    "importable (never installed by this project), true requires "
                                                    "it, false never")
    wandb_mode: _choice("offline", "online") = Field("offline", description="offline writes under <run>/wandb")
    wandb_project: Text = Field("megatron-sl", description="W&B project name")
    prometheus_port: Int = Field(0, description="rank 0 serves http://<prometheus_addr>:<port>/metrics (0: off)")
    prometheus_addr: Text = Field("0.0.0.0", description="address the Prometheus endpoint binds")
    prometheus_linger_s: Number = Field(20.0, description="seconds the endpoint keeps serving after the run so a "
                                                          "last scrape sees msl_run_finished 1 (above the scrape "
                                                          "interval)")
    prometheus_textfile: Optional[Text] = Field(
        None, description="also write the metrics atomically every step to this .prom file for node_exporter's "
                          "textfile collector; {run} and {job_id} are filled in (null: off)")
    run_name: Optional[Text] = Field(None, description="the run label (null: the run directory's name)")
    job_id: Optional[Text] = Field(None, description="the job_id label (null: $SLURM_JOB_ID, else local)")
    peak_tflops: Optional[Number] = Field(
        None, description="peak TFLOP/s of one device that MFU is relative to (e.g. 989 for an H100 SXM in bf16); "
                          "null: measured once at start by timing a matmul on rank 0's device (an achieved rate, "
                          "not the vendor's peak)")


class GuardSection(_Section):
    """Run-time guards (``training.guards``): a bad step is skipped with the optimizer untouched while
    the LR schedule and data advance, and is counted in metrics.jsonl (``skipped_steps``)."""

    skip_nonfinite: Bool = Field(True, description="skip a step whose global loss is NaN/inf")
    spike_factor: Number = Field(0.0, description="skip a step whose loss is above this x the mean of the last "
                                                  "spike_window good losses (0: off, else > 1)")
    spike_window: Int = Field(20, description="good losses the spike check averages")
    max_bad_steps: Int = Field(5, description="consecutive bad steps that stop the run with exit code 3; the last "
                                              "checkpoint before them is kept outside run.keep_last")
    step_timeout_s: Number = Field(1800.0, description="a step, validation batch or checkpoint save longer than this "
                                                       "dumps every thread's stack and exits with code 4 (0: off)")


class TrainConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    sl: SLSection = Field(default_factory=SLSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    run: RunSection = Field(default_factory=RunSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    guard: GuardSection = Field(default_factory=GuardSection)

    def to_dict(self) -> dict:
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- errors --------------------------------------------------------------------------------------
_EXPECTED = {"int": "an integer", "bool": "true/false", "float": "a number", "string": "a string",
             "list": "a list", "dict": "a mapping"}


def _field_type(section: str, key: str) -> Any:
    return TrainConfig.model_fields[section].annotation.model_fields[key].annotation


def _choices(tp: Any) -> list:
    """The allowed values of a ``_choice`` annotation (possibly inside Optional)."""
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is Literal:
            return list(typing.get_args(arg))
        if typing.get_origin(arg) is Annotated:
            found = _choices(typing.get_args(arg)[0])
            if found:
                return found
    return []


def _error_message(err: ValidationError, source: str) -> str:
    """One line naming the key and the value, from pydantic's first error."""
    e = err.errors()[0]
    loc, kind, value = e["loc"], e["type"], e.get("input")
    section = str(loc[0])
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"{source}: unknown section {section!r}; known sections: {', '.join(TrainConfig.model_fields)}"
        keys = TrainConfig.model_fields[section].annotation.model_fields
        return f"{source}: unknown key '{section}.{loc[1]}'; keys of [{section}]: {', '.join(keys)}"
    if len(loc) == 1:
        return f"{source}: section {section!r} must be a mapping, got {value!r}"
    key = f"{section}.{loc[1]}" + "".join(f"[{i}]" for i in loc[2:])
    if kind == "value_error":
        return f"config key {key}: {e['ctx']['error']}"
    if kind == "literal_error":
        return f"config key {key}={value!r} is not one of {_choices(_field_type(section, str(loc[1])))}"
    expected = next((v for k, v in _EXPECTED.items() if kind.startswith(k)), "a valid value")
    if value is None:  # ``key=`` on the command line or ``key:`` in YAML
        return f"config key {key} is empty: expected {expected}"
    return f"config key {key}={value!r}: expected {expected}"


# --- loading -------------------------------------------------------------------------------------
def from_dict(data: dict, *, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a nested mapping; unknown sections/keys and bad types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if v is not None}  # an empty ``section:`` keeps the defaults
    try:
        return TrainConfig.model_validate(copy.deepcopy(data))
    except ValidationError as e:
        raise ConfigError(_error_message(e, source)) from None


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
    """YAML file (or defaults if ``path`` is None) + overrides -> TrainConfig (type-checked).

    A ``path`` that does not exist but names a shipped config (``configs/tiny_sl.yaml``) loads that."""
    data = read_yaml(resolve_config(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(data, source=str(path) if path is not None else "config")


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())


# --- documentation -------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    choices = _choices(tp)
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if choices:
        return " | ".join(map(str, choices))
    if typing.get_origin(tp) is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) in (dict, Dict):
        return "mapping"
    return {int: "int", float: "number", bool: "bool", str: "string"}.get(tp, str(tp))


def describe_keys() -> str:
    """Every ``section.key`` with its type, default and description (``train --help-config``)."""
    defaults = TrainConfig().to_dict()
    lines = []
    for section, sfield in TrainConfig.model_fields.items():
        model = sfield.annotation
        lines.append(f"{section}:  {' '.join((model.__doc__ or '').split())}")
        for key, field in model.model_fields.items():
            default = yaml.safe_dump(defaults[section][key], default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {section}.{key}  ({_type_name(field.annotation)}; default {default})")
            lines.append(f"      {field.description}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
