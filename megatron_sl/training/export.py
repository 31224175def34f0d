"""A committed training checkpoint read back as one whole model: for export, generation and import.

Owns the knowledge of where a checkpoint keeps each tensor-parallel rank's module state
(``training.checkpoint`` layout):

* DeepSpeed engine, ZeRO 0-2: ``engine/ds/mp_rank_XX_model_states.pt``, key ``module`` (XX = the
  TP rank; DeepSpeed writes one per model-parallel rank);
* per-layer engine: ``engine/per_layer_rank_XXXXX.pt``, key ``module``, per global rank (global
  ranks 0..tp-1 are data-parallel replica 0's TP ranks in megatron's rank order);
* ZeRO-3 keeps the parameters only in the optimizer shards (``zero_pp_rank_D_mp_rank_XX_optim_states.pt``):
  the fp32 masters are cut from them and merged over DP and TP with ``checkpoint.reshard.read_engine_state``;
* a layout-free checkpoint (``engine/universal``, ``megatron-sl checkpoint convert``) is read with
  ``checkpoint.reshard.read_universal``.

``read_checkpoint`` also takes the resolved config from ``client_state.pt`` and the SL support
metadata each rank saved (``ranks/rank_XXXXX.pt``), which ``model.hf.gather_weights`` checks every
re-created shard against. ``write_hf`` / ``write_sl`` write the Hugging Face LLaMA directory
(safetensors + config.json + the sentencepiece tokenizer) or the factored SL form;
``read_sl`` reads the latter back (``import-hf`` output, ``--sl`` export). ``single_process_model``
builds the model at TP=1 in this process (a one-rank gloo group) and loads the weights into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..model.hf import ExportError, GlobalWeights, from_sl_tensors, gather_weights, hf_config_dict
from .checkpoint.names import CLIENT_STATE, ENGINE_DIR, MANIFEST, RANKS_DIR, recorded_world_size, resolve_checkpoint
from .config import TrainConfig, from_dict

SL_WEIGHTS = "sl_weights.safetensors"
SL_META = "sl_config.json"


@dataclasses.dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    cfg: TrainConfig
    tp: int
    weights: GlobalWeights

    @property
    def tokenizer(self) -> Path:
        return Path(self.cfg.data.tokenizer)


def read_checkpoint(path) -> LoadedCheckpoint:
    """The whole model of checkpoint ``path`` (see the module docstring); ``ExportError`` names what is wrong."""
    from .checkpoint.reshard import is_universal, read_universal
    from .config_checks import ConfigError, make_plan
    from ..parallel.variants import variant_sl_config

    path = resolve_checkpoint(Path(path))
    if not (path / MANIFEST).is_file():
        raise ExportError(f"{path} is not a committed megatron-sl checkpoint (no {MANIFEST}); pass a "
                          f"<run>/checkpoints/step_XXXXXXXX directory or a run directory")
    manifest = json.loads((path / MANIFEST).read_text())
    client = torch.load(path / CLIENT_STATE, map_location="cpu", weights_only=False)
    if "config" not in client:
        raise ExportError(f"{path / CLIENT_STATE} holds no resolved config")
    cfg = from_dict(client["config"], source=str(path / CLIENT_STATE))
    try:
        plan = make_plan(cfg, recorded_world_size(path), check_outputs=False, check_inputs=False)
    except ConfigError as e:
        raise ExportError(f"{path}: the checkpoint's config does not validate: {e}") from None
    tp = plan.tp
    engine = path / ENGINE_DIR
    sl_config = variant_sl_config(plan.sl_config, cfg.model.variant)
    if is_universal(path):  # written by `megatron-sl checkpoint convert`: already merged over TP
        weights = read_universal(path, plan.preset, sl_config).tensors["fp32"]
        return LoadedCheckpoint(path, int(manifest["step"]), cfg, tp, weights)
    states = []
    if cfg.optim.per_layer:
        files = [engine / f"per_layer_rank_{r:05d}.pt" for r in range(tp)]
    elif cfg.deepspeed.zero_stage == 3:  # the weights live only in the partitioned optimizer shards
        from .checkpoint.errors import CheckpointError
        from .checkpoint.reshard import Layout, read_engine_state

        try:
            state = read_engine_state(path, Layout(tp, plan.world_size // tp, 3), plan.preset, sl_config)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        return LoadedCheckpoint(path, int(manifest["step"]), cfg, tp, state.tensors["fp32"])
    else:
        files = [engine / "ds" / f"mp_rank_{t:02d}_model_states.pt" for t in range(tp)]
    for f in files:
        if not f.is_file():
            raise ExportError(f"{path}: missing engine file {f.relative_to(path)}")
        blob = torch.load(f, map_location="cpu", weights_only=False)
        module = blob.get("module") if isinstance(blob, dict) else None
        if not isinstance(module, dict):
            raise ExportError(f"{f}: no 'module' state dict")
        states.append({k: v for k, v in module.items() if isinstance(v, torch.Tensor)})
    support = []
    for r in range(tp):
        rank_file = path / RANKS_DIR / f"rank_{r:05d}.pt"
        support.append(torch.load(rank_file, map_location="cpu", weights_only=True)["sl_support"]
                       if rank_file.is_file() else {})
    try:
        weights = gather_weights(states, plan.preset, sl_config, support)
    except KeyError as e:
        raise ExportError(f"{path}: the module state has no tensor {e} (not a megatron-sl LLaMA checkpoint?)") from None
    return LoadedCheckpoint(path, int(manifest["step"]), cfg, tp, weights)


def _tokenizer_ids(tokenizer: Optional[Path]):
    if tokenizer is None:
        return 1, 2
    from .data import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return (tok.bos if tok.bos >= 0 else None), tok.eos


def _copy_tokenizer(tokenizer: Path, out: Path, seq_length: int) -> None:
    """The sentencepiece model as Hugging Face ``LlamaTokenizer`` files. Our data pipeline never adds
    BOS/EOS to a text (documents are separated by EOS), so neither does the exported tokenizer."""
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": False, "add_eos_token": False, "legacy": True,
        "model_max_length": seq_length, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def _fresh_dir(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool, tokenizer: Optional[Path], seq_length: int):
    """A temp directory beside ``out`` to write into; on success the tokenizer is added and it
    replaces ``out``; on failure nothing half-written is left."""
    tmp = _fresh_dir(out, overwrite)
    try:
        yield tmp
        if tokenizer is not None:
            _copy_tokenizer(tokenizer, tmp, seq_length)
        _commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_hf(weights: GlobalWeights, out, tokenizer: Optional[Path], *, overwrite: bool = False,
             dtype: torch.dtype = torch.float32) -> Path:
    """``out/``: ``model.safetensors`` (dense W per HF LLaMA name), ``config.json`` and the tokenizer.
    Written to a temp directory first, so a failure leaves nothing half-written."""
    from safetensors.torch import save_file

    out = Path(out)
    with _staged(out, overwrite, tokenizer, weights.preset.seq_length) as tmp:
        bos, eos = _tokenizer_ids(tokenizer)
        save_file(weights.to_hf(dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = hf_config_dict(weights.preset, weights.vocab_size, bos, eos, str(dtype).replace("torch.", ""))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n")
    return out


def write_sl(weights: GlobalWeights, out, tokenizer: Optional[Path], *, overwrite: bool = False,
             extra: Optional[dict] = None) -> Path:
    """The factored form: ``sl_weights.safetensors`` (B, A, values, index per SL matrix and the dense
    tensors, HF-style names), ``sl_config.json`` (model shape, SL settings and per-matrix metadata),
    the HF ``config.json`` of the equivalent dense model and the tokenizer."""
    from safetensors.torch import save_file

    out = Path(out)
    with _staged(out, overwrite, tokenizer, weights.preset.seq_length) as tmp:
        tensors, meta = weights.to_sl_tensors()
        save_file(tensors, str(tmp / SL_WEIGHTS), metadata={"format": "pt"})
        sl = weights.sl_config
        doc = {"format": "megatron-sl-factored/1", "preset": dataclasses.asdict(weights.preset),
               "vocab_size": weights.vocab_size,
               "sl_config": None if sl is None else {**dataclasses.asdict(sl), "targets": list(sl.targets)},
               "formula": "W = scale * B @ A + S, S.view(-1)[index] = values (row-major, sorted index); the "
                          "support is sample_support(out, in, density, seed, name)",
               "matrices": meta, **(extra or {})}
        (tmp / SL_META).write_text(json.dumps(doc, indent=1) + "\n")
        bos, eos = _tokenizer_ids(tokenizer)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(weights.preset, weights.vocab_size, bos, eos),
                                                    indent=2) + "\n")
    return out


def read_sl(directory) -> GlobalWeights:
    """Inverse of ``write_sl``."""
    from safetensors.torch import load_file

    from ..core.config import SLConfig
    from ..model.presets import LlamaPreset

    d = Path(directory)
    if not (d / SL_META).is_file() or not (d / SL_WEIGHTS).is_file():
        raise ExportError(f"{d} is not a factored SL export (needs {SL_META} and {SL_WEIGHTS})")
    doc = json.loads((d / SL_META).read_text())
    preset = LlamaPreset(**doc["preset"])
    sl = None if doc["sl_config"] is None else SLConfig(**doc["sl_config"])
    return from_sl_tensors(load_file(str(d / SL_WEIGHTS)), doc["matrices"], preset, sl)


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "norm_eps",
                "rope_base")


def check_sl_dir(directory, preset, sl_config, vocab_size: int) -> None:
    """``ExportError`` unless ``directory`` is a factored SL export loadable into this model (same
    shape, RMSNorm eps, RoPE base and SL rank/density/alpha/seed/targets; vocabulary not larger)."""
    d = Path(directory)
    if not (d / SL_META).is_file() or not (d / SL_WEIGHTS).is_file():
        raise ExportError(f"{d} is not a factored SL weight directory (needs {SL_META} and {SL_WEIGHTS})")
    doc = json.loads((d / SL_META).read_text())
    theirs = doc["preset"]
    diff = [f"{k}: weights {theirs[k]} vs model {getattr(preset, k)}" for k in SHAPE_FIELDS
            if theirs[k] != getattr(preset, k)]
    if doc["vocab_size"] > vocab_size:
        diff.append(f"vocab_size: weights {doc['vocab_size']} > model {vocab_size}")
    mine = None if sl_config is None else {"rank": sl_config.rank, "density": sl_config.density,
                                           "alpha": sl_config.alpha, "seed": sl_config.seed,
                                           "targets": list(sl_config.targets)}
    stored = None if doc["sl_config"] is None else {k: doc["sl_config"][k] for k in ("rank", "density", "alpha", "seed",
                                                                                    "targets")}
    if mine != stored:
        diff.append(f"SL settings: weights {stored} vs model {mine}")
    if diff:
        raise ExportError("the weights do not fit this model: " + "; ".join(diff))


def init_single_process(device: str = "cpu", seed: int = 0) -> None:
    """torch.distributed as a one-rank gloo group (unless initialised) + megatron parallel_state at TP=1."""
    import torch.distributed as dist

    from ..parallel.state import initialize_model_parallel

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    initialize_model_parallel(1, seed=seed)


def single_process_model(weights: GlobalWeights, variant: str, device: str = "cpu"):
    """The GPTModel at TP=1 holding ``weights`` (float32, eval mode) on ``device``."""
    from ..model import build_model

    init_single_process(device)
    model = build_model(weights.preset, variant=variant, sl_config=weights.sl_config, vocab_size=weights.vocab_size,
                        params_dtype=torch.float32)
    from ..model.hf import load_weights

    load_weights(model, weights)
    return model.to(device).eval()
