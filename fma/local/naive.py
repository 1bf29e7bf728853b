"""Sliding-window attention as an explicit n x n band mask: the ground truth of both paths (tests only)."""

import math

import torch


def banded_softmax_attention(q, k, v, *, window: int, causal: bool, padding_mask=None) -> torch.Tensor:
    """q, k, v [batch, heads, n, d]: softmax over keys j with i - w < j <= i (causal) or |i - j| < w,
    padded keys (padding_mask [batch, n], True = pad) hidden from every query but themselves."""
    n = q.shape[-2]
    offset = torch.arange(n, device=q.device)[:, None] - torch.arange(n, device=q.device)[None, :]
    visible = (offset >= 0) & (offset < window) if causal else offset.abs() < window
    if padding_mask is not None:
        visible = visible & (~padding_mask[:, None, None, :] | (offset == 0))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v
