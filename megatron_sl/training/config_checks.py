"""Checks of a TrainConfig against the world size, the model preset and the files on disk (the
config's own types and allowed values are checked when it loads, in ``config``), and the
``Plan`` of derived quantities (DP size, gradient accumulation, padded vocabulary, resolved model
shape, SLConfig, warmup, DeepSpeed template) that the rest of training reads.

``make_plan`` is called twice: in the launching process before any rank starts, and again in every
rank before distributed init. It is cheap (no megatron/deepspeed import, no dataset build) and
raises one ``ConfigError`` naming the bad key and value; it writes nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..core.config import SLConfig
from ..parallel.variants import variant_sl_config
from ..resources import ds_template
from .config import ConfigError, TrainConfig

# DeepSpeed keys that are written from the training config at launch and therefore may not be
# set in a template or in ``deepspeed.extra``.
DS_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler", "fp16")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Quantities derived from a validated config; read-only."""

    world_size: int
    tp: int
    dp: int
    grad_accum: int
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    vocab_size: int           # padded, what the model is built with
    tokenizer_vocab_size: int
    preset: Any               # the LlamaPreset after shape overrides
    sl_config: Optional[SLConfig]
    warmup_iters: int
    ds_template: Optional[Path]
    config_changes: tuple = ()  # allowed changes against the resumed checkpoint's config (logged)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def use_deepspeed(self) -> bool:
        return self.ds_template is not None


def _fail(msg: str):
    raise ConfigError(msg)


