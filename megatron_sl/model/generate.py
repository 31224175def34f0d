"""Autoregressive sampling from a ``build_model`` GPTModel: greedy, or temperature + top-p (nucleus).

No KV cache: every new token re-runs the model on the whole context (at most ``max_context``
tokens, the most recent ones), which is enough for a quick look at a run on CPU or one GPU.
The model is called as in training, ``model(tokens [1, s], position_ids [1, s], None)`` (causal
mask), and returns logits [1, s, vocab / TP] (the padded vocabulary; ``vocab_limit`` masks the
padding); under tensor parallelism the vocabulary shards are all-gathered, so every TP rank
samples the same token (sampling needs the same ``generator`` state on every rank).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` [v] with everything outside the smallest set of most likely tokens whose probability
    reaches ``top_p`` set to -inf (the most likely token is always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # mass before this token already reaches top_p
    drop[0] = False
    out = logits.clone()
    out[order[drop]] = float("-inf")
    return out


def _full_vocab(logits: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return logits
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    group = ps.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, -1)


@torch.no_grad()
def generate(model, prompt: Sequence[int], max_new_tokens: int, *, greedy: bool = True, top_p: float = 1.0,
             temperature: float = 1.0, generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
             max_context: Optional[int] = None, vocab_limit: Optional[int] = None) -> List[int]:
    """``prompt`` followed by up to ``max_new_tokens`` sampled ids (stops after ``eos_id``)."""
    if not prompt:
        raise ValueError("generate: the prompt must hold at least one token")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"generate: temperature={temperature} must be > 0 and top_p={top_p} in (0, 1]")
    device = next(model.parameters()).device
    ids = list(int(t) for t in prompt)
    for _ in range(max_new_tokens):
        ctx = ids[-max_context:] if max_context else ids
        tokens = torch.tensor([ctx], dtype=torch.long, device=device)
        pos = torch.arange(len(ctx), device=device)[None]
        logits = _full_vocab(model(tokens, pos, None)[0, -1].float())
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        if greedy:
            nxt = int(torch.argmax(logits))
        else:
            probs = torch.softmax(top_p_filter(logits / temperature, top_p), -1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return ids
