"""Which samples each rank reads, batching, and the masked language-model loss.

Sample order is a pure function of the step: optimizer step ``s`` consumes global samples
[s·G, (s+1)·G) of the training dataset (G = global batch), and within it micro-batch ``m`` of
data-parallel rank ``d`` reads the ``micro`` consecutive samples starting at
s·G + m·(micro·DP) + d·micro (megatron's pretraining-sampler order). TP ranks of one DP rank read
the same samples. So ``consumed_samples = step · G`` is the whole data position, which makes exact
resumption a matter of restoring the step. Validation uses a fixed held-out set: the first
``eval.iters · micro · DP`` samples of the validation dataset, the same at every evaluation.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def train_sample_start(step: int, micro_idx: int, global_batch: int, micro: int, dp: int, dp_rank: int) -> int:
    return step * global_batch + micro_idx * micro * dp + dp_rank * micro


def eval_sample_start(eval_idx: int, micro: int, dp: int, dp_rank: int) -> int:
    return eval_idx * micro * dp + dp_rank * micro


def collate(dataset, start: int, count: int, device) -> Dict[str, torch.Tensor]:
    samples: Sequence[dict] = [dataset[i] for i in range(start, start + count)]
    batch = {}
    for key in BATCH_KEYS:
        if key in samples[0] and samples[0][key] is not None:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device, non_blocking=True)
    if "attention_mask" not in batch:
        batch["attention_mask"] = None
    return batch


def per_token_loss(engine, batch) -> torch.Tensor:
    """The model's per-token cross entropy [b, s] (megatron GPTModel with labels)."""
    return engine.forward(batch["tokens"], batch["position_ids"], batch["attention_mask"], batch["labels"])


def masked_mean(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens that count (loss_mask 1), in float32."""
    mask = loss_mask.to(torch.float32)
    return (token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)
