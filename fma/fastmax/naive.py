"""Fastmax as its O(n^2) formula: the ground truth of the factorised path (tests only)."""

import math

import torch


def fastmax_reference(q, k, v, *, p: int, causal: bool, padding_mask=None) -> torch.Tensor:
    """a_ij = f(q_i.k_j) / sum_j f(q_i.k_j), f(x) = sum_{l<=p} x^l / l!, on mean-centred unit q and k."""
    q, k = ((x - x.mean(-1, keepdim=True)) for x in (q, k))
    q, k = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6) for x in (q, k))
    scores = q @ k.transpose(-1, -2)
    weights = sum(scores**power / math.factorial(power) for power in range(p + 1))
    if causal:
        weights = weights.tril()
    if padding_mask is not None:
        weights = weights.masked_fill(padding_mask[:, None, None, :], 0.0)
    return weights @ v / weights.sum(-1, keepdim=True)
