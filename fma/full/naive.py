"""Exact softmax attention written as the formula, n x n and all: the ground truth for every kind
that claims to equal full attention somewhere (tests only)."""

import math

import torch


def softmax_attention(q, k, v, *, causal: bool, padding_mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over q, k, v [batch, heads, n, d], with a causal mask and/or
    padded keys (padding_mask [batch, n], True = pad) hidden."""
    n = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    hidden = torch.zeros(n, n, dtype=torch.bool, device=q.device)
    if causal:
        hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    if padding_mask is not None:
        hidden = hidden | padding_mask[:, None, None, :]
    return torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1) @ v
