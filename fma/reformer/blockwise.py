"""Reformer LSH attention (Kitaev, Kaiser & Levskaya 2020); causal key sets are fixed by the prefix.

Queries and keys share one projection; keys are L2-normalised (so a query's own key is its most
similar one). In each of `n_hashes` rounds every token is hashed by angular LSH of its key,
bucket = argmax([xR; -xR]) for a random rotation R [head_dim, n_buckets / 2], and the sequence is
sorted by (bucket, position). With w = chunk_size, query i sees, in its round's sorted order, the
entries of its own bucket less than w places away: causal, the w most recent tokens j <= i of its
bucket (itself included); bidirectional, those less than w places before or after it.

Why not the paper's chunks: the paper cuts the sorted sequence into chunks of m and lets each chunk
attend to itself and the previous chunk, other buckets included. Where the boundaries fall depends
on how many tokens sort earlier, later tokens included, so a causal output changes when the future
changes (public implementations are not prefix-invariant). Here a key set is fixed by the query's
bucket and the number of same-bucket tokens between it and the key, both set by the prefix: with
fixed rotations, no output at a position <= t depends on anything after t (zero gradient, tested).
The computation still uses blocks of w sorted places (each block against its own and the previous
block, bidirectional also the next: every key within w places), masked to the exact key sets; a
change after t can move a prefix token to another slot of its block, so its output changes by
rounding only (the tests allow 1e-12 in float64).

Self: the own key gets logit -1e5 (as in the paper's code): weight exactly 0 in every float format
whenever any other key is visible in any round; a token that sees nothing else attends to itself.

Rounds: one softmax over the union of the rounds' key sets. A key visible in c rounds gets -log c in
each, so it counts once (the paper's duplicate correction, exact here); round pieces merge on a
shared max, which is the paper's weighting of each round by a softmax over rounds of its logsumexp.

Rotations: one per head and round. With fresh_rotations (default), training draws new ones every
forward; evaluation uses the `rotations` buffer (drawn from the global seed at construction, saved
in checkpoints). With fresh_rotations=false the buffer is used always.

Padding: padded tokens hash to an extra bucket of their own, sorted last, so the sorted ranks and key
sets of real tokens are those of the unpadded sequence.

Cost per head: O(n * n_hashes * w * d) time; memory O(n * n_hashes * w) floats besides q, k, v, and
n * n_hashes^2 * w booleans (whether each query sees each key slot in each round).
`naive.py` recomputes the key sets with plain loops for the tests.
"""

import torch

from ..indexing import at_positions, block_neighbourhoods
from ..softmax import exp_scores, merge_pieces

SELF_LOGIT = -1e5


def hash_buckets(keys: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH: keys [b, h, n, d], rotations [h, d, rounds, buckets / 2] -> buckets [b, h, rounds, n]."""
    rotated = torch.einsum("bhnd,hdrc->bhrnc", keys, rotations.to(keys.dtype))
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


def lsh_attention(q, k, v, buckets, *, window: int, causal: bool) -> torch.Tensor:
    """q, k, v [b, h, n, d], buckets [b, h, rounds, n] -> [b, h, n, d]; see the module docstring."""
    n, head_dim = q.shape[-2:]
    window = min(window, n)
    score_dtype = torch.promote_types(q.dtype, torch.float32)  # -1e5 and log-counts need at least float32
    position = torch.arange(n, device=q.device)
    order = (buckets * n + position).argsort(-1)  # [b, h, rounds, n]: by bucket, ties by position
    rank = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))  # token -> its place
    # Buckets lie 2n apart in `code`, so two tokens share a bucket and lie fewer than w places apart
    # in a round exactly when their codes do: one subtraction tests both.
    code = buckets * (2 * n) + rank
    sorted_q, sorted_k, sorted_v = (x.unsqueeze(2).take_along_dim(order.unsqueeze(-1), dim=3) for x in (q, k, v))
    # Code, in every round, of the token at each sorted place: [b, h, sorting round, round, n].
    their_code = code.unsqueeze(2).take_along_dim(order.unsqueeze(3), dim=-1)

    # Blocks of w sorted places; each reads its own and the previous (bidirectional: and next) block.
    queries, keys = block_neighbourhoods(n, window, causal, q.device)
    query_code, key_code = (at_positions(their_code, places, dim=-1) for places in (queries, keys))

    def seen_in(round_):  # [b, h, R, blocks, w, keys]: does the query see the key in round `round_`?
        apart = query_code[:, :, :, round_, :, :, None] - key_code[:, :, :, round_, :, None, :]
        return (apart >= 0) & (apart < window) if causal else apart.abs() < window

    seen = torch.stack([seen_in(round_) for round_ in range(code.shape[2])], dim=3)  # [b, h, R, R, blocks, w, keys]
    real_key = (keys >= 0) & (keys < n)
    visible = seen.diagonal(dim1=2, dim2=3).movedim(-1, 2) & real_key[:, None, :]  # in the sorting round
    copies = seen.sum(3).clamp_min(1).to(score_dtype)
    is_self = (queries[:, :, None] == keys[:, None, :])

    scores = at_positions(sorted_q, queries) @ at_positions(sorted_k, keys).transpose(-1, -2)
    scores = torch.where(is_self, SELF_LOGIT, scores.to(score_dtype) * head_dim**-0.5) - copies.log()
    row_max, weights, row_sum = exp_scores(scores, visible)
    numerator = weights.to(v.dtype) @ at_positions(sorted_v, keys)

    def unsort(x):  # [b, h, R, blocks, w, ·] (sorted places) -> [b, h, R, n (positions), ·]
        return x.flatten(3, 4)[:, :, :, :n].take_along_dim(rank.unsqueeze(-1), dim=3)

    return merge_pieces(unsort(row_max), unsort(numerator), unsort(row_sum), dim=2).to(q.dtype)
