"""The memory planner: per-rank memory of a training config, computed analytically from the config
alone (no ranks, no data, no model built), for ``megatron-sl plan`` and ``megatron-sl train --dry-run``.

What one rank holds, by component (bytes):

* **parameters**: the rank's local tensors (TP shards of B / S values / vocab rows; replicated A of
  column-parallel and B of row-parallel SL layers, norms), in the parameter dtype (bf16 runs: bf16
  weights; fp32 runs: fp32). ZeRO-3 partitions them over DP (plus one gathered layer).
* **gradients**: in the parameter dtype. Held in full until the step at ZeRO-0; at ZeRO-1/2
  DeepSpeed copies each reduced gradient into the rank's partition buffer (plus its reduce bucket
  during backward and a flat fp32 copy of the partition at the step); with per-layer updates and no
  clipping only the tensor being stepped, with clipping all of them at the accumulation boundary.
* **master weights**: fp32 copies DeepSpeed keeps of the rank's partition (ZeRO-1/2/3, any precision)
  or of every parameter (ZeRO-0 bf16); none with per-layer updates (pure bf16 / pure fp32).
* **optimizer states**: AdamW 8 B per element (fp32 moments; 4 B for moments of pure-bf16 parameters),
  8-bit AdamW 2 B + 8 B per 256-element block (absmax) + 2 KiB of quantisation maps per tensor; a
  tensor smaller than ``optim.min_8bit_size`` keeps fp32 moments. Under ZeRO the "tensor" is the
  flat partition of one parameter group.
* **index**: the SL supports, ``index_bytes(nnz)`` (4 bytes per nonzero: the int32 canonical index).
* **activations**: what autograd saves for backward in one micro-batch of megatron's local LLaMA
  layer (RMSNorm saves its input and normalised input in fp32 and 1/rms; each linear saves its input,
  an SL linear nothing else, or under ``sl.save_xa`` x·Aᵀ ([T, r]) per factored part; RoPE'd Q and
  GQA-expanded K, V; the fp32 softmax probabilities of the local ``DotProductAttention``,
  b·heads/TP·s² elements, plus their 16-bit copy in bf16 runs; SwiGLU 4·T·ffn/TP; the final norm
  and output layer input; the vocab-parallel cross entropy's fp32 softmax, T·vocab/TP), divided by
  TP where megatron shards them, sequence-sharded under SP, and reduced by recompute: ``selective``
  keeps Q, K, V and drops the probabilities, ``full`` keeps each layer's input only and recomputes
  one layer at a time in backward.
* **buffers**: megatron's global attention-score buffer (b·heads/TP·s²), DeepSpeed's gradient
  reduce bucket (ZeRO-1/2: ``reduce_bucket_size`` elements, from the first backward of an
  accumulation window to its step).
* **temporaries**: the largest transient of a phase: the logits and the cross entropy's gradient,
  one SL layer's weight and weight gradient in backward (dense path), activation gradients, one
  recomputed layer, DeepSpeed's flat gradient copy for the all-reduce (ZeRO-0), the optimizer
  step's scratch (torch AdamW: sqrt(v) and the denominator, 2 x the stepped tensor; bitsandbytes:
  nothing torch-allocated -- on CPU its kernels use ~20 B per element outside torch's allocator,
  reported separately as ``host_scratch``), the global norm's float64 chunk.

The peak is the largest of four phases, simulated in order: set-up (the fp32 build, DeepSpeed's
flattening), forward of the window's last micro-batch (states + held gradients + saved activations
+ buffers), its backward (activations released layer by layer while gradients appear), the
optimizer step (states + gradients + step scratch). Figures are torch-allocated bytes, what
``torch.cuda.max_memory_allocated`` reports; ``benchmarks/bench_memory.py`` checks them against the
live-tensor peaks of real training runs on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from ..core.cost_model import choose_path
from ..core.support import nnz_for
from ..parallel.variants import variant_sl_config
from .config import TrainConfig
from .config_checks import Plan
from .grads import NORM_CHUNK

GiB = 2**30
GB = 1e9

# bitsandbytes 8-bit blockwise Adam: uint8 codes for both moments, one fp32 absmax per 256-element
# block per moment, two 256-entry fp32 quantisation maps per tensor.
BNB_BLOCK = 256
BNB_QMAP_BYTES = 2 * 256 * 4
COMPONENTS = ("parameters", "gradients", "master", "optimizer", "index", "activations", "buffers", "temporaries")


def index_bytes(nnz: int) -> float:
    """Resident bytes of the SL support index for ``nnz`` nonzeros: the int32 canonical index only."""
    return 4.0 * nnz


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One local parameter tensor of a rank: name, elements, transformer layer (-1: embedding,
    L: final norm / output layer), kind, and for SL parts the local (out, in) shape."""

    name: str
    numel: int
    layer: int
    kind: str
    tp_sharded: bool
    shape: tuple = ()


