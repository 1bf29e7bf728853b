"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

    out = softmax(Q (E K)^T / sqrt(d)) (F V),   E, F [k, max_seq_len] learned, sliced to [k, n].

Keys and values are projected along the sequence to k rows each, so the scores are n x k and time
and memory are O(n k). The projections sum over every position, future ones included: there is no
causal form. A sequence shorter than max_seq_len uses the first n columns of E and F, as the
official (fairseq) code does. Padded keys and values are zeroed before the projection, so they add
nothing to any projected row. `naive.py` holds the same formula summed position by position.

Precision: inputs are upcast to float32 (float64 stays float64) and the output is cast back; the
softmax runs in float32. Under autocast the products (E K, F V, the scores) run in bf16 with float32
accumulation, like the model's other matmuls.
"""

import math

import torch


def linformer_attention(q, k, v, key_projection, value_projection, *, padding_mask=None):
    """q, k, v [batch, heads, n, d], E and F [k, max_seq_len >= n], padding_mask [batch, n] (True = pad)
    -> [batch, heads, n, d] in q's dtype."""
    dtype, n = q.dtype, q.shape[2]
    compute = torch.promote_types(dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if padding_mask is not None:
        padded = padding_mask[:, None, :, None]
        k, v = k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)
    projected_k = key_projection[:, :n].to(compute) @ k  # [b, h, k, d]: E K, the same E for every head
    projected_v = value_projection[:, :n].to(compute) @ v  # F V
    scores = q @ projected_k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, h, n, k]
    return (torch.softmax(scores, dim=-1) @ projected_v).to(dtype)
