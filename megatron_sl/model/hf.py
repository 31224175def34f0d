"""Model weights in a layout-free form: gathered over TP, exported to / imported from Hugging Face LLaMA.

Owns ``GlobalWeights``: the whole model independent of any tensor-parallel layout, i.e.

* ``parts``: every SL matrix ("part": q, k, v, o, gate, up, down of each layer) as its global
  factors ``B`` [out × r], ``A`` [r × in], the sparse ``values`` sorted by their global flat
  row-major ``index`` (int64) and the scale s, so W = s·B·A + S exactly;
* ``dense``: every other parameter under its megatron name as one global tensor (embedding,
  output layer, norms, and the fused weight of any linear slot that is not SL, in megatron's
  global fused row order).

and the conversions around it:

* ``gather_weights``: from the per-TP-rank module state dicts of a checkpoint. Each rank's SL
  shard is re-created with ``parallel.shard.SLShard`` (row layouts from ``parallel.layout``, the
  same rule the layers use), its support metadata compared with the one the rank saved, and
  its values put at ``SLShard.global_flat_index()``; B / A are concatenated over the sharded
  dimension. No torch.distributed is needed.
* ``GlobalWeights.to_hf``: dense W per part with Hugging Face LLaMA names. Megatron's fused
  ``linear_qkv`` rows are per query group [q heads of the group; k; v], split by
  ``layout.qkv_layout``; gated ``linear_fc1`` rows are [gate; up]. RoPE needs no permutation:
  megatron (``rotary_interleaved=False``) and HF LLaMA both rotate halves of each head. The
  logits equality test (tests/model/test_hf.py) checks this numerically.
* ``GlobalWeights.to_sl_tensors`` / ``from_sl_tensors``: the factored form (``--sl`` export and
  ``import-hf`` output) as flat tensors with HF-style names (``...q_proj.B``, ``.A``,
  ``.values``, ``.index``) plus per-matrix metadata (name, seed, density, rank, scale), enough to
  continue SL training elsewhere or to check the support against ``(seed, name)``.
* ``from_hf_dense``: the SL initialisation of a dense LLaMA (beyond the paper): truncated SVD of
  W for B·A (B = U·√Σ / s, A = √Σ·Vᵀ so that s·B·A is the rank-r truncation), S on the fixed
  random support of ``(seed, name)`` holding the residual W − s·B·A at those entries.
* ``local_weights`` / ``load_weights``: a ``GlobalWeights`` sliced for (copied into) a built model
  at any TP rank (each SL shard takes its rows / columns and the values at its own support
  entries); resharding a checkpoint slices optimizer moments the same way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_sl.core import support as sup
from megatron_sl.core.config import SLConfig
from megatron_sl.parallel.layout import glu_layout, local_rows, qkv_layout, shard_rows, single_layout
from megatron_sl.parallel.naming import SLOT_PATHS
from megatron_sl.parallel.shard import SLShard

from .presets import LlamaPreset

# (slot, part) -> Hugging Face projection name
HF_PROJ = {("qkv", "q"): "self_attn.q_proj", ("qkv", "k"): "self_attn.k_proj", ("qkv", "v"): "self_attn.v_proj",
           ("proj", "o"): "self_attn.o_proj", ("fc1", "gate"): "mlp.gate_proj", ("fc1", "up"): "mlp.up_proj",
           ("fc2", "down"): "mlp.down_proj"}
COLUMN_SLOTS = ("qkv", "fc1")   # B, S and the fused rows sharded over TP
ROW_SLOTS = ("proj", "fc2")     # A, S sharded by input columns
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
NORMS = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm"}


class ExportError(ValueError):
    """A checkpoint or weight set cannot be converted; the message names the tensor or value."""


@dataclasses.dataclass
class FactoredPart:
    """One global SL matrix W = scale·B·A + S; ``values[i]`` sits at flat index ``index[i]`` (sorted)."""

    name: str
    B: torch.Tensor
    A: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    scale: float
    seed: int
    density: float

    @property
    def shape(self) -> Tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def to_dense(self, dtype=torch.float32) -> torch.Tensor:
        W = torch.mm(self.B.to(torch.float64), self.A.to(torch.float64)).mul_(self.scale)
        W.view(-1).index_add_(0, self.index, self.values.to(torch.float64))
        return W.to(dtype)


@dataclasses.dataclass
class GlobalWeights:
    """The model independent of TP (see the module docstring)."""

    preset: LlamaPreset
    vocab_size: int
    sl_config: Optional[SLConfig]
    parts: Dict[str, FactoredPart]
    dense: Dict[str, torch.Tensor]

    # -- naming -----------------------------------------------------------------------------
    def is_sl(self, slot: str) -> bool:
        return self.sl_config is not None and self.sl_config.is_sl(slot)

    def to_hf(self, dtype=torch.float32) -> Dict[str, torch.Tensor]:
        """Dense Hugging Face ``LlamaForCausalLM`` state dict."""
        p = self.preset
        out = {"model.embed_tokens.weight": self.dense[EMBEDDING], "lm_head.weight": self.dense[OUTPUT],
               "model.norm.weight": self.dense[FINAL_NORM]}
        for i in range(p.num_layers):
            pre = f"decoder.layers.{i}"
            for ours, theirs in NORMS.items():
                out[f"model.layers.{i}.{theirs}.weight"] = self.dense[f"{pre}.{ours}.weight"]
            for slot in SLOT_PATHS:
                layout = slot_layout(p, slot)
                if self.is_sl(slot):
                    for part, _ in layout.parts:
                        W = self.parts[f"{pre}.{SLOT_PATHS[slot]}.{part}"].to_dense(dtype)
                        out[f"model.layers.{i}.{HF_PROJ[slot, part]}.weight"] = W
                else:
                    fused = self.dense[f"{pre}.{SLOT_PATHS[slot]}.weight"]
                    for pid, (part, rows) in enumerate(layout.parts):
                        W = fused.new_empty(rows, fused.shape[1])
                        mask = layout.part_id == pid
                        W[layout.part_row[mask]] = fused[mask]
                        out[f"model.layers.{i}.{HF_PROJ[slot, part]}.weight"] = W
        return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}

    def to_sl_tensors(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
        """(tensors, metadata): the factored form with HF-style names; dense tensors as in ``to_hf``."""
        hf = self.to_hf()
        tensors, meta = {}, {}
        for key, t in hf.items():
            sl_name = _sl_name_of_hf(key)
            if sl_name is None or sl_name not in self.parts:
                tensors[key] = t
                continue
            fp = self.parts[sl_name]
            base = key[:-len(".weight")]
            tensors.update({f"{base}.B": fp.B.contiguous(), f"{base}.A": fp.A.contiguous(),
                            f"{base}.values": fp.values.contiguous(), f"{base}.index": fp.index.contiguous()})
            meta[base] = {"name": fp.name, "shape": list(fp.shape), "rank": int(fp.A.shape[0]), "scale": fp.scale,
                          "seed": fp.seed, "density": fp.density}
        return tensors, meta


def _sl_name_of_hf(key: str) -> Optional[str]:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if not m:
        return None
    for (slot, part), proj in HF_PROJ.items():
        if proj == m.group(2):
            return f"decoder.layers.{m.group(1)}.{SLOT_PATHS[slot]}.{part}"
    return None


def slot_layout(preset: LlamaPreset, slot: str):
    p = preset
    if slot == "qkv":
        return qkv_layout(p.num_attention_heads, p.num_query_groups, p.head_dim)
    if slot == "fc1":
        return glu_layout(p.ffn_hidden_size)
    if slot == "proj":
        return single_layout("o", p.hidden_size)
    return single_layout("down", p.hidden_size)


def slot_in_features(preset: LlamaPreset, slot: str) -> int:
    return {"qkv": preset.hidden_size, "fc1": preset.hidden_size, "proj": preset.num_attention_heads * preset.head_dim,
            "fc2": preset.ffn_hidden_size}[slot]


# megatron builds the gated fc1 with stride 2 (each rank holds [gate_local; up_local])
SLOT_STRIDE = {"qkv": 1, "fc1": 2, "proj": 1, "fc2": 1}


def shard_spec(preset: LlamaPreset, slot: str, tp: int, tp_rank: int) -> Dict[str, dict]:
    """{part: SLShard keyword (rows= or cols=)} of ``slot`` on ``tp_rank``, as the layers build them."""
    layout = slot_layout(preset, slot)
    if slot in COLUMN_SLOTS:
        local = local_rows(layout, tp, tp_rank, SLOT_STRIDE[slot])
        return {part: {"rows": rows} for (part, _), rows in zip(layout.parts, local.rows)}
    width = slot_in_features(preset, slot) // tp
    return {layout.parts[0][0]: {"cols": (tp_rank * width, (tp_rank + 1) * width)}}


# --------------------------------------------------------------------------------------------
# gather from per-rank module state dicts
# --------------------------------------------------------------------------------------------
def gather_weights(states: Sequence[Dict[str, torch.Tensor]], preset: LlamaPreset, sl_config: Optional[SLConfig],
                   saved_support: Optional[Sequence[dict]] = None) -> GlobalWeights:
    """``GlobalWeights`` from the module state dicts of TP ranks 0..tp-1 (in TP rank order).

    ``sl_config``: the effective one (None for the dense variant; density 0 for lowrank).
    ``saved_support``: per TP rank, the ``{module name: SL extra state}`` the checkpoint stored;
    each re-created shard must match it (same seed, density, shape, TP layout and index hash)."""
    tp = len(states)
    p = preset
    vocab = sum(int(s[EMBEDDING].shape[0]) for s in states)
    dense: Dict[str, torch.Tensor] = {}
    dense[EMBEDDING] = torch.cat([s[EMBEDDING] for s in states], 0).float()
    dense[OUTPUT] = torch.cat([s[OUTPUT] for s in states], 0).float()
    dense[FINAL_NORM] = states[0][FINAL_NORM].float()
    parts: Dict[str, FactoredPart] = {}
    for i in range(p.num_layers):
        pre = f"decoder.layers.{i}"
        for ours in NORMS:
            dense[f"{pre}.{ours}.weight"] = states[0][f"{pre}.{ours}.weight"].float()
        for slot, path in SLOT_PATHS.items():
            layer = f"{pre}.{path}"
            out_f, in_f = slot_layout(p, slot).out_features, slot_in_features(p, slot)
            if sl_config is None or not sl_config.is_sl(slot):
                key = f"{layer}.weight"
                if slot in COLUMN_SLOTS:
                    W = torch.empty(out_f, in_f)
                    for t, s in enumerate(states):
                        W[shard_rows(out_f, tp, t, SLOT_STRIDE[slot])] = s[key].float()
                else:
                    W = torch.cat([s[key].float() for s in states], 1)
                dense[key] = W
                continue
            layout = slot_layout(p, slot)
            for pid, (part, rows_total) in enumerate(layout.parts):
                name = f"{layer}.{part}"
                shape = (rows_total, in_f)
                idx, vals = [], []
                B = torch.empty(shape[0], sl_config.rank)
                A = torch.empty(sl_config.rank, shape[1])
                for t, s in enumerate(states):
                    kw = shard_spec(p, slot, tp, t)[part]
                    shard = SLShard(name, shape[0], shape[1], sl_config, **kw)
                    if saved_support is not None:
                        want = saved_support[t].get(f"{layer}.parts.{part}")
                        if want is not None and want != shard.get_extra_state():
                            raise ExportError(f"SL matrix {name!r} on TP rank {t}: the support re-created from "
                                              f"(seed, name) differs from the checkpoint's ({want} vs "
                                              f"{shard.get_extra_state()})")
                    key = f"{layer}.parts.{part}"
                    b, a, v = s[f"{key}.B"].float(), s[f"{key}.A"].float(), s[f"{key}.values"].float()
                    if v.numel() != shard.nnz:
                        raise ExportError(f"{key}.values on TP rank {t} has {v.numel()} entries, the support has "
                                          f"{shard.nnz}")
                    if "rows" in kw:
                        B[kw["rows"]] = b
                        A = a
                    else:
                        c0, c1 = kw["cols"]
                        A[:, c0:c1] = a
                        B = b
                    idx.append(shard.global_flat_index())
                    vals.append(v)
                index = torch.cat(idx)
                order = torch.argsort(index)
                parts[name] = FactoredPart(name, B.clone(), A.clone(), torch.cat(vals)[order], index[order],
                                           sl_config.scale, sl_config.seed, sl_config.density)
    return GlobalWeights(p, vocab, sl_config, parts, dense)


# --------------------------------------------------------------------------------------------
# load into a built model (any TP rank)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def local_weights(model: torch.nn.Module, weights: GlobalWeights) -> Dict[str, torch.Tensor]:
    """``{parameter name: this rank's slice of weights}`` for every parameter of ``model`` (a
    ``build_model`` GPTModel at any TP size): each SL shard takes its rows / columns and the values
    at its own support entries (re-created from (seed, name) and checked against ``weights``);
    dense tensors their TP slice. Also used for tensors shaped like the weights (optimizer moments)."""
    out: Dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, SLShard):
            fp = weights.parts.get(mod.name)
            if fp is None:
                raise ExportError(f"no weights for SL matrix {mod.name!r}")
            if tuple(fp.shape) != tuple(mod.global_shape) or fp.A.shape[0] != mod.rank:
                raise ExportError(f"SL matrix {mod.name!r}: weights have shape {tuple(fp.shape)} rank "
                                  f"{fp.A.shape[0]}, the model {mod.global_shape} rank {mod.rank}")
            gidx = mod.global_flat_index()
            pos = torch.searchsorted(fp.index, gidx).clamp_(max=max(fp.index.numel() - 1, 0))
            if gidx.numel() and not torch.equal(fp.index[pos], gidx):
                raise ExportError(f"SL matrix {mod.name!r}: the weights' support differs from the model's "
                                  f"(another seed or density)")
            if mod.rows is not None:
                B, A = fp.B[mod.rows], fp.A
            else:
                c0, c1 = mod.cols
                B, A = fp.B, fp.A[:, c0:c1]
            out.update({f"{mname}.B": B, f"{mname}.A": A, f"{mname}.values": fp.values[pos]})
    for name, param in model.named_parameters():
        if name in out:
            continue
        full = weights.dense.get(name)
        if full is None:
            raise ExportError(f"no weights for parameter {name!r}")
        out[name] = _local_slice(model, name, param, full)
    return out


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: GlobalWeights) -> None:
    """Copy ``weights`` into ``model`` (a ``build_model`` GPTModel at any TP size, this process's rank)."""
    local = local_weights(model, weights)
    for name, param in model.named_parameters():
        param.copy_(local[name])


def _local_slice(model, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    if tuple(param.shape) == tuple(full.shape):
        return full
    import torch.distributed as dist

    tp, t = 1, 0
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            tp, t = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    m = re.fullmatch(r"decoder\.layers\.\d+\.(.+)\.weight", name)
    slot = next((s for s, path in SLOT_PATHS.items() if m and m.group(1) == path), None)
    if slot in COLUMN_SLOTS:
        return full[shard_rows(full.shape[0], tp, t, SLOT_STRIDE[slot])]
    if slot in ROW_SLOTS:
        w = full.shape[1] // tp
        return full[:, t * w:(t + 1) * w]
    if name in (EMBEDDING, OUTPUT):
        rows = param.shape[0]
        if full.shape[0] < rows * tp:  # a smaller (unpadded) vocabulary: the padding rows are zero
            full = torch.cat([full, full.new_zeros(rows * tp - full.shape[0], full.shape[1])])
        return full[t * rows:(t + 1) * rows]
    raise ExportError(f"parameter {name!r}: shape {tuple(param.shape)} vs weights {tuple(full.shape)}")


# --------------------------------------------------------------------------------------------
# Hugging Face config and the reverse conversions
# --------------------------------------------------------------------------------------------
def hf_config_dict(preset: LlamaPreset, vocab_size: int, bos_id: Optional[int] = 1, eos_id: Optional[int] = 2,
                   dtype: str = "float32") -> dict:
    """``LlamaConfig`` fields of ``preset`` (untied embeddings, no biases, megatron's padded vocab)."""
    p = preset
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p.hidden_size,
            "intermediate_size": p.ffn_hidden_size, "num_attention_heads": p.num_attention_heads,
            "num_key_value_heads": p.num_query_groups, "head_dim": p.head_dim, "num_hidden_layers": p.num_layers,
            "vocab_size": vocab_size, "max_position_embeddings": p.seq_length, "rms_norm_eps": p.norm_eps,
            "rope_theta": p.rope_base, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "initializer_range": p.init_std, "bos_token_id": bos_id,
            "eos_token_id": eos_id, "torch_dtype": dtype, "use_cache": True}


def preset_from_hf_config(cfg: dict, name: str = "hf", rank: int = 8, density: float = 0.03,
                          alpha: float = 16.0) -> LlamaPreset:
    """The ``LlamaPreset`` of a Hugging Face LLaMA ``config.json`` (dict), refusing what we cannot build."""
    if cfg.get("model_type") != "llama":
        raise ExportError(f"config.json model_type={cfg.get('model_type')!r}: only 'llama' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ExportError(f"config.json {key}=true: biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"config.json hidden_act={cfg.get('hidden_act')!r}: only 'silu' is supported")
    if cfg.get("rope_scaling"):
        raise ExportError(f"config.json rope_scaling={cfg['rope_scaling']!r}: RoPE scaling is not supported")
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise ExportError(f"config.json head_dim={head_dim} x heads {heads} != hidden_size {cfg['hidden_size']}")
    return LlamaPreset(name, int(cfg["hidden_size"]), int(cfg["intermediate_size"]), heads,
                       int(cfg.get("num_key_value_heads") or heads), int(cfg["num_hidden_layers"]),
                       int(cfg["vocab_size"]), int(cfg.get("max_position_embeddings", 2048)), rank, density, alpha,
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_base=float(cfg.get("rope_theta", 10000.0)),
                       init_std=float(cfg.get("initializer_range", 0.02)))


def _fuse(preset: LlamaPreset, slot: str, mats: Dict[str, torch.Tensor]) -> torch.Tensor:
    layout = slot_layout(preset, slot)
    first = next(iter(mats.values()))
    fused = first.new_empty(layout.out_features, first.shape[1])
    for pid, (part, _) in enumerate(layout.parts):
        mask = layout.part_id == pid
        fused[mask] = mats[part][layout.part_row[mask]]
    return fused


@torch.no_grad()
def from_hf_dense(hf: Dict[str, torch.Tensor], preset: LlamaPreset, sl_config: Optional[SLConfig]
                  ) -> Tuple[GlobalWeights, List[dict]]:
    """SL weights initialised from a dense HF LLaMA state dict (truncated SVD + residual on the support).

    Returns the weights and one record per SL matrix: name, relative Frobenius errors of the
    low-rank part alone and of s·B·A + S (``||W - W_sl|| / ||W||``)."""
    p = preset
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for key in need:
        if key not in hf:
            raise ExportError(f"HF weights have no {key!r}")
    dense = {EMBEDDING: hf["model.embed_tokens.weight"].float(), FINAL_NORM: hf["model.norm.weight"].float(),
             OUTPUT: hf.get("lm_head.weight", hf["model.embed_tokens.weight"]).float()}
    parts, report = {}, []
    for i in range(p.num_layers):
        pre = f"decoder.layers.{i}"
        for ours, theirs in NORMS.items():
            dense[f"{pre}.{ours}.weight"] = hf[f"model.layers.{i}.{theirs}.weight"].float()
        for slot, path in SLOT_PATHS.items():
            layout = slot_layout(p, slot)
            mats = {}
            for part, _ in layout.parts:
                key = f"model.layers.{i}.{HF_PROJ[slot, part]}.weight"
                if key not in hf:
                    raise ExportError(f"HF weights have no {key!r}")
                mats[part] = hf[key].float()
            if sl_config is None or not sl_config.is_sl(slot):
                dense[f"{pre}.{path}.weight"] = _fuse(p, slot, mats)
                continue
            for part, W in mats.items():
                name = f"{pre}.{path}.{part}"
                fp, rec = _factorise(name, W, sl_config)
                parts[name] = fp
                report.append(rec)
    return GlobalWeights(p, int(dense[EMBEDDING].shape[0]), sl_config, parts, dense), report


def _factorise(name: str, W: torch.Tensor, cfg: SLConfig) -> Tuple[FactoredPart, dict]:
    out_f, in_f = W.shape
    r, s = cfg.rank, cfg.scale
    W64 = W.double()
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    root = S[:r].sqrt()
    B = U[:, :r] * root / s
    A = root[:, None] * Vh[:r]
    low = s * (B @ A)
    sample = sup.sample_support(out_f, in_f, cfg.density, cfg.seed, name)
    index = sample.idx.to(torch.int64)
    order = torch.argsort(index)
    index = index[order]
    values = (W64 - low).reshape(-1)[index]
    fp = FactoredPart(name, B.float(), A.float(), values.float(), index, s, cfg.seed, cfg.density)
    norm = W64.norm().clamp_min(1e-30)
    rec = {"name": name, "shape": [out_f, in_f], "rank": r, "nnz": int(index.numel()),
           "lowrank_rel_error": float((W64 - low).norm() / norm),
           "sl_rel_error": float((W64 - fp.to_dense(torch.float64)).norm() / norm)}
    return fp, rec


def from_sl_tensors(tensors: Dict[str, torch.Tensor], meta: Dict[str, dict], preset: LlamaPreset,
                    sl_config: Optional[SLConfig]) -> GlobalWeights:
    """Inverse of ``GlobalWeights.to_sl_tensors``."""
    hf_dense, parts = {}, {}
    for key, t in tensors.items():
        base = key.rpartition(".")[0]
        if base in meta:
            continue
        hf_dense[key] = t
    for base, m in meta.items():
        parts[m["name"]] = FactoredPart(m["name"], tensors[f"{base}.B"], tensors[f"{base}.A"],
                                        tensors[f"{base}.values"], tensors[f"{base}.index"].to(torch.int64),
                                        float(m["scale"]), int(m["seed"]), float(m["density"]))
    p = preset
    dense = {EMBEDDING: hf_dense["model.embed_tokens.weight"].float(), OUTPUT: hf_dense["lm_head.weight"].float(),
             FINAL_NORM: hf_dense["model.norm.weight"].float()}
    for i in range(p.num_layers):
        pre = f"decoder.layers.{i}"
        for ours, theirs in NORMS.items():
            dense[f"{pre}.{ours}.weight"] = hf_dense[f"model.layers.{i}.{theirs}.weight"].float()
        for slot, path in SLOT_PATHS.items():
            if sl_config is not None and sl_config.is_sl(slot):
                continue
            mats = {part: hf_dense[f"model.layers.{i}.{HF_PROJ[slot, part]}.weight"].float()
                    for part, _ in slot_layout(p, slot).parts}
            dense[f"{pre}.{path}.weight"] = _fuse(p, slot, mats)
    return GlobalWeights(p, int(dense[EMBEDDING].shape[0]), sl_config, parts, dense)