def _share(total: int, tp: int, rank: int) -> int:
    return total * (rank + 1) // tp - total * rank // tp


def local_tensors(preset, variant: str, sl_config, vocab: int, tp: int, tp_rank: int) -> List[Tensor]:
    """The parameter tensors of TP rank ``tp_rank`` as ``build_model`` creates them.

    SL sparse values per shard are the expected share of the matrix's nnz (the support is random)."""
    from ..model.param_count import slot_matrices

    sl_config = None if sl_config is None else variant_sl_config(sl_config, variant)
    d, L = preset.hidden_size, preset.num_layers
    out: List[Tensor] = [Tensor("embedding", vocab // tp * d, -1, "embedding", True)]
    column = {"qkv": True, "fc1": True, "proj": False, "fc2": False}
    for layer in range(L):
        out.append(Tensor(f"layers.{layer}.input_layernorm", d, layer, "norm", False))
        out.append(Tensor(f"layers.{layer}.pre_mlp_layernorm", d, layer, "norm", False))
        for slot, mats in slot_matrices(preset).items():
            sl = sl_config is not None and sl_config.is_sl(slot)
            for part, m, n in mats:
                name = f"layers.{layer}.{slot}.{part}"
                if not sl:
                    out.append(Tensor(name, m * n // tp, layer, "dense", True, (m // tp, n) if column[slot]
                                      else (m, n // tp)))
                    continue
                r = sl_config.rank
                nnz = _share(nnz_for(m, n, sl_config.density), tp, tp_rank)
                if column[slot]:
                    ml, nl = m // tp, n
                    out += [Tensor(name + ".B", ml * r, layer, "B", True),
                            Tensor(name + ".A", r * n, layer, "A", False)]
                else:
                    ml, nl = m, n // tp
                    out += [Tensor(name + ".A", r * nl, layer, "A", True),
                            Tensor(name + ".B", m * r, layer, "B", False)]
                out.append(Tensor(name + ".values", nnz, layer, "values", True, (ml, nl)))
    out.append(Tensor("final_layernorm", d, L, "norm", False))
    out.append(Tensor("output_layer", vocab // tp * d, L, "output", True))
    return out


@dataclasses.dataclass
class Setting:
    """Everything the model below needs, resolved from (cfg, plan) or given directly (paper setting)."""

    preset: object
    variant: str
    sl_config: object
    vocab: int
    seq: int
    micro: int
    grad_accum: int
    tp: int
    dp: int
    sequence_parallel: bool
    recompute: str
    precision: str
    optimizer: str
    zero_stage: int
    per_layer: bool
    clip_grad: float
    min_8bit_size: int
    device: str
    reduce_bucket: int = 50_000_000
    allreduce_bucket: int = 500_000_000

    @property
    def param_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def setting_from_config(cfg: TrainConfig, plan: Plan, device: Optional[str] = None) -> Setting:
    ds = {}
    if plan.ds_template is not None:
        from .ds_config import render_ds_config

        ds = render_ds_config(cfg, plan).get("zero_optimization", {})
    dev = device or (cfg.launch.device if cfg.launch.device != "auto" else "cuda")
    return Setting(preset=plan.preset, variant=cfg.model.variant, sl_config=plan.sl_config, vocab=plan.vocab_size,
                   seq=plan.seq_length, micro=plan.micro_batch_size, grad_accum=plan.grad_accum, tp=plan.tp,
                   dp=plan.dp, sequence_parallel=cfg.parallel.sequence_parallel,
                   recompute=cfg.model.recompute, precision=cfg.train.precision,
                   optimizer=cfg.optim.name, zero_stage=0 if cfg.optim.per_layer else cfg.deepspeed.zero_stage,
                   per_layer=cfg.optim.per_layer, clip_grad=cfg.optim.clip_grad,
                   min_8bit_size=cfg.optim.min_8bit_size, device=dev,
                   reduce_bucket=int(ds.get("reduce_bucket_size", 50_000_000)),
                   allreduce_bucket=int(ds.get("allreduce_bucket_size", 500_000_000)))


# ----------------------------------------------------------------------------- optimizer states

def state_bytes_of(numel: int, optimizer: str, min_8bit: int, moment_bytes: int = 4) -> float:
    """Optimizer-state bytes of one tensor (or one ZeRO flat partition) of ``numel`` elements."""
    if numel == 0:
        return 0.0
    if optimizer == "adamw8bit" and numel >= min_8bit:
        blocks = -(-numel // BNB_BLOCK)
        return 2.0 * numel + 2 * 4.0 * blocks + BNB_QMAP_BYTES
    return 2.0 * moment_bytes * numel


def _groups(tensors: List[Tensor]) -> Dict[str, int]:
    """Elements per optimizer parameter group (TP-sharded / TP-replicated, see ``optim.param_groups``)."""
    g = {"tp_sharded": 0, "tp_replicated": 0}
    for t in tensors:
        g["tp_sharded" if t.tp_sharded else "tp_replicated"] += t.numel
    return {k: v for k, v in g.items() if v}


def _partition(numel: int, dp: int) -> int:
    return -(-numel // dp)


# ----------------------------------------------------------------------------- activations

def activation_model(s: Setting, tensors: List[Tensor]) -> dict:
    """Saved activations per transformer layer and outside the layers, plus buffers, in bytes (one
    micro-batch); ``tensors`` are the rank's ``local_tensors``."""
    p = s.preset
    h, f, heads, groups, hn = p.hidden_size, p.ffn_hidden_size, p.num_attention_heads, p.num_query_groups, p.head_dim
    T, b, seq, tp = s.seq * s.micro, s.micro, s.seq, s.tp
    ab = s.param_bytes  # activations are in the parameter dtype
    sp = tp if s.sequence_parallel else 1   # tokens per rank are T/sp where megatron shards the sequence
    norm = (2 * T * h / sp) * 4 + (T / sp) * 4         # fp32 input and normalised input, 1/rms (any dtype)
    q = T * heads * hn / tp
    kv_expanded = 2 * T * heads * hn / tp
    probs = b * heads / tp * seq * seq
    attn_inputs = (T * h / sp) + (T * h / sp) + (T * heads * hn / tp)        # qkv in, fc1 in, proj in (elements)
    mlp = 4 * T * f / tp + T * f / tp                                           # SwiGLU + fc2 input
    rope = 4 * seq * hn * 4
    # softmax runs in fp32 and saves its fp32 output; a 16-bit model keeps the cast copy for the bmm too
    probs_bytes = probs * (4 + (ab if ab != 4 else 0))
    full_layer = 2 * norm + (attn_inputs + q + kv_expanded + mlp) * ab + probs_bytes + rope + saved_xa_bytes(s, tensors)
    layer_input = T * h / sp * ab
    if s.recompute == "full":
        per_layer = layer_input
    elif s.recompute == "selective":  # core attention recomputed: keep its inputs q, k, v (unexpanded)
        per_layer = full_layer - (q + kv_expanded) * ab - probs_bytes + (q + 2 * T * groups * hn / tp) * ab
    else:
        per_layer = full_layer
    V = s.vocab // tp
    # final norm, output-layer input, the cross entropy's fp32 softmax, its target mask and index
    final = norm + (T * h / sp) * ab + T * V * 4 + T * 9 + T * 8
    return {"per_layer": per_layer, "full_layer": full_layer, "final": final, "embedding": T * 8,
            "score_buffer": probs * ab, "logits": T * V * ab}


def _sl_part_paths(s: Setting, tensors: List[Tensor]) -> List[str]:
    """The path (as ``cost_model`` picks it for a micro-batch) of every SL part in ``tensors``."""
    T, paths = s.seq * s.micro, []
    for t in tensors:
        if t.kind == "values" and t.shape:
            m, n = t.shape
            path = s.sl_config.path if s.sl_config is not None else "auto"
            if path == "auto":
                path = choose_path(T, m, n, s.sl_config.rank, t.numel, "cuda" if s.device == "cuda" else "cpu")
            paths.append(path)
    return paths


def saved_xa_bytes(s: Setting, tensors: List[Tensor]) -> float:
    """x·Aᵀ ([T, r], every token also under sequence parallel) that one layer's factored SL parts keep
    for backward under ``sl.save_xa`` (layer 0 of the rank's ``tensors``; every layer has the same)."""
    if s.sl_config is None or not s.sl_config.save_xa:
        return 0.0
    one_layer = [t for t in tensors if t.layer == 0]
    n_factored = sum(p == "factored" for p in _sl_part_paths(s, one_layer))
    return n_factored * s.seq * s.micro * s.sl_config.rank * s.param_bytes


def sl_backward_temporary(s: Setting, tensors: List[Tensor]) -> float:
    """Largest transient of one SL linear's backward on this rank: the dense path re-forms W and the
    dense weight gradient (2·out·in), the factored path x·Aᵀ (T·r); the path as ``cost_model`` picks it."""
    T = s.seq * s.micro
    pb, worst = s.param_bytes, 0.0
    values = [t for t in tensors if t.kind == "values" and t.shape]
    for t, path in zip(values, _sl_part_paths(s, values)):
        m, n = t.shape
        worst = max(worst, (2 * m * n if path == "dense" else T * s.sl_config.rank) * pb)
    return worst


# ----------------------------------------------------------------------------- engine

def step_scratch(s: Setting, numel: int) -> float:
    """torch-allocated scratch of one optimizer step over a tensor of ``numel`` elements.

    torch's single-tensor AdamW (CPU, and every DeepSpeed flat partition) holds sqrt(v) and the
    denominator at once: 2 x the parameter dtype per element; its CUDA foreach path the same over a
    whole group. bitsandbytes works in place from torch's point of view (CUDA: fused kernels; CPU: its
    C kernels allocate outside torch's allocator, see ``cpu_host_scratch``)."""
    if s.optimizer == "adamw8bit":
        return 0.0
    return 2.0 * numel * (4 if not s.per_layer else s.param_bytes)


def norm_scratch(numel: int) -> float:
    """The global-norm computation's float64 copy and square of one chunk (``grads.squared_sum``)."""
    return 16.0 * min(numel, NORM_CHUNK)


def cpu_host_scratch(s: Setting, stepped: int) -> float:
    """bitsandbytes' CPU step dequantises both moments of the tensor being stepped to fp32 outside
    torch's allocator (~20 B per element, RSS only; none on CUDA)."""
    return 20.0 * stepped if (s.optimizer == "adamw8bit" and s.device != "cuda") else 0.0


def engine_model(s: Setting, tensors: List[Tensor]) -> dict:
    """Persistent model states and the engine's gradient buffers (bytes) for one rank."""
    P = sum(t.numel for t in tensors)
    pb, dp, stage = s.param_bytes, s.dp, s.zero_stage
    largest = max(t.numel for t in tensors)
    parts = [_partition(n, dp) for n in _groups(tensors).values()]
    deepspeed = not s.per_layer
    if stage == 3:
        params = sum(parts) * pb + largest * pb   # partitioned, plus one gathered tensor at a time
    else:
        params = P * pb
    if not deepspeed:
        master = 0.0   # per-layer: pure fp32 or pure bf16 parameters, the optimizer steps them directly
        moment = 4 if s.precision == "fp32" else 2
        states = sum(state_bytes_of(t.numel, s.optimizer, s.min_8bit_size, moment) for t in tensors)
        stepped = largest
    elif stage == 0:
        master = 4.0 * P if s.precision == "bf16" else 0.0
        states = sum(state_bytes_of(t.numel, s.optimizer, s.min_8bit_size) for t in tensors)
        # torch AdamW steps tensor by tensor on CPU, a whole group at once (foreach) on CUDA
        stepped = max(_groups(tensors).values()) if s.device == "cuda" else largest
    else:  # ZeRO-1/2/3: one fp32 flat partition per parameter group
        master = 4.0 * sum(parts)
        states = sum(state_bytes_of(n, s.optimizer, s.min_8bit_size) for n in parts)
        stepped = max(parts)
    nnz = sum(t.numel for t in tensors if t.kind == "values")
    bucket = 0.0
    if deepspeed and stage in (1, 2):  # ZeRO-1 stages an fp32 accumulator, ZeRO-2 the gradient dtype
        bucket = s.reduce_bucket * (4 if s.precision == "fp32" or stage == 1 else pb)
    return {"P": P, "largest": largest, "stepped": stepped, "parameters": params, "master": master,
            "optimizer": states, "index": index_bytes(nnz), "scratch": step_scratch(s, stepped),
            "host_scratch": cpu_host_scratch(s, stepped), "bucket": bucket,
            "grad_full": P * pb, "grad_partition": sum(parts) * pb if deepspeed and stage >= 1 else 0.0,
            "step_grad": 4.0 * max(parts) if deepspeed and stage >= 1 else 0.0}


@dataclasses.dataclass
class RankPlan:
    rank: int
    tp_rank: int
    dp_rank: int
    params: int
    low_rank: int
    sparse: int
    dense: int
    components: Dict[str, float]      # at the peak phase
    phases: Dict[str, float]          # peak bytes per phase
    peak_phase: str
    model_state: float                # parameters + gradients + master + optimizer + index
    host_scratch: float = 0.0         # CPU only: bitsandbytes' scratch outside torch's allocator

    @property
    def peak(self) -> float:
        return self.phases[self.peak_phase]


def _phase(components: Dict[str, float]) -> Dict[str, float]:
    return {k: float(components.get(k, 0.0)) for k in COMPONENTS}


def rank_plan(s: Setting, tp_rank: int, rank: int = 0, dp_rank: int = 0) -> RankPlan:
    """Simulate one rank through set-up, the forward, backward and optimizer step of a full window."""
    tensors = local_tensors(s.preset, s.variant, s.sl_config, s.vocab, s.tp, tp_rank)
    e = engine_model(s, tensors)
    a = activation_model(s, tensors)
    L, pb, ab = s.preset.num_layers, s.param_bytes, s.param_bytes
    T, h, f, tp = s.seq * s.micro, s.preset.hidden_size, s.preset.ffn_hidden_size, s.tp
    deepspeed, stage = not s.per_layer, s.zero_stage
    states = {"parameters": e["parameters"], "master": e["master"], "optimizer": e["optimizer"], "index": e["index"]}
    phases: Dict[str, Dict[str, float]] = {}

    # set-up: the model is built in fp32 (megatron's CPU init forms each dense master weight once more);
    # DeepSpeed ZeRO-1/2 then copies the parameters into flat buffers (both alive during the copy)
    build = e["P"] * (pb if s.per_layer else 4) + 2 * e["largest"] * 4   # per-layer bf16 is built in bf16
    flatten = 2 * e["P"] * pb + e["master"] if deepspeed and stage in (1, 2) else 0.0
    phases["setup"] = _phase({"parameters": max(build, flatten), "index": e["index"]})

    acts_all = L * a["per_layer"] + a["final"] + a["embedding"]
    ga = s.grad_accum
    # gradients held while a later micro-batch of the window runs its forward
    if deepspeed and stage >= 1:
        held_window = e["grad_partition"] + (e["bucket"] if ga > 1 else 0.0)
    else:
        held_window = e["grad_full"] if ga > 1 else 0.0
    buffers = a["score_buffer"]
    ce_copy = a["logits"] * 4 / ab if ab != 4 else 0.0   # the cross entropy's fp32 copy of 16-bit logits
    phases["forward"] = _phase({**states, "gradients": held_window, "activations": acts_all, "buffers": buffers,
                                "temporaries": a["logits"] + ce_copy})

    # backward (boundary micro-batch), simulated: output layer, layers L-1 .. 0, embedding
    by_layer: Dict[int, List[Tensor]] = {}
    for t in tensors:
        by_layer.setdefault(t.layer, []).append(t)
    order = [L] + list(range(L - 1, -1, -1)) + [-1]
    sl_temp = sl_backward_temporary(s, tensors)
    act_grad_temp = (2 * T * h + 3 * T * f / tp) * ab
    recompute_temp = {"full": a["full_layer"], "selective": a["full_layer"] - a["per_layer"]}.get(s.recompute, 0.0)
    bucket = e["bucket"] if deepspeed and stage in (1, 2) else 0.0
    remaining = acts_all
    produced = e["grad_full"] if ga > 1 and not (deepspeed and stage >= 1) else 0.0
    worst = None
    for layer in order:
        layer_tensors = by_layer.get(layer, [])
        new_grads = sum(t.numel for t in layer_tensors) * pb
        if layer == L:
            temp = a["logits"] * (4 / ab) + T * h * ab                 # CE gradient + output-layer input gradient
            remaining_after = remaining - a["final"]
        elif layer == -1:
            temp = T * h * ab
            remaining_after = 0.0
        else:
            temp = act_grad_temp + sl_temp + recompute_temp
            remaining_after = remaining - a["per_layer"]
        if deepspeed and stage >= 1:
            grads = e["grad_partition"] + bucket + new_grads    # this layer's grads until copied into the bucket
        elif s.per_layer and s.clip_grad <= 0:
            big = max((t.numel for t in layer_tensors), default=0)
            grads = (e["grad_full"] if ga > 1 else 0.0) + big * pb   # stepped and freed as each one is final
            temp += step_scratch(s, big) + norm_scratch(big)
        else:
            grads = (produced if ga == 1 else e["grad_full"]) + new_grads
        produced += new_grads
        point = _phase({**states, "gradients": grads, "activations": remaining, "buffers": buffers,
                        "temporaries": temp})
        if worst is None or sum(point.values()) > sum(worst.values()):
            worst = point
        remaining = remaining_after
    if deepspeed and stage == 0:   # DeepSpeed's flat copy of the gradients for the DP all-reduce (even DP=1)
        point = _phase({**states, "gradients": e["grad_full"], "buffers": buffers,
                        "temporaries": min(e["P"], s.allreduce_bucket) * pb})
        if sum(point.values()) > sum(worst.values()):
            worst = point
    phases["backward"] = worst

    # optimizer step at the boundary
    if deepspeed and stage >= 1:
        step_grads = e["grad_partition"] + e["step_grad"]      # partition + its flat fp32 copy for the step
    elif s.per_layer and s.clip_grad <= 0:
        step_grads = 0.0                                       # already stepped inside backward
    else:
        step_grads = e["grad_full"]
    step_temp = 0.0 if (s.per_layer and s.clip_grad <= 0) else e["scratch"]
    if s.per_layer or stage == 0:   # our global norm (DeepSpeed computes its own at ZeRO-1/2/3)
        step_temp = max(step_temp, norm_scratch(e["largest"]))
    phases["step"] = _phase({**states, "gradients": step_grads, "buffers": buffers, "temporaries": step_temp})

    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    low = sum(t.numel for t in tensors if t.kind in ("A", "B"))
    sparse = sum(t.numel for t in tensors if t.kind == "values")
    P = e["P"]
    grads_resident = e["grad_partition"] if deepspeed and stage >= 1 else e["grad_full"]
    model_state = e["parameters"] + grads_resident + e["master"] + e["optimizer"] + e["index"]
    return RankPlan(rank=rank, tp_rank=tp_rank, dp_rank=dp_rank, params=P, low_rank=low, sparse=sparse,
                    dense=P - low - sparse, components=phases[peak_phase], phases=totals, peak_phase=peak_phase,
                    model_state=model_state, host_scratch=e["host_scratch"])


def plan_ranks(cfg: TrainConfig, plan: Plan, device: Optional[str] = None) -> List[RankPlan]:
    """One RankPlan per rank of the world (megatron's order: TP ranks are consecutive)."""
    s = setting_from_config(cfg, plan, device)
    by_tp = {}
    rows = []
    for rank in range(plan.world_size):
        tp_rank, dp_rank = rank % plan.tp, rank // plan.tp
        if tp_rank not in by_tp:
            by_tp[tp_rank] = rank_plan(s, tp_rank)
        rows.append(dataclasses.replace(by_tp[tp_rank], rank=rank, tp_rank=tp_rank, dp_rank=dp_rank))
    return rows


# ----------------------------------------------------------------------------- from a config, output

def resolve_plan(cfg: TrainConfig, world_size: int):
    """Validate ``cfg`` for ``world_size`` ranks without needing its data or run directory.

    Returns (Plan, note): the tokenizer's vocabulary when the data files are readable, else
    ``model.vocab_size`` or the preset's (note says so). Any other config error is raised."""
    from .config import ConfigError
    from .config_checks import make_plan

    try:
        return make_plan(cfg, world_size, check_outputs=False), None
    except ConfigError as e:
        plan = make_plan(cfg, world_size, check_outputs=False, check_inputs=False)  # raises non-data errors
        src = "model.vocab_size" if cfg.model.vocab_size is not None else f"preset {plan.preset.name!r}"
        return plan, f"data not read ({e}); vocabulary {plan.vocab_size} from {src}"


def describe_setting(s: Setting, world: int) -> str:
    engine = ("per-layer updates" + (" (clipping: all gradients at the boundary)" if s.clip_grad > 0 else "")
              if s.per_layer else f"DeepSpeed ZeRO-{s.zero_stage}")
    slc = None if s.sl_config is None else variant_sl_config(s.sl_config, s.variant)
    sl = "" if slc is None else f", r={slc.rank} δ={slc.density}"
    return (f"{s.variant} preset {s.preset.name!r}{sl}: world {world} = TP {s.tp} x DP {s.dp}"
            f"{' + SP' if s.sequence_parallel else ''}; micro {s.micro} x seq {s.seq} (GA {s.grad_accum}); "
            f"{s.precision}, {s.optimizer}, {engine}; recompute {s.recompute}; device {s.device}")


def plan_summary(cfg: TrainConfig, plan: Plan, device: Optional[str] = None) -> dict:
    """Everything ``megatron-sl plan --json`` prints."""
    s = setting_from_config(cfg, plan, device)
    rows = plan_ranks(cfg, plan, device)
    return {"setting": describe_setting(s, plan.world_size), "world_size": plan.world_size, "tp": plan.tp,
            "dp": plan.dp, "device": s.device, "vocab_size": plan.vocab_size,
            "ranks": [{"rank": r.rank, "tp_rank": r.tp_rank, "dp_rank": r.dp_rank, "params": r.params,
                       "low_rank": r.low_rank, "sparse": r.sparse, "dense": r.dense, "peak_bytes": r.peak,
                       "peak_phase": r.peak_phase, "components_at_peak": r.components, "phases": r.phases,
                       "model_state_bytes": r.model_state, "cpu_host_scratch_bytes": r.host_scratch}
                      for r in rows]}


def format_breakdown(rank: RankPlan, unit: float = GiB, unit_name: str = "GiB") -> List[str]:
    lines = [f"rank {rank.rank} (tp {rank.tp_rank}, dp {rank.dp_rank}): peak {rank.peak / unit:.3f} {unit_name} "
             f"in the {rank.peak_phase} phase"]
    for k in COMPONENTS:
        lines.append(f"  {k:<12} {rank.components[k] / unit:>10.3f} {unit_name}")
    lines.append("  phases: " + ", ".join(f"{k} {v / unit:.3f}" for k, v in rank.phases.items()))
    if rank.host_scratch:
        lines.append(f"  + bitsandbytes CPU step scratch outside torch's allocator: {rank.host_scratch / unit:.3f} "
                     f"{unit_name} (RSS only)")
    return lines


def format_rank_table(rows: List[RankPlan]) -> List[str]:
    """One line per rank; the last column is the model-state GiB (parsed by the Slurm test)."""
    out = [f"{'rank':>4} {'tp':>3} {'dp':>3} {'params':>14} {'low-rank':>14} {'sparse':>12} {'dense':>14} "
           f"{'peak GiB':>9} {'model-state GiB':>16}"]
    for r in rows:
        out.append(f"{r.rank:>4} {r.tp_rank:>3} {r.dp_rank:>3} {r.params:>14,} {r.low_rank:>14,} {r.sparse:>12,} "
                   f"{r.dense:>14,} {r.peak / GiB:>9.3f} {r.model_state / GiB:>16.3f}")
    return out


# ----------------------------------------------------------------------------- paper Fig. 3

PAPER_FIG3_GB = {"Adam (bf16)": 67.4, "8-bit Adam + per-layer": 29.4, "GaLore 8-bit + per-layer": 22.0,
                 "SLTrain 8-bit + per-layer": 18.3}
PAPER_SETTING = ("single GPU, LLaMA 7B, bf16 weights (no fp32 master), seq 256, micro-batch {micro}, "
                 "recompute {recompute}")


def paper_fig3(micro: int = 1, seq: int = 256, recompute: str = "none") -> List[dict]:
    """The 7B rows in the paper's Fig. 3 setting, our prediction beside the paper's bar (GB = 1e9 B).

    Assumptions (the paper does not state them): micro-batch ``micro`` of ``seq`` tokens, activation
    recompute ``recompute``, CUDA (bitsandbytes' fused kernels), per-layer updates without clipping;
    "Adam (bf16)" is pure-bf16 torch AdamW with all gradients held (as the research code trains)."""
    from ..core.config import SLConfig
    from ..model.presets import get_preset

    p = get_preset("7b")
    slc = SLConfig(rank=p.rank, density=p.density, alpha=p.alpha)
    base = dict(preset=p, sl_config=slc, vocab=p.vocab_size, seq=seq, micro=micro, grad_accum=1, tp=1, dp=1,
                sequence_parallel=False, recompute=recompute, precision="bf16", zero_stage=0, min_8bit_size=4096,
                device="cuda")
    cases = [("Adam (bf16)", dict(variant="dense", optimizer="adamw", per_layer=True, clip_grad=1.0)),
             ("8-bit Adam + per-layer", dict(variant="dense", optimizer="adamw8bit", per_layer=True, clip_grad=0.0)),
             ("GaLore 8-bit + per-layer", None),
             ("SLTrain 8-bit + per-layer", dict(variant="sl", optimizer="adamw8bit", per_layer=True, clip_grad=0.0))]
    out = []
    for name, kw in cases:
        row = {"method": name, "paper_GB": PAPER_FIG3_GB[name], "ours_GB": None, "components_GB": None}
        if kw is not None:
            r = rank_plan(Setting(**base, **kw), tp_rank=0)
            row["ours_GB"] = r.peak / GB
            row["components_GB"] = {k: v / GB for k, v in r.components.items()}
            row["params"] = r.params
        out.append(row)
    return out


def format_paper_fig3(rows: List[dict], micro: int, recompute: str = "none") -> List[str]:
    setting = PAPER_SETTING.format(micro=micro, recompute=recompute)
    lines = [f"LLaMA 7B, paper Fig. 3 setting ({setting}; r=1024, δ=0.05; GB = 1e9 bytes)",
             f"{'method':<28} {'paper GB':>9} {'ours GB':>9}   ours: params / grads / optimizer / index / activations "
             f"/ buffers+temporaries"]
    for r in rows:
        if r["ours_GB"] is None:
            lines.append(f"{r['method']:<28} {r['paper_GB']:>9.1f} {'-':>9}   not implemented here (paper's bar only)")
            continue
        c = r["components_GB"]
        lines.append(f"{r['method']:<28} {r['paper_GB']:>9.1f} {r['ours_GB']:>9.1f}   {c['parameters']:.1f} / "
                     f"{c['gradients']:.1f} / {c['optimizer']:.1f} / {c['index']:.2f} / {c['activations']:.1f} / "
                     f"{c['buffers'] + c['temporaries']:.1f}")
    return lines
