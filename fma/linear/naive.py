"""Linear attention as its O(n^2) formula: the ground truth of the chunked path (tests only)."""

import torch
import torch.nn.functional as F


def linear_attention_reference(q, k, v, *, causal: bool, eps: float) -> torch.Tensor:
    """Weights phi(q_i).phi(k_j), lower-triangular when causal."""
    weights = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    if causal:
        weights = weights.tril()
    return weights @ v / (weights.sum(-1, keepdim=True) + eps)
