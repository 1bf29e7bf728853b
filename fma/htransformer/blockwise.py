"""H-Transformer-1D (Zhu & Soricut 2021): hierarchical attention with fixed averaging, one softmax.

Notation: Nr = block_size (even), W_l = Nr * 2^l. Level 0 is exact attention among neighbouring
blocks of Nr tokens. At coarse level l >= 1, Q, K and V are averaged over aligned groups of 2^l
tokens ("coarse tokens"); a query's level-l neighbourhood is the blocks B-1, B, B+1 of width W_l
around its own block B, and level l covers the part of it that level l-1 did not:

    span_l(i) = [(B-1) W_l, (B+2) W_l),  B = i // W_l;      level l covers span_l(i) - span_(l-1)(i)

(clipped to [0, n), and to [0, i] when causal). In units of level-(l-1) blocks g = i // W_(l-1)
those are the blocks g-2, g+2, g+3 (g even) or g-3, g-2, g+2 (g odd); causal: g-2, and also g-3
when g is odd. Every block is Nr/2 coarse tokens of level l. Levels run up to the first L with
n <= 2 W_L, where span_L covers the whole sequence, so every query counts each key of its causal
past (or of the whole sequence) exactly once, the neighbouring fine block included.

All levels share one softmax: level pieces (max, numerator, denominator) are merged on a common max,
never normalised per level (the public code normalises each level separately and, causal, drops the
neighbouring fine block and most of the past). A coarse token standing for c real tokens adds log c
to its logit, so when Q, K and V are constant over the top level's coarse tokens (2^L tokens) the
result is full attention.

Queries: bidirectional, a level-l coarse query is the mean of its 2^l queries and its result is
repeated back to them (the paper's scheme: O(n Nr) scores over all levels). Causal keeps each
token's own query at every level: a mean over a coarse token would mix in the queries of up to
2^l - 1 later tokens and let the future change earlier outputs; that costs O(n Nr log(n / Nr))
scores. Either way each level's pieces are repeated to every query for the one merge, O(n d) per level.

Padding: coarse tokens average real tokens only and count real tokens; a coarse token with none is
hidden; padded fine keys are hidden from every query but themselves.

`naive.py` holds a plain per-query loop over explicit coverage lists (`coverage`); the tests hold
this path to it.
"""

import torch
import torch.nn.functional as F

from ..indexing import at_positions, coarse_cells
from ..local.blockwise import neighbour_block_attention
from ..softmax import exp_scores, merge_pieces


def num_levels(n: int, block_size: int) -> int:
    """Coarse levels L: the fewest with n <= 2 * block_size * 2^L (0 when two blocks hold the sequence)."""
    levels = 0
    while block_size << (levels + 1) < n:
        levels += 1
    return levels


def hierarchical_attention(q, k, v, *, block_size: int, causal: bool, padding_mask=None) -> torch.Tensor:
    """q, k, v [batch, heads, n, d] -> [batch, heads, n, d]; see the module docstring."""
    batch, _, n, _ = q.shape
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if padding_mask is None else ~padding_mask
    pieces = [neighbour_block_attention(q, k, v, block=block_size, causal=causal, window=2 * block_size,
                                        padding_mask=padding_mask)]  # window 2 Nr: the whole neighbour blocks
    levels = num_levels(n, block_size)
    if levels:
        top_cell = block_size << (levels - 1)  # the top level's cell: a level-(L-1) block
        padded = -(-n // top_cell) * top_cell
        q, k, v = (F.pad(x, (0, 0, 0, padded - n)) for x in (q, k, v))
        real = F.pad(real, (0, padded - n), value=False)
        # Zero at pads once, so that every level's averages sum real tokens only. Causal queries stay
        # as they are (each token keeps its own); bidirectional ones are averaged like keys.
        k, v = (x.masked_fill(~real[:, None, :, None], 0.0) for x in (k, v))
        if not causal:
            q = q.masked_fill(~real[:, None, :, None], 0.0)
        for level in range(1, levels + 1):
            pieces.append([piece[:, :, :n] for piece in coarse_level(q, k, v, real, level, block_size, causal)])
    maxima, numerators, denominators = (torch.stack(parts) for parts in zip(*pieces))
    return merge_pieces(maxima, numerators, denominators, dim=0).to(q.dtype)


def coarse_level(q, k, v, real, level: int, block_size: int, causal: bool):
    """Softmax pieces of coarse level `level` at fine resolution: row max, numerator, denominator [b, h, N, ·].

    q, k, v [b, h, N, d] and real [b, N], N a multiple of the level-(l-1) block width ("cell"); k, v
    (and q, bidirectional) are zero at pads.
    """
    batch, heads, length, head_dim = q.shape
    group = 1 << level  # fine tokens per coarse token
    per_cell = block_size // 2  # coarse tokens per cell
    cells = length // (group * per_cell)
    counts = real.view(batch, -1, group).sum(-1)  # real tokens per coarse token, [b, N / group]

    def average(x):  # [b, h, N, d], zero at pads -> [b, h, N / group, d], over real tokens
        sums = x.view(batch, heads, -1, group, head_dim).sum(-2)
        return sums / counts.clamp_min(1)[:, None, :, None].to(x.dtype)

    # Which coarse tokens each cell's queries see: the interaction-list cells (the same lists as
    # FMA's, in units of level-(l-1) blocks), per_cell tokens each; -1 or >= cells: no cell.
    key_cells = torch.stack(coarse_cells(torch.arange(cells, device=q.device), 1, causal), 1)  # [cells, slots]
    cell_exists = (key_cells >= 0) & (key_cells < cells)
    key_tokens = (key_cells[:, :, None] * per_cell + torch.arange(per_cell, device=q.device)).flatten(1)
    key_counts = at_positions(counts, key_tokens, dim=-1)  # [b, cells, keys]
    visible = cell_exists.repeat_interleave(per_cell, dim=1) & (key_counts > 0)
    log_counts = key_counts.clamp_min(1).to(q.dtype).log()  # a coarse token counts as its real tokens

    queries = (q if causal else average(q)).unflatten(2, (cells, -1))  # [b, h, cells, rows, d]
    scores = queries @ at_positions(average(k), key_tokens).transpose(-1, -2) * head_dim**-0.5
    row_max, weights, row_sum = exp_scores(scores + log_counts[:, None, :, None, :], visible[:, None, :, None, :])
    numerator = weights.to(v.dtype) @ at_positions(average(v), key_tokens)
    pieces = [piece.flatten(2, 3) for piece in (row_max, numerator, row_sum)]
    return pieces if causal else [piece.repeat_interleave(group, dim=2) for piece in pieces]  # to every query
