"""training: DeepSpeed/megatron training loop, optimizers, data.

Modules (imported lazily by their users; this package imports nothing itself):

* ``config`` -- the typed training config (YAML + ``section.key=value`` overrides), the one source of
  truth for every setting; ``config_checks`` -- checks against world size / preset / files and the
  derived ``Plan``; ``ds_config`` -- the DeepSpeed JSON rendered from it;
* ``distributed`` -- launcher environment, process groups, megatron parallel_state, CPU shims;
  ``mpu`` -- the DeepSpeed ``mpu`` adapter over megatron's groups; ``launch`` -- torchrun from the CLI,
  signal forwarding and ranks that die with their launcher; ``runlock`` -- one run per run directory;
* ``optim`` -- param groups (TP-sharded / replicated / no-decay), AdamW / 8-bit AdamW, state bytes;
  ``schedule`` -- warmup + cosine; ``grads`` -- TP-aware global norm and clipping;
* ``ds_engine`` -- DeepSpeed ZeRO 0-3 engine; ``per_layer`` -- optimizer-in-backward updates;
* ``batches`` -- sample order, batching, masked loss; ``consistency`` -- cross-rank consistency;
  ``metrics`` -- metrics JSONL and progress bar; ``monitoring`` -- the per-step metrics registry,
  MFU, TensorBoard / W&B / Prometheus sinks and the run report; ``trainer`` -- the run of one rank;
* ``checkpoint`` -- atomic checkpoints, verified resume, keep-last-K; ``preemption`` -- stop/save
  signals agreed across ranks (exit 75) and the signal-forwarding torchrun wrapper; ``resume_check``
  -- the resumed checkpoint's config against the new one; ``guards`` -- bad-step skipping, divergence
  stop, step watchdog and the exit codes;
  ``memory_plan`` -- per-rank memory from the config alone (``megatron-sl plan``); ``dry_run`` --
  the planner's per-rank figures for ``train --dry-run``;
* ``data`` -- tokenizer, ``prepare-data`` and megatron GPTDatasets (the demo corpus is fetched by
  ``megatron_sl.corpus``).
"""