def _positive(key: str, v, allow_zero: bool = False):
    if v is None or v < 0 or (v == 0 and not allow_zero):
        _fail(f"config key {key}={v!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_readable(path: str, what: str, key: str) -> Path:
    p = Path(path)
    if not path:
        _fail(f"config key {key} is empty: give the {what}")
    if not p.is_file():
        _fail(f"config key {key}={path!r}: {what} {str(p)!r} does not exist or is not a file")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        _fail(f"config key {key}={path!r}: {what} {str(p)!r} cannot be read: {e.strerror}")
    if not head:
        _fail(f"config key {key}={path!r}: {what} {str(p)!r} is empty")
    return p


def check_data(cfg: TrainConfig, seq_length: Optional[int] = None, train_samples: Optional[int] = None,
               valid_samples: Optional[int] = None) -> int:
    """The indexed dataset (header, sizes) and tokenizer are readable; with ``seq_length``, also every
    check of the dataset build (``data.datasets.plan_datasets``: tokenizer fingerprint against the
    data's meta file, token-id range, documents long enough for the split). Returns the tokenizer
    vocab size."""
    from .data.datasets import plan_datasets, resolve_data_prefix
    from .data.errors import DataError
    from .data.indexed_format import inspect_indexed_dataset
    from .data.tokenizer import load_tokenizer

    prefix = cfg.data.prefix
    if not prefix:
        _fail("config key data.prefix is empty: give the indexed dataset prefix (PREFIX.bin / PREFIX.idx)")
    try:
        resolved = resolve_data_prefix(prefix)
        for suffix in (".bin", ".idx"):
            check_readable(f"{resolved}{suffix}", "indexed dataset file", "data.prefix")
        inspect_indexed_dataset(resolved)
    except DataError as e:
        _fail(f"config key data.prefix={prefix!r}: {e}")
    check_readable(cfg.data.tokenizer, "tokenizer model", "data.tokenizer")
    try:
        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    except DataError as e:
        _fail(f"config key data.tokenizer={cfg.data.tokenizer!r}: {e}")
    parts = cfg.data.split.split(",")
    try:
        weights = [float(x) for x in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        _fail(f"config key data.split={cfg.data.split!r} must be 1-3 non-negative weights 'train,valid,test' "
              "with train > 0, e.g. '95,5,0'")
    weights += [0.0] * (3 - len(weights))
    if cfg.eval.iters > 0 and weights[1] <= 0:
        _fail(f"config key data.split={cfg.data.split!r} has no validation share but eval.iters={cfg.eval.iters}")
    if seq_length is not None:
        try:
            plan_datasets(prefix, cfg.data.tokenizer, seq_length, cfg.train.seed, cfg.data.split, train_samples,
                          valid_samples, cfg.data.cache_dir)
        except DataError as e:
            _fail(f"config keys data.prefix/data.tokenizer/model.seq_length: {e}")
    return vocab


def resolve_preset(cfg: TrainConfig):
    from ..model import presets as P

    try:
        preset = P.get_preset(cfg.model.preset)
    except (KeyError, ValueError) as e:
        _fail(f"config key model.preset={cfg.model.preset!r} is not a known preset ({e})")
    shape_keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "seq_length", "vocab_size")
    overrides = {k: getattr(cfg.model, k) for k in shape_keys if getattr(cfg.model, k) is not None}
    for k, v in overrides.items():
        _positive(f"model.{k}", v)
    try:
        return dataclasses.replace(preset, **overrides) if overrides else preset
    except ValueError as e:  # the preset's own shape checks
        _fail(f"config section model: {e}")


def check_model(cfg: TrainConfig, preset, tp: int) -> Optional[SLConfig]:
    """TP against the model shape (the shape itself is checked by the preset) and the SLConfig."""
    heads, groups, ffn = preset.num_attention_heads, preset.num_query_groups, preset.ffn_hidden_size
    for name, v in (("num_attention_heads", heads), ("num_query_groups", groups), ("ffn_hidden_size", ffn)):
        if v % tp:
            _fail(f"parallel.tensor_parallel={tp} does not divide model {name}={v}")
    if preset.seq_length < 2:
        _fail(f"model.seq_length={preset.seq_length} must be >= 2")
    if cfg.model.variant == "dense":
        return None
    rank = cfg.sl.rank if cfg.sl.rank is not None else preset.rank
    alpha = cfg.sl.alpha if cfg.sl.alpha is not None else preset.alpha
    density = cfg.sl.density if cfg.sl.density is not None else preset.density
    if cfg.model.variant == "lowrank" and cfg.sl.density not in (None, 0, 0.0):
        _fail(f"config key sl.density={cfg.sl.density!r} contradicts model.variant='lowrank' (density 0)")
    try:
        slc = variant_sl_config(SLConfig(rank=rank, density=density, alpha=alpha, seed=cfg.sl.seed,
                                         targets=tuple(cfg.sl.targets), path=cfg.sl.path, save_xa=cfg.sl.save_xa),
                                 cfg.model.variant)
    except ValueError as e:
        _fail(f"config section sl: {e}")
    from ..model.param_count import count_parameters

    try:  # every SL matrix (q, k, v, o, gate, up, down) must have rank <= min(out, in)
        count_parameters(preset, cfg.model.variant, slc)
    except ValueError as e:
        _fail(f"config key sl.rank={rank}: {e}")
    return slc


def find_ds_template(cfg: TrainConfig) -> Path:
    if cfg.deepspeed.config_template:
        path = Path(cfg.deepspeed.config_template)
        key = "deepspeed.config_template"
    else:
        path = ds_template(cfg.deepspeed.zero_stage)
        key = "deepspeed.zero_stage"
    if not path.is_file():
        _fail(f"config key {key}: DeepSpeed config template {str(path)!r} does not exist")
    try:
        tmpl = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        _fail(f"DeepSpeed config template {str(path)!r} is not readable JSON: {e}")
    if not isinstance(tmpl, dict):
        _fail(f"DeepSpeed config template {str(path)!r} must be a JSON object")
    check_ds_dict(tmpl, f"DeepSpeed template {str(path)!r}", cfg)
    check_ds_dict(cfg.deepspeed.extra, "config key deepspeed.extra", cfg)
    return path


def check_ds_dict(d: dict, where: str, cfg: TrainConfig) -> None:
    for k in DS_OWNED_KEYS:
        if k in d:
            _fail(f"{where} sets {k!r}; batch sizes, clipping, optimizer and scheduler come from the training "
                  "config only (train.*, optim.*)")
    stage = d.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != cfg.deepspeed.zero_stage:
        _fail(f"{where} has zero_optimization.stage={stage} but deepspeed.zero_stage={cfg.deepspeed.zero_stage}")
    bf16 = d.get("bf16", {}).get("enabled")
    if bf16 is not None and bool(bf16) != (cfg.train.precision == "bf16"):
        _fail(f"{where} has bf16.enabled={bf16} but train.precision={cfg.train.precision!r}")


def check_output_dir(cfg: TrainConfig) -> None:
    from .runlock import LOCK_NAME

    out = Path(cfg.run.output_dir)
    if not cfg.run.output_dir:
        _fail("config key run.output_dir is empty")
    if out.exists() and not out.is_dir():
        _fail(f"config key run.output_dir={cfg.run.output_dir!r} exists and is not a directory")
    if cfg.run.save_interval < 0:
        _fail(f"config key run.save_interval={cfg.run.save_interval!r} must be >= 0 (0: no periodic checkpoints)")
    if cfg.run.keep_last < 1:
        _fail(f"config key run.keep_last={cfg.run.keep_last!r} must be >= 1")
    resumable = cfg.run.resume and not cfg.run.overwrite and (out / "checkpoints").is_dir()
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not cfg.run.overwrite and not resumable:
        _fail(f"config key run.output_dir={cfg.run.output_dir!r} exists and is not empty (and holds no checkpoints "
              "to resume); choose a new directory or set run.overwrite=true")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        _fail(f"config key run.output_dir={cfg.run.output_dir!r}: {str(existing)!r} is a regular file, not a directory")
    try:  # a real probe: access(2) does not see every reason a write fails (root, ACLs, quotas)
        with tempfile.TemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        _fail(f"config key run.output_dir={cfg.run.output_dir!r}: {str(existing)!r} is not writable ({e.strerror})")
    if out.is_dir() and (out / "checkpoints").is_dir():
        probe = out / "checkpoints"
        try:
            with tempfile.TemporaryFile(dir=probe, prefix=".write-probe-"):
                pass
        except OSError as e:
            _fail(f"config key run.output_dir={cfg.run.output_dir!r}: {str(probe)!r} is not writable ({e.strerror})")


def check_guard(cfg: TrainConfig) -> None:
    g = cfg.guard
    if g.spike_factor != 0 and not g.spike_factor > 1:
        _fail(f"config key guard.spike_factor={g.spike_factor!r} must be 0 (off) or > 1")
    _positive("guard.spike_window", g.spike_window)
    _positive("guard.max_bad_steps", g.max_bad_steps)
    _positive("guard.step_timeout_s", g.step_timeout_s, allow_zero=True)


def check_device(cfg: TrainConfig) -> None:
    if cfg.launch.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("config key launch.device='cuda' but no CUDA device is available here (use launch.device=cpu "
                  "or auto)")


def check_metrics(cfg: TrainConfig) -> None:
    m = cfg.metrics
    if not 0 <= m.prometheus_port <= 65535:
        _fail(f"config key metrics.prometheus_port={m.prometheus_port!r} must be a TCP port in [0, 65535] (0: off)")
    _positive("metrics.prometheus_linger_s", m.prometheus_linger_s, allow_zero=True)
    if m.peak_tflops is not None and not m.peak_tflops > 0:
        _fail(f"config key metrics.peak_tflops={m.peak_tflops!r} must be > 0 (or null: measured at start)")
    if m.wandb and importlib.util.find_spec("wandb") is None:
        _fail("config key metrics.wandb=true needs the wandb package, which is not installed "
              "(leave it null to log to W&B only when it is installed)")
    if m.prometheus_textfile is not None:
        try:
            m.prometheus_textfile.format(run="run", job_id="job")
        except (KeyError, IndexError, ValueError) as e:
            _fail(f"config key metrics.prometheus_textfile={m.prometheus_textfile!r}: bad placeholder {e} "
                  "(only {run} and {job_id})")
        if not m.prometheus_textfile.endswith(".prom"):
            _fail(f"config key metrics.prometheus_textfile={m.prometheus_textfile!r} must end in .prom "
                  "(node_exporter's textfile collector reads only *.prom)")
    for key in ("run_name", "job_id"):
        v = getattr(m, key)
        if v is not None and not v.strip():
            _fail(f"config key metrics.{key}={v!r} must not be empty (null: the default)")


def check_init_from(path: str, preset, sl_config: Optional[SLConfig], vocab: int) -> None:
    """``model.init_from`` must be a factored SL directory of this model's shape and SL settings."""
    from .export import ExportError, check_sl_dir

    try:
        check_sl_dir(path, preset, sl_config, vocab)
    except ExportError as e:
        _fail(f"config key model.init_from={path!r}: {e}")


def padded_vocab(base_vocab: int, divisible_by: int, tp: int) -> int:
    """The vocabulary the model is built with: ``base_vocab`` rounded up to a multiple of
    ``divisible_by`` x TP (as megatron does)."""
    multiple = divisible_by * tp
    return -(-base_vocab // multiple) * multiple


def divisor_keeping_vocab(base_vocab: int, rows: int, tp: int, old_multiple: int, limit: int) -> Optional[int]:
    """The ``make_vocab_size_divisible_by`` that pads ``base_vocab`` to ``rows`` at TP=``tp`` (a
    resharded checkpoint must keep its padded vocabulary): ``old_multiple / tp`` (the old
    divisor x TP spread over the new TP size) when that works, else the largest one <= ``limit``;
    None when there is none."""
    cands = ([old_multiple // tp] if old_multiple % tp == 0 else []) + list(range(min(limit, rows // tp), 0, -1))
    return next((k for k in cands if k > 0 and padded_vocab(base_vocab, k, tp) == rows), None)


def vocab_change_note(before: int, after: int) -> str:
    """One phrase describing what ``checkpoint.reshard.repad_vocab`` does from ``before`` to ``after``
    padded rows."""
    change = (f"{after - before} new zero padding rows" if after > before
              else f"the last {before - after} padding rows dropped")
    return (f"padded vocabulary {before} -> {after} rows (model.make_vocab_size_divisible_by x TP): the first "
            f"{min(before, after)} rows carried, {change}; the padding rows are in the output softmax, so the loss "
            f"changes (by more, the larger their share of the rows)")


def make_plan(cfg: TrainConfig, world_size: int, *, check_outputs: bool = True, check_inputs: bool = True) -> Plan:
    """Validate ``cfg`` for ``world_size`` ranks and derive the Plan. Raises ConfigError.

    ``check_inputs=False`` skips the data/tokenizer files (for a check before the data exists; the
    vocabulary is then the model's own) and ``check_outputs=False`` the run directory."""
    t, o = cfg.train, cfg.optim
    if world_size < 1:
        _fail(f"world size {world_size} must be >= 1")
    for key, v in (("train.micro_batch_size", t.micro_batch_size), ("train.global_batch_size", t.global_batch_size),
                   ("train.train_iters", t.train_iters), ("parallel.tensor_parallel", cfg.parallel.tensor_parallel),
                   ("launch.nproc_per_node", cfg.launch.nproc_per_node), ("run.log_interval", cfg.run.log_interval),
                   ("model.make_vocab_size_divisible_by", cfg.model.make_vocab_size_divisible_by)):
        _positive(key, v)
    _positive("eval.interval", cfg.eval.interval, allow_zero=True)
    _positive("eval.iters", cfg.eval.iters, allow_zero=True)
    tp = cfg.parallel.tensor_parallel
    if world_size % tp:
        _fail(f"parallel.tensor_parallel={tp} does not divide the world size {world_size}")
    if cfg.parallel.sequence_parallel and tp == 1:
        _fail("config key parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
    dp = world_size // tp
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        _fail(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
              f"{t.micro_batch_size} x data-parallel size {dp} (= world {world_size} / TP {tp})")
    ga = t.global_batch_size // per_step
    if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps != ga:
        _fail(f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} disagrees with "
              f"global_batch_size {t.global_batch_size} / (micro_batch_size {t.micro_batch_size} x DP {dp}) = {ga}")

    # optimizer / schedule
    if not o.lr > 0:
        _fail(f"config key optim.lr={o.lr!r} must be > 0")
    if not 0 < o.min_lr_ratio <= 1:
        _fail(f"config key optim.min_lr_ratio={o.min_lr_ratio!r} must be in (0, 1]")
    warmup = o.warmup_iters if o.warmup_iters is not None else t.train_iters // 10
    if not 0 <= warmup <= t.train_iters:
        _fail(f"config key optim.warmup_iters={o.warmup_iters!r} must be in [0, train.train_iters={t.train_iters}]")
    for key, v in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= v < 1:
            _fail(f"config key {key}={v!r} must be in [0, 1)")
    if not o.eps > 0:
        _fail(f"config key optim.eps={o.eps!r} must be > 0")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.clip_grad", o.clip_grad, allow_zero=True)
    _positive("optim.min_8bit_size", o.min_8bit_size, allow_zero=True)
    if o.name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        _fail("config key optim.name='adamw8bit' needs the bitsandbytes package, which is not installed")
    ds_template = None
    if o.per_layer:
        if cfg.deepspeed.zero_stage != 0:
            _fail(f"optim.per_layer=true cannot be combined with deepspeed.zero_stage={cfg.deepspeed.zero_stage}: "
                  "ZeRO-1/2/3 partition or reduce gradients inside DeepSpeed and would undo or crash on the "
                  "in-backward updates; use deepspeed.zero_stage=0 (per-layer runs without DeepSpeed)")
    else:
        ds_template = find_ds_template(cfg)

    # model
    preset = resolve_preset(cfg)
    sl_config = check_model(cfg, preset, tp)
    check_guard(cfg)
    check_device(cfg)
    train_samples = t.train_iters * t.global_batch_size
    valid_samples = max(1, cfg.eval.iters) * t.micro_batch_size * dp
    tok_vocab = (check_data(cfg, preset.seq_length, train_samples, valid_samples) if check_inputs
                 else (cfg.model.vocab_size or preset.vocab_size))
    if cfg.model.vocab_size is not None:
        if cfg.model.vocab_size < tok_vocab:
            _fail(f"config key model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                  f"({tok_vocab})")
        base_vocab = cfg.model.vocab_size
    else:
        base_vocab = tok_vocab
    vocab = padded_vocab(base_vocab, cfg.model.make_vocab_size_divisible_by, tp)
    check_metrics(cfg)
    changes: tuple = ()
    if cfg.model.init_from is not None and check_inputs:
        check_init_from(cfg.model.init_from, preset, sl_config, vocab)
    if check_outputs:
        from .resume_check import check_resume

        check_output_dir(cfg)
        changes = tuple(check_resume(cfg, world_size, base_vocab=base_vocab))
    return Plan(world_size=world_size, tp=tp, dp=dp, grad_accum=ga, micro_batch_size=t.micro_batch_size,
                global_batch_size=t.global_batch_size, seq_length=preset.seq_length, vocab_size=vocab,
                tokenizer_vocab_size=tok_vocab, preset=preset, sl_config=sl_config, warmup_iters=warmup,
                ds_template=ds_template, config_changes=changes)
