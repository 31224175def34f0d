"""Which samples each rank reads, batching, and the masked language-model loss.

Sample order is a pure function of the step: optimizer step ``s`` consumes global samples
[s·G, (s+1)·G) of the training dataset (G = global batch), and within it micro-batch ``m`` of
data-parallel rank ``d`` reads the ``micro`` consecutive samples starting at
s·G + m·(micro·DP) + d·micro (megatron's pretraining-sampler order). TP ranks of one DP rank read
the same samples. So ``consumed_samples = step · G`` is the whole data position, which makes exact
resumption a matter of restoring the step. Validation uses a fixed held-out set: the first
``eval.iters · micro · DP`` samples of the validation dataset, the same at every evaluation.

``collate(..., vocab_size=V)`` also checks every token id of the batch against the tokenizer's
vocabulary (on the host, before the copy to the device): data too large for the pre-launch scan
that is corrupt fails with ``CorruptDataError`` naming the data file and the sample, not with an
index error deep in the embedding.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def train_sample_start(step: int, micro_idx: int, global_batch: int, micro: int, dp: int, dp_rank: int) -> int:
    return step * global_batch + micro_idx * micro * dp + dp_rank * micro


def eval_sample_start(eval_idx: int, micro: int, dp: int, dp_rank: int) -> int:
    return eval_idx * micro * dp + dp_rank * micro


class CorruptDataError(RuntimeError):
    """A batch holds a token id outside the tokenizer's vocabulary; the message names the data file."""


def _check_ids(dataset, start: int, key: str, ids: torch.Tensor, vocab_size: int) -> None:
    top = int(ids.max()) if ids.numel() else -1
    low = int(ids.min()) if ids.numel() else 0
    if top >= vocab_size or low < 0:
        row = int(((ids >= vocab_size) | (ids < 0)).any(dim=-1).nonzero()[0])
        prefix = getattr(getattr(dataset, "dataset", None), "path_prefix", None) or "the training data"
        raise CorruptDataError(f"{prefix}.bin is corrupt: sample {start + row} holds {key} id "
                               f"{top if top >= vocab_size else low} but the tokenizer has {vocab_size} pieces "
                               "(prepare the data again)")


def collate(dataset, start: int, count: int, device, vocab_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    samples: Sequence[dict] = [dataset[i] for i in range(start, start + count)]
    batch = {}
    for key in BATCH_KEYS:
        if key in samples[0] and samples[0][key] is not None:
            value = torch.stack([torch.as_tensor(s[key]) for s in samples])
            if vocab_size is not None and key in ("tokens", "labels"):
                _check_ids(dataset, start, key, value, vocab_size)
            batch[key] = value.to(device, non_blocking=True)
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
