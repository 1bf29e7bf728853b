"""Sliding-window attention block by block, in plain PyTorch (the CPU path, and the piece of
H-Transformer-1D's level 0).

The sequence is cut into blocks of w queries; each block gathers its own keys, the previous block's
and (bidirectional) the next block's, and masks them to the exact window. Memory is O(n * w) per
head; the n x n matrix never exists.
"""

from ..indexing import at_positions, block_neighbourhoods
from ..softmax import exp_scores


def neighbour_block_attention(q, k, v, *, block: int, causal: bool, window: int, padding_mask=None):
    """Softmax pieces of attention among neighbouring blocks, restricted to a window.

    q, k, v [batch, heads, n, d]. Query i sees key j when j lies in the previous, own or
    (bidirectional) next block of `block` positions, i - window < j <= i (causal) or
    |i - j| < window (bidirectional), and j is not padding (a query always sees itself, so no row
    is empty). Returns the pieces of `exp_scores`: row max [b, h, n, 1], numerator [b, h, n, d],
    denominator [b, h, n, 1].
    """
    n = q.shape[-2]
    queries, keys = block_neighbourhoods(n, block, causal, q.device)
    offset = queries[:, :, None] - keys[:, None, :]  # query minus key position, [blocks, block, keys]
    visible = ((keys >= 0) & (keys < n))[:, None, :] & (offset < window) & (offset > (-1 if causal else -window))
    if padding_mask is not None:
        real_key = ~at_positions(padding_mask, keys, dim=-1)  # [batch, blocks, keys]
        visible = visible & (real_key[:, None, :, None, :] | (offset == 0))
    scores = at_positions(q, queries) @ at_positions(k, keys).transpose(-1, -2) * q.shape[-1] ** -0.5
    row_max, weights, row_sum = exp_scores(scores, visible)
    numerator = weights.to(v.dtype) @ at_positions(v, keys)
    return tuple(piece.flatten(2, 3)[:, :, :n] for piece in (row_max, numerator, row_sum))
