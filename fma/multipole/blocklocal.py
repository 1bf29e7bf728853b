"""Fast Multipole Attention in plain PyTorch: the portable path (backend "torch").

The block-local view: every fine block's m queries share one gathered key set (neighbour fine
blocks plus their coarse cells at every level) under a fixed mask, so memory is O(n * (m + p*L))
per head and no n x n tensor ever exists.
"""

import torch

from ..indexing import block_local_layout, key_logit_bias
from ..softmax import exp_scores


def block_local_attention(q, k, v, coarse_k, coarse_v, *, block_size, rank, causal, scale_coarse,
                          key_padding_mask, coarse_counts):
    """Gather each fine block's key set, then dense attention per block (arguments: `multipole_attention`)."""
    batch, heads, n, head_dim = q.shape
    m, num_blocks = block_size, n // block_size
    key_index, allowed = block_local_layout(n, m, rank, causal, q.device)

    # Every key (fine, then level 1, ..., level L) with its additive logit term, gathered per block.
    keys = torch.cat([k, *coarse_k], dim=2)[:, :, key_index]  # [batch, heads, blocks, S, d]
    values = torch.cat([v, *coarse_v], dim=2)[:, :, key_index]
    score_dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32
    key_bias = key_logit_bias(batch, n, m, rank, scale_coarse, key_padding_mask, coarse_counts, score_dtype, q.device)
    key_bias = key_bias[:, key_index][:, None, :, None, :]  # [batch, 1, blocks, 1, S]

    queries = q.unflatten(2, (num_blocks, m))
    scores = torch.einsum("bhnqd,bhnsd->bhnqs", queries, keys).to(score_dtype) * head_dim**-0.5
    _, unnormalised, total = exp_scores(scores + key_bias, allowed)  # a row seeing no key: all zero
    weights = (unnormalised / torch.where(total > 0, total, 1.0)).to(v.dtype)
    out = torch.einsum("bhnqs,bhnsd->bhnqd", weights, values)
    return out.reshape(batch, heads, n, head_dim)
