"""The research code's SL linear (andyjm3/SLTrain ``splora``), re-implemented as the baseline
for benchmarks: a scaled copy A·s made outside the Function and kept until backward, W
materialised in forward and again in backward, a dense grad W, values' grad gathered from it,
int64 flat indices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _PaperSLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B, A_s, values, idx, bias):
        W = B @ A_s
        W.view(-1).scatter_add_(0, idx, values)
        ctx.save_for_backward(x, B, A_s, values, idx)
        ctx.has_bias = bias is not None
        return F.linear(x, W, bias)

    @staticmethod
    def backward(ctx, dy):
        x, B, A_s, values, idx = ctx.saved_tensors
        W = B @ A_s
        W.view(-1).scatter_add_(0, idx, values)
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = dy @ W
        G = dy2.t() @ x2
        return dx, G @ A_s.t(), B.t() @ G, G.view(-1).gather(0, idx), dy2.sum(0) if ctx.has_bias else None, None


class PaperSLLinear(nn.Module):
    def __init__(self, sl_layer):
        super().__init__()
        self.B, self.A, self.values = sl_layer.B, sl_layer.A, sl_layer.values
        self.scale = sl_layer.scale
        self.register_buffer("idx", sl_layer.idx.to(torch.int64))

    def forward(self, x):
        return _PaperSLFunction.apply(x, self.B, self.A * self.scale, self.values, self.idx, None)
