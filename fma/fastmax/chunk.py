"""Fastmax (Gerami et al. 2024, "FAST: Factorizable Attention for Speeding up Transformers").

    out_i = sum_j f(q_i.k_j) v_j / sum_j f(q_i.k_j),   f(x) = sum_{l=0..p} x^l / l!,   j <= i when causal,

on queries and keys centred over the head dimension and scaled to unit length (`normalise`, the
paper's normalisation as we read it; the authors' code divides by the largest norm in the sequence
instead, which lets later tokens change earlier outputs), so that q.k lies in [-1, 1]. There f > 0
for p = 2 (1 + x + x^2/2 = ((1 + x)^2 + 1) / 2 >= 1/2) and f >= 0 for p = 1 (zero only where q = -k),
so every weight is a non-negative share.

f(q.k) = phi(q).phi(k) with phi(x) = [1, x, vec(x x^T) / sqrt(2)] (the last part for p = 2 only), so
attention factorises like linear attention: sum_j f(q_i.k_j) w_j = phi(q_i) @ sum_j phi(k_j) w_j^T, with
w_j = [v_j, 1] giving numerator and normaliser in one product; O(n d^(p+1)), never n x n.
Non-causal: one [1 + d + d^2, d_v + 1] state. Causal, chunked: f(q.k) with a causal mask within a chunk,
and across chunks the state of all earlier chunks, one state per chunk (never one per position). Memory:
phi(k) is [n, 1 + d + d^2] and the states [n / chunk_size, 1 + d + d^2, d_v + 1], so a chunk_size near
d_v keeps the states no larger than the features. `naive.py` holds the O(n^2) formula the tests check.

Precision: inputs are upcast to float32 (float64 stays float64): normalisation, features and the
running sums across chunks are float32; the output is cast back. Under autocast the matrix products
run in bf16 with float32 accumulation, like the model's other matmuls.
"""

import math

import torch
import torch.nn.functional as F

from ..linear.chunk import exclusive_cumsum


def fastmax_attention(q, k, v, *, p: int, causal: bool, chunk_size: int, padding_mask=None):
    """q, k, v [batch, heads, n, d] -> [batch, heads, n, d] in q's dtype; padded keys get weight 0."""
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    q, k = normalise(q.to(compute)), normalise(k.to(compute))
    values = F.pad(v.to(compute), (0, 1), value=1.0)  # w_j = [v_j, 1]
    if padding_mask is not None:
        values = values.masked_fill(padding_mask[:, None, :, None], 0.0)
    if causal:
        sums = causal_chunked_sums(q, k, values, p, chunk_size)
    else:
        sums = features(q, p) @ (features(k, p).transpose(-1, -2) @ values)
    numerator, normaliser = sums[..., :-1], sums[..., -1:]
    # A query with every key padded has numerator and normaliser 0: output 0 (finite), not 0 / 0.
    return (numerator / torch.where(normaliser > 0, normaliser, 1.0)).to(dtype)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit length over the head dimension, per vector (so causal stays causal): |q.k| <= 1."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def score(x: torch.Tensor, p: int) -> torch.Tensor:
    """f(x) = sum_{l=0..p} x^l / l!, exp's Taylor polynomial of degree p."""
    return 1 + x if p == 1 else 1 + x + x * x / 2


def features(x: torch.Tensor, p: int) -> torch.Tensor:
    """phi(x) [..., 1 + d (+ d^2 for p = 2)] with phi(q).phi(k) = f(q.k)."""
    parts = [torch.ones_like(x[..., :1]), x]
    if p == 2:
        parts.append((x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2))
    return torch.cat(parts, -1)


def causal_chunked_sums(q, k, values, p: int, chunk_size: int) -> torch.Tensor:
    """sum_{j <= i} f(q_i.k_j) w_j [b, h, n, d_v + 1], chunk by chunk.

    The sequence is padded with w = 0 to whole chunks (pads add nothing). Chunk c's queries get f(q.k)
    masked to j <= i within c plus phi(q) times the state sum phi(k_j) w_j^T of chunks 0..c-1.
    """
    n = q.shape[-2]
    chunks = -(-n // chunk_size)
    q, k, values = (F.pad(x, (0, 0, 0, chunks * chunk_size - n)).unflatten(-2, (chunks, chunk_size))
                    for x in (q, k, values))
    causal_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    within = score(q @ k.transpose(-1, -2), p).masked_fill(~causal_mask, 0.0)  # [b, h, chunks, C, C]
    chunk_state = features(k, p).transpose(-1, -2) @ values  # [b, h, chunks, 1 + d + d^2, d_v + 1]
    sums = within @ values + features(q, p) @ exclusive_cumsum(chunk_state)
    return sums.flatten(2, 3)[:, :, :n]
