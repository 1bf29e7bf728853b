"""The O(n) variant of Fast Multipole Attention (downsampled queries) in plain PyTorch, bidirectional only.

shared/docs/fma-algorithm.md, "O(n) variant". Notation as in fma/indexing.py: fine block m, rank p,
levels l = 1..L of cell width w_l = m 2^(l-1). At level l the queries are summarised like the keys:
cell g's p coarse queries are the means of its p segments of w_l / p consecutive queries (real
queries only), Q~_l[s] = mean_{i in segment s} q_i, s = i // (w_l / p). Each coarse query meets the
<= 3p coarse keys of its cell's interaction list (g-2, g+2, g+3 for even g; g-3, g-2, g+2 for odd)
and keeps its softmax in pieces: row max M~, numerator N~ = sum_j exp(s~_j - M~) v~_j, denominator
D~ = sum_j exp(s~_j - M~), with s~_j = Q~ . k~_j / sqrt(d) (+ log(count_j) with scale_coarse). Query i
takes the pieces of the coarse query of its segment at every level and those of its own fine scores
(blocks b-1, b, b+1, with q_i itself), and one log-sum-exp merge gives one normaliser:
    out_i = sum_l e^{M_l - M} N_l / sum_l e^{M_l - M} D_l,  M = max_l M_l (l = 0: fine).
That is one softmax over the union of the fine keys (scored with q_i) and every level's coarse keys
(scored with i's segment mean at that level): `naive.reference_multipole_attention(...,
downsample_queries=True)` computes exactly that, query by query.

Why the mean (avgpool) for queries, whatever kind summarises the keys: spreading pieces back needs
each coarse query to stand for a definite set of fine queries, and the segment mean is the summary
whose spread-back is the matching copy to those queries; it has no parameters (any length), and
with queries constant within the coarsest cells it is exact (the variant then equals FMA; with
avgpool keys and values also constant there, full attention). A learned query basis would need a
learned map back down as well (the FMM's local-to-local step): not done here.

Why O(n): segments nest (p divides m, so level l's segment s holds level l-1's segments 2s and
2s+1), so the query means are built bottom-up from pairs (O(n d) in all, not per level), and the
pieces are spread top-down the same way (the FMM downward pass): level L's pieces merge into each
child segment's at level L-1, ..., level 1's into each fine query's. Per level O(n/w_l p (3p d)),
summed over levels < 6 n p^2 d / m; fine part 3 m n d; score entries per head n (3m) + sum_l
(n/w_l) p (3p) < n (3m + 6 p^2 / m), against n (3m + 3 p L) for FMA. (The key and value basis costs
what it costs: multilevel is O(n); groupedconv, conv and avgpool read every token at every level.)

Causal: refused by the layer. A coarse query mixes the queries of later tokens of its segment, so
query i's weights would depend on the future (the reference shows it); a leak-free coarse query
would be a running mean, one per token, which is FMA's O(n log n) again.

Padding: a pad contributes nothing to its segment's mean (means over real queries; a segment of no
real query gets the zero query, whose pieces reach only pads); padded keys are masked at the fine
level and carry zero weight through the counts at the coarse ones. A query that sees no key gets 0.
"""

import torch

from ..indexing import block_neighbourhoods, coarse_cells, key_logit_bias, level_widths
from ..softmax import exp_scores


