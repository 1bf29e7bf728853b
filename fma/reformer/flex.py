"""Reformer LSH attention on FlexAttention: backend "flex" of `model=reformer` (the GPU path).

The same attention as `blockwise.lsh_attention` (read its module docstring for the key sets and why
they are fixed by the prefix), computed as one FlexAttention call over every round at once:

1. per round, q, k, v gathered into the round's sorted order (by bucket, ties by position) and the
   rounds stacked on the head axis, [b, h * rounds, n, d];
2. a block mask from block indices that keeps, per block of sorted places, the key blocks holding a
   place fewer than w = chunk_size places away (before it, causal; either side, bidirectional):
   the blocks `blockwise.py` reads (own and previous, bidirectional also next), O(n * w) work;
3. a score_mod that reproduces the exact key sets inside those blocks: key j is visible to query i
   in round r when they share r's bucket and lie fewer than w places apart (causal: j at or before
   i); the own key gets logit -1e5; a key visible in c rounds gets -log c in each round (the
   duplicate correction);
4. each round's output and log-sum-exp scattered back to sequence positions and the rounds merged
   by log-sum-exp: one softmax over the union of the key sets, as `blockwise.merge_pieces` does.

The place test uses one integer code per token and round, code = place + group * (w + 1), where
group counts the bucket changes before the place in the sorted order: two tokens share a bucket
and lie fewer than w places apart exactly when their codes differ by less than w (different groups
differ by more than w). One subtraction per pair and round, in int32 where the codes fit.

The sorted sequence is padded with zeros to whole FlexAttention blocks; padded places get codes
below every real code by more than w, so no real query sees them (they see each other and drop).
Causality: the key sets are those of `blockwise.py`, so no output at a position <= t depends on
anything after t (hidden pairs get exactly zero weight; the tests check the gradient is zero).
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from ..local.flex import MAX_SHAPES, compiled_flex_attention
from .blockwise import SELF_LOGIT

BLOCK = 128  # FlexAttention's tile of queries and of keys (sorted places)


def window_block_mask(n: int, window: int, causal: bool, device: torch.device) -> BlockMask:
    """For a length n (a multiple of BLOCK): per block of sorted query places, the key blocks holding
    a place fewer than `window` places before (causal: or at) the query, bidirectional also after.
    All of them are marked full (no mask_mod evaluated): the score_mod hides what the buckets hide.
    Plain tensor operations on O(n / B * window / B) candidates, into the [n / B, n / B] tables."""
    blocks = n // BLOCK
    reach = -(-(window - 1) // BLOCK)  # key blocks on either side that can hold a visible key
    query_block = torch.arange(blocks, device=device)[:, None]
    key_block = query_block + torch.arange(-reach, (0 if causal else reach) + 1, device=device)
    exists = (key_block >= 0) & (key_block < blocks)
    ordered = torch.where(exists, key_block, blocks).sort(dim=1).values[:, :blocks]
    indices = F.pad(torch.where(ordered < blocks, ordered, 0), (0, blocks - ordered.shape[1])).to(torch.int32)
    counts = exists.sum(1, dtype=torch.int32)
    no_partial = torch.zeros(1, 1, blocks, dtype=torch.int32, device=device)
    return BlockMask.from_kv_blocks(no_partial, torch.zeros_like(indices)[None, None], counts[None, None],
                                    indices[None, None], BLOCK_SIZE=BLOCK, seq_lengths=(n, n))


cached_window_block_mask = functools.lru_cache(maxsize=16)(window_block_mask)


def whole_blocks(n: int) -> int:
    """n sorted places padded to whole FlexAttention blocks."""
    return -(-n // BLOCK) * BLOCK


def code_dtype(padded: int, window: int) -> torch.dtype:
    """int32 where every code (< padded * (window + 2)) fits, else int64."""
    return torch.int32 if padded * (window + 2) < 2**31 else torch.int64


@torch.library.custom_op("fma::reformer_sorted_codes", mutates_args=())
def sorted_codes(buckets: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """buckets [b, h, R, n] -> the sorted order of each round (by bucket, ties by position) and each
    token's place in it (rank), both [b, h, R, n] int64, and for each round's sorted places every round's
    code of the token there, padded to whole blocks, [b, h * R, R, N]. An operator, so that under
    torch.compile the codes are a fixed buffer for the score_mod to read: inlined into FlexAttention's
    template, this index arithmetic failed to lower in inference graphs on CUDA (torch 2.11, "convert
    FlexibleLayout to FixedLayout first")."""
    batch, heads, rounds, n = buckets.shape
    padded = whole_blocks(n)
    position = torch.arange(n, device=buckets.device)
    order = (buckets * n + position).argsort(-1)
    rank = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))  # token -> its place
    sorted_buckets = buckets.take_along_dim(order, dim=-1)
    group = F.pad((sorted_buckets[..., 1:] != sorted_buckets[..., :-1]).cumsum(-1), (1, 0))
    dtype = code_dtype(padded, window)
    code = (rank + group.take_along_dim(rank, dim=-1) * (window + 1)).to(dtype)  # [b, h, R, n] per token
    their_code = code.unsqueeze(2).take_along_dim(order.unsqueeze(3), dim=-1)  # [b, h, sorting R, R, n]
    pad_code = torch.arange(n, padded, device=buckets.device, dtype=dtype) - (padded + window + 1)
    their_code = torch.cat([their_code, pad_code.expand(*their_code.shape[:-1], -1)], dim=-1)
    return order, rank, their_code.flatten(1, 2)


