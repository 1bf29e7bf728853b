"""Plain, slow Fast Multipole Attention: the ground truth that every faster path is tested against.

Written straight from shared/docs/fma-algorithm.md, one query and one cell at a time, in any dtype.
Shares only `padded_length` and `level_widths` (definitions, not computation) with the fast paths,
and takes the summaries from the downsampling's own reference. Never used for training.
`downsample_queries=True` is the O(n) variant's definition (fma/multipole/coarse_queries.py): at each
coarse level a query's coarse scores come from its segment's mean query instead of its own.
"""

import math

import torch
import torch.nn.functional as F

from ..downsample.naive import summarise_cell
from ..indexing import level_widths, padded_length


def interaction_lists(n: int, block_size: int, causal: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """For a valid length n, per query i: (fine key indices, [(level, cell), ...]) it attends to."""
    assert padded_length(n, block_size) == n, f"{n} is not a valid length for block_size={block_size}"
    m, widths = block_size, level_widths(n, block_size)
    lists = []
    for i in range(n):
        block = i // m
        if causal:
            fine = list(range(max(0, (block - 1) * m), i + 1))
        else:
            fine = list(range(max(0, (block - 1) * m), min(n, (block + 2) * m)))
        coarse = []
        for level, w in enumerate(widths, 1):
            if causal:
                parent, half = i // (2 * w), (i % (2 * w)) // w
                cells = [2 * parent - 2] + ([2 * parent - 1] if half == 1 else [])
            else:
                g = i // w
                cells = [g - 2, g + 2, g + 3] if g % 2 == 0 else [g - 3, g - 2, g + 2]
            coarse += [(level, c) for c in cells if 0 <= c < n // w]
        lists.append((fine, coarse))
    return lists


def reference_multipole_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_downsample,
    value_downsample,
    *,
    block_size: int,
    causal: bool,
    scale_coarse: bool,
    padding_mask: torch.Tensor | None = None,
    downsample_queries: bool = False,
) -> torch.Tensor:
    """q, k, v [batch, heads, n, d] (any n), padding_mask [batch, n] (True = pad) -> [batch, heads, n, d].

    key_downsample, value_downsample: the layer's `Downsample` modules (their kind, rank and weights).

    The sequence is thought of as padded to `padded_length(n)`; pads (and masked positions) are
    never attended to: fine pads get logit -inf, summaries use real tokens only with real counts.
    Every query must see at least one real key (true unless a causal prefix is all padding).

    downsample_queries: the O(n) variant. At level l (width w), query i is represented by the mean of
    the real queries of its segment, tokens [s w/p, (s+1) w/p) with s = i // (w/p) (p must divide m),
    and that mean is what meets the level's coarse keys; fine keys still meet q_i itself, and it is
    still one softmax over the union. Also computed for causal=True, where it is not causal (the
    mean holds later queries of the segment): the layer refuses that, the tests show why.
    """
    batch, heads, n, head_dim = q.shape
    valid = padded_length(n, block_size)
    real = torch.zeros(batch, valid, dtype=torch.bool, device=q.device)
    real[:, :n] = True if padding_mask is None else ~padding_mask

    # (level, cell) -> keys, values [batch, heads, p, d] and counts [batch, p]
    summaries = {}
    padded_q, padded_k, padded_v = (F.pad(x, (0, 0, 0, valid - n)) for x in (q, k, v))
    widths = level_widths(valid, block_size)
    for level, w in enumerate(widths, 1):
        for cell in range(valid // w):
            tokens = slice(cell * w, (cell + 1) * w)
            ck, counts = summarise_cell(padded_k[:, :, tokens], real[:, tokens], key_downsample, level)
            cv, _ = summarise_cell(padded_v[:, :, tokens], real[:, tokens], value_downsample, level)
            summaries[level, cell] = ck, cv, counts

    outputs = []
    for i, (fine, coarse) in enumerate(interaction_lists(valid, block_size, causal)[:n]):
        fine = [j for j in fine if j < n]
        keys, values = [k[:, :, fine]], [v[:, :, fine]]
        fine_bias = torch.zeros(batch, len(fine), dtype=q.dtype, device=q.device)
        logit_bias = [fine_bias.masked_fill(~real[:, fine], -math.inf)]
        queries = [q[:, :, i, None].expand(-1, -1, len(fine), -1)]  # the query meeting each key
        for level, cell in coarse:
            ck, cv, counts = summaries[level, cell]
            keys.append(ck)
            values.append(cv)
            weight_bias = counts.log() if scale_coarse else torch.zeros_like(counts)
            logit_bias.append(weight_bias.masked_fill(counts == 0, -math.inf))
            query = segment_mean_query(padded_q, real, i, widths[level - 1], key_downsample.rank) \
                if downsample_queries else q[:, :, i]
            queries.append(query[:, :, None].expand(-1, -1, ck.shape[2], -1))
        scores = torch.einsum("bhsd,bhsd->bhs", torch.cat(queries, 2), torch.cat(keys, 2)) / math.sqrt(head_dim)
        weights = torch.softmax(scores + torch.cat(logit_bias, 1)[:, None], dim=-1)
        outputs.append(torch.einsum("bhs,bhsd->bhd", weights, torch.cat(values, 2)))
    return torch.stack(outputs, dim=2)



def segment_mean_query(q, real, i: int, width: int, rank: int) -> torch.Tensor:
    """q [batch, heads, n, d], real [batch, n] -> [batch, heads, d]: the mean of the real queries of
    query i's segment at a level of cell width `width` (w/p tokens; zero where none is real)."""
    assert width % rank == 0, f"rank={rank} must divide the cell width {width}"
    segment = width // rank
    start = i // segment * segment
    part, is_real = q[:, :, start:start + segment], real[:, start:start + segment]
    total = part.masked_fill(~is_real[:, None, :, None], 0).sum(2)
    return total / is_real.sum(1).clamp_min(1).to(q.dtype)[:, None, None]
