"""A softmax kept in pieces (row max, numerator, denominator), for kinds whose key set is a union of parts.

H-Transformer-1D's levels and Reformer's hashing rounds normalise once over the union of their parts
instead of once per part; sliding-window attention uses one piece. This module is at the bottom of
`fma`: it imports nothing else from the package.
"""

import torch


def exp_scores(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One piece of a softmax: scores [..., keys] and a broadcastable visibility mask ->
    row max [..., 1], weights exp(score - max) [..., keys] (0 where hidden), row sum [..., 1], all
    in at least float32 (bf16 and fp16 scores are upcast; callers cast the output back).

    A row with nothing visible gets sum 0 and the lowest finite max, so it drops out of
    `merge_pieces` instead of producing NaN. The max is a constant shift: it carries no gradient.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~visible, float("-inf"))
    row_max = scores.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - row_max)
    return row_max, weights, weights.sum(-1, keepdim=True)


def merge_pieces(maxima: torch.Tensor, numerators: torch.Tensor, denominators: torch.Tensor, dim: int) -> torch.Tensor:
    """Finish a softmax whose key set was split into pieces along `dim`: rescale every piece to the
    shared max, then one division. maxima/denominators [..., 1], numerators [..., d]."""
    scale = torch.exp(maxima - maxima.amax(dim, keepdim=True))
    return (numerators * scale).sum(dim) / (denominators * scale).sum(dim)