@sorted_codes.register_fake
def _(buckets, window):
    batch, heads, rounds, n = buckets.shape
    padded = whole_blocks(n)
    index = buckets.new_empty(batch, heads, rounds, n, dtype=torch.int64)
    return (index, torch.empty_like(index),
            buckets.new_empty(batch, heads * rounds, rounds, padded, dtype=code_dtype(padded, window)))


def sorted_rounds(q, k, v, buckets, window: int):
    """Per round, q, k, v in sorted order, rounds on the head axis and padded to whole blocks
    ([b, h * R, N, d]); each token's place in each round (rank [b, h, R, n]); and `sorted_codes`'
    codes [b, h * R, R, N]."""
    n = buckets.shape[-1]
    padded = whole_blocks(n)
    order, rank, their_code = sorted_codes(buckets, window)

    def arrange(x):  # [b, h, n, d] -> [b, h * R, N, d]
        gathered = x.unsqueeze(2).take_along_dim(order.unsqueeze(-1), dim=3)
        return F.pad(gathered, (0, 0, 0, padded - n)).flatten(1, 2)

    return arrange(q), arrange(k), arrange(v), rank, their_code


def lsh_score_mod(their_code: torch.Tensor, window: int, causal: bool):
    """The exact key sets as a score_mod over sorted places: their_code [b, h * R, R, N] (see
    `sorted_rounds`); the head index is h * R + r for round r."""
    rounds = their_code.shape[2]

    def seen(query_code, key_code):
        apart = query_code - key_code
        return (apart >= 0) & (apart < window) if causal else (apart < window) & (apart > -window)

    def score_mod(score, batch, head, query, key):
        own = seen(their_code[batch, head, head % rounds, query], their_code[batch, head, head % rounds, key])
        copies = seen(their_code[batch, head, 0, query], their_code[batch, head, 0, key]).to(score.dtype)
        for other in range(1, rounds):
            copies = copies + seen(their_code[batch, head, other, query], their_code[batch, head, other, key])
        logit = torch.where(query == key, SELF_LOGIT, score) - torch.log(copies.clamp_min(1))
        return torch.where(own, logit, -float("inf"))

    return score_mod


def flex_lsh_attention(q, k, v, buckets, *, window: int, causal: bool, attention=None) -> torch.Tensor:
    """q, k, v [b, h, n, d], buckets [b, h, rounds, n] -> [b, h, n, d]: `blockwise.lsh_attention` on
    FlexAttention. `attention`: the FlexAttention callable; by default, eagerly, FlexAttention
    compiled on its own (one kernel per shape, up to local.flex.MAX_SHAPES) and, inside a compiled
    model, FlexAttention itself (traced into the model's graph; a nested compile would break it)."""
    batch, heads, n, head_dim = q.shape
    rounds = buckets.shape[2]
    window = min(window, n)
    sorted_q, sorted_k, sorted_v, rank, their_code = sorted_rounds(q, k, v, buckets, window)
    padded = sorted_q.shape[-2]
    score_mod = lsh_score_mod(their_code, window, causal)
    if attention is not None or torch.compiler.is_compiling():
        block_mask = window_block_mask(padded, window, causal, q.device)
        out, aux = (attention or flex_attention)(sorted_q, sorted_k, sorted_v, score_mod=score_mod,
                                                 block_mask=block_mask, return_aux=AuxRequest(lse=True))
    else:
        block_mask = cached_window_block_mask(padded, window, causal, q.device)
        with torch._dynamo.config.patch(recompile_limit=MAX_SHAPES, accumulated_recompile_limit=MAX_SHAPES,
                                        fail_on_recompile_limit_hit=True):
            out, aux = compiled_flex_attention()(sorted_q, sorted_k, sorted_v, score_mod=score_mod,
                                                 block_mask=block_mask, return_aux=AuxRequest(lse=True))

    def unsort(x):  # [b, h * R, N, ·] (sorted places) -> [b, h, R, n (positions), ·]
        return x.unflatten(1, (heads, rounds))[:, :, :, :n].take_along_dim(rank.unsqueeze(-1), dim=3)

    compute = torch.promote_types(q.dtype, torch.float32)
    out, lse = unsort(out.to(compute)), unsort(aux.lse.to(compute).unsqueeze(-1))
    weight = torch.softmax(lse, dim=2)  # each round's share of the union's softmax
    return (out * weight).sum(2).to(q.dtype)
