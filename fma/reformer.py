"""Reformer LSH attention (Kitaev, Kaiser & Levskaya 2020), exactly prefix-invariant when causal.

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
fixed rotations, outputs at positions <= t are bitwise unchanged by any change after t (tested, and
the model-level causality test holds with torch.equal). The computation loops over the offsets
inside the window of the sorted order, so each query's arithmetic is the same wherever it lands in
the sort (block matmuls would move its keys between slots and change the rounding).

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

Cost per head: O(n * n_hashes * w * d) time; memory O(n * n_hashes * (w + n_hashes)) besides q, k, v.
`lsh_attention_reference` recomputes the key sets with plain loops for the tests.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigurationError
from .layer import AttentionLayer
from .local import exp_scores, merge_pieces
from .registry import register_attention

SELF_LOGIT = -1e5


def hash_buckets(keys: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH: keys [b, h, n, d], rotations [h, d, rounds, buckets / 2] -> buckets [b, h, rounds, n]."""
    rotated = torch.einsum("bhnd,hdrc->bhrnc", keys, rotations.to(keys.dtype))
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


def lsh_attention(q, k, v, buckets, *, window: int, causal: bool) -> torch.Tensor:
    """q, k, v [b, h, n, d], buckets [b, h, rounds, n] -> [b, h, n, d]; see the module docstring."""
    n, head_dim = q.shape[-2:]
    score_dtype = torch.promote_types(q.dtype, torch.float32)  # -1e5 and log-counts need at least float32
    position = torch.arange(n, device=q.device)
    order = (buckets * n + position).argsort(-1)  # [b, h, rounds, n]: by bucket, ties by position
    rank = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))  # token -> its place
    sorted_q, sorted_k, sorted_v = (x.unsqueeze(2).take_along_dim(order.unsqueeze(-1), dim=3) for x in (q, k, v))
    sorted_bucket = buckets.take_along_dim(order, dim=-1)
    # Bucket and place, in every round, of the token at each sorted place: [b, h, sorting round, round, n].
    their_bucket = buckets.unsqueeze(2).take_along_dim(order.unsqueeze(3), dim=-1)
    their_rank = rank.unsqueeze(2).take_along_dim(order.unsqueeze(3), dim=-1)

    # Sorted place s reads the key at place s - offset, through views of padded copies (no copy per offset).
    reach = min(window, n) - 1
    pad = (reach, 0 if causal else reach)
    padded_k, padded_v = (F.pad(x, (0, 0, *pad)) for x in (sorted_k, sorted_v))
    padded_sorted_bucket = F.pad(sorted_bucket, pad, value=-1)  # -1 is no token's bucket: never visible
    padded_bucket = F.pad(their_bucket, pad, value=-1)
    padded_rank = F.pad(their_rank, pad)
    offsets = range(reach + 1) if causal else range(-reach, reach + 1)

    def at_offset(offset):  # the padded places read by sorted places 0..n-1
        return slice(reach - offset, reach - offset + n)

    scores, visible = [], []
    for offset in offsets:
        keys = at_offset(offset)
        distance = their_rank - padded_rank[..., keys]
        in_window = (distance >= 0) & (distance < window) if causal else distance.abs() < window
        seen = (their_bucket == padded_bucket[..., keys]) & in_window  # in each round, [b, h, R, R, n]
        copies = seen.sum(3).clamp_min(1).to(score_dtype)
        visible.append(sorted_bucket == padded_sorted_bucket[..., keys])  # in the sorting round itself
        if offset == 0:
            score = torch.full_like(copies, SELF_LOGIT)
        else:
            score = (sorted_q * padded_k[..., keys, :]).sum(-1).to(score_dtype) * head_dim**-0.5
        scores.append(score - copies.log())
    row_max, weights, row_sum = exp_scores(torch.stack(scores, -1), torch.stack(visible, -1))
    numerator = sum(weights[..., slot, None] * padded_v[..., at_offset(offset), :]
                    for slot, offset in enumerate(offsets))

    def unsort(x):  # [b, h, R, n (sorted), ·] -> [b, h, R, n (positions), ·]
        return x.take_along_dim(rank.unsqueeze(-1), dim=3)

    return merge_pieces(unsort(row_max), unsort(numerator), unsort(row_sum), dim=2).to(q.dtype)


def lsh_attention_reference(q, k, v, buckets, *, window: int, causal: bool) -> torch.Tensor:
    """The same attention with plain loops: per query the union of its key sets over rounds, itself
    only when that union holds nothing else, and one softmax (no padding)."""
    batch, heads, rounds, n = buckets.shape
    rows = []
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                seen = set()
                for r in range(rounds):
                    same = [j for j in range(n) if buckets[b, h, r, j] == buckets[b, h, r, i]]  # in sorted order
                    place = same.index(i)
                    seen.update(same[max(0, place - window + 1) : place + 1 if causal else place + window])
                keys = sorted(seen - {i}) or [i]
                weights = torch.softmax(k[b, h, keys] @ q[b, h, i] * q.shape[-1] ** -0.5, 0)
                rows.append(weights @ v[b, h, keys])
    return torch.stack(rows).view(q.shape)


@register_attention("reformer")
class ReformerAttention(AttentionLayer):
    """LSH attention with a shared query/key projection; options as named in the paper:
    n_hashes (rounds), n_buckets (1, or even), chunk_size (w above), fresh_rotations."""

    def __init__(self, *, dim: int, num_heads: int, causal: bool, n_hashes: int = 4, n_buckets: int = 32,
                 chunk_size: int = 64, fresh_rotations: bool = True):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if n_hashes < 1:
            raise ConfigurationError(f"n_hashes={n_hashes} must be at least 1; set model.attention.n_hashes=.")
        if n_buckets != 1 and (n_buckets < 2 or n_buckets % 2):
            raise ConfigurationError(
                f"n_buckets={n_buckets} must be 1 or even (angular LSH gives 2 buckets per rotation column); "
                f"set model.attention.n_buckets=."
            )
        if chunk_size < 1:
            raise ConfigurationError(f"chunk_size={chunk_size} must be at least 1; set model.attention.chunk_size=.")
        self.n_hashes, self.n_buckets, self.chunk_size = n_hashes, n_buckets, chunk_size
        self.fresh_rotations = fresh_rotations
        self.qkv = nn.Linear(dim, 2 * dim, bias=False)  # shared query/key, and value
        self.register_buffer("rotations", torch.randn(num_heads, self.head_dim, n_hashes, n_buckets // 2))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[batch, seq, dim] -> query, key = query / |query|, value; each [batch, heads, seq, head_dim]."""
        batch, seq, _ = x.shape
        shared, v = self.qkv(x).view(batch, seq, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return shared, F.normalize(shared, dim=-1), v

    def buckets(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [b, h, n, d] -> buckets [b, h, n_hashes, n]."""
        if self.n_buckets == 1:
            return torch.zeros(*keys.shape[:2], self.n_hashes, keys.shape[2], dtype=torch.long, device=keys.device)
        fresh = self.training and self.fresh_rotations
        return hash_buckets(keys, torch.randn_like(self.rotations) if fresh else self.rotations)

    def attend(self, q, k, v, padding_mask):
        buckets = self.buckets(k)
        if padding_mask is not None:
            buckets = buckets.masked_fill(padding_mask[:, None, None, :], self.n_buckets)
        return lsh_attention(q, k, v, buckets, window=self.chunk_size, causal=self.causal)