def coarse_query_attention(q, k, v, coarse_k, coarse_v, *, block_size, rank, scale_coarse, key_padding_mask,
                           coarse_counts):
    """Bidirectional FMA with queries summarised per segment at every coarse level -> [batch, heads, n, d].

    Arguments as `multipole_attention` (q, k, v [batch, heads, n, d], n a valid length; summaries
    cell-major per level; key_padding_mask [batch, n] True at pads, or None; coarse_counts per
    level or None); rank p must divide block_size m. Query pads are the key pads.
    """
    batch, heads, n, head_dim = q.shape
    m, p = block_size, rank
    if m % p:
        raise ValueError(f"rank={p} must divide block_size={m}: segments of m/p queries must nest across levels")
    widths = level_widths(n, m)
    score_dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32
    scale = head_dim**-0.5
    key_bias = key_logit_bias(batch, n, m, p, scale_coarse, key_padding_mask, coarse_counts, score_dtype, q.device)

    # Fine pieces: each block's m queries against blocks b-1, b, b+1 (those that exist, real keys only).
    positions, fine = block_neighbourhoods(n, m, False, q.device)  # [blocks, m], [blocks, 3m]
    exists = (fine >= 0) & (fine < n)
    fine = fine.clamp(0, n - 1)
    scores = torch.einsum("bhnqd,bhnsd->bhnqs", q.unflatten(2, (n // m, m)), k[:, :, fine]).to(score_dtype) * scale
    fine_bias = key_bias[:, :n][:, fine][:, None, :, None, :]  # [batch, 1, blocks, 1, 3m]
    fine_max, weights, fine_sum = exp_scores(scores + fine_bias, exists[:, None, :])
    fine_numerator = torch.einsum("bhnqs,bhnsd->bhnqd", weights, v[:, :, fine].to(score_dtype))
    fine_pieces = tuple(x.flatten(2, 3) for x in (fine_max, fine_numerator, fine_sum))  # [batch, heads, n, .]

    # Coarse queries of every level, bottom-up: level 1's segments of m/p queries, then sums of pairs.
    real = torch.ones(batch, n, dtype=score_dtype, device=q.device) if key_padding_mask is None \
        else (~key_padding_mask).to(score_dtype)
    sums = q.to(score_dtype).mul(real[:, None, :, None]).unflatten(2, (-1, m // p)).sum(3)
    counts = real.unflatten(1, (-1, m // p)).sum(2)
    coarse_queries = []
    for level in range(len(widths)):
        if level:
            sums, counts = sums.unflatten(2, (-1, 2)).sum(3), counts.unflatten(1, (-1, 2)).sum(2)
        coarse_queries.append(sums / counts.clamp_min(1)[:, None, :, None])

    # Coarse pieces per level: each cell's p coarse queries against its interaction list's <= 3p keys.
    pieces, offset = [], n
    for width, queries, keys, values in zip(widths, coarse_queries, coarse_k, coarse_v):
        num_cells = n // width
        cells = torch.stack(coarse_cells(torch.arange(num_cells, device=q.device) * width, width, False), 1)
        cell_exists = (cells >= 0) & (cells < num_cells)  # [cells, 3]
        slots = (cells.clamp(0, num_cells - 1)[:, :, None] * p + torch.arange(p, device=q.device)).flatten(1)
        slot_exists = cell_exists.repeat_interleave(p, 1)  # [cells, 3p]
        scores = torch.einsum("bhcrd,bhcsd->bhcrs", queries.unflatten(2, (num_cells, p)),
                              keys[:, :, slots].to(score_dtype)) * scale
        bias = key_bias[:, offset:offset + num_cells * p][:, slots][:, None, :, None, :]
        row_max, weights, total = exp_scores(scores + bias, slot_exists[:, None, :])
        numerator = torch.einsum("bhcrs,bhcsd->bhcrd", weights, values[:, :, slots].to(score_dtype))
        pieces.append(tuple(x.flatten(2, 3) for x in (row_max, numerator, total)))  # [batch, heads, cells p, .]
        offset += num_cells * p

    # Downward pass: level l's segment s holds level l-1's segments 2s, 2s+1, and level 1's segment s
    # holds the fine queries s m/p .. (s+1) m/p - 1; merge each parent's pieces into its children's.
    merged = pieces[-1]
    for own in reversed([fine_pieces] + pieces[:-1]):
        group = 2 if own is not fine_pieces else m // p
        merged = merge(tuple(x.unflatten(2, (-1, group)) for x in own), tuple(x.unsqueeze(3) for x in merged))
        merged = tuple(x.flatten(2, 3) for x in merged)
    _, numerator, total = merged
    return (numerator / torch.where(total > 0, total, 1.0)).to(v.dtype)


def merge(a, b):
    """Two softmax pieces (max, numerator, denominator) of the same rows -> one, under the larger max.
    The maxima carry no gradient (`exp_scores`); a piece of no visible key (sum 0) drops out."""
    (max_a, numerator_a, total_a), (max_b, numerator_b, total_b) = a, b
    row_max = torch.maximum(max_a, max_b)
    scale_a, scale_b = torch.exp(max_a - row_max), torch.exp(max_b - row_max)
    return row_max, numerator_a * scale_a + numerator_b * scale_b, total_a * scale_a + total_b * scale_b


def score_entries(n: int, block_size: int, rank: int) -> int:
    """Scores this path computes per batch row and head at a valid length n: n * 3m fine, and per
    level (n / w_l) * p coarse queries times 3p coarse keys; below n (3m + 6 p^2 / m)."""
    return n * 3 * block_size + sum(n // width * rank * 3 * rank for width in level_widths(n, block_size))
