"""Linformer as its formula, each projected key and value summed position by position: the ground
truth of the projected path (tests only)."""

import math

import torch


def linformer_attention_reference(q, k, v, key_projection, value_projection, *, padding_mask=None):
    """softmax(Q (E K)^T / sqrt(d)) F V with E K = sum_j E[:, j] k_j over the n positions (columns
    j >= n of E [k, max_seq_len] and F are never read); padded keys and values count as zero."""
    n = q.shape[2]
    if padding_mask is not None:
        real = (~padding_mask).to(q.dtype)[:, None, :, None]
        k, v = k * real, v * real
    projected_k = sum(key_projection[:, j, None] * k[:, :, None, j] for j in range(n))  # [b, h, k, d]
    projected_v = sum(value_projection[:, j, None] * v[:, :, None, j] for j in range(n))
    scores = q @ projected_k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, h, n, k]
    return torch.softmax(scores, dim=-1) @ projected_v
