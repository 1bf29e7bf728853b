"""Sliding-window attention on FlexAttention: the GPU path.

FlexAttention skips every key block outside the window and masks only the partial ones, so time
and memory stay O(n * window) like the block-wise path (which the GPU tests hold it to). The block
mask is built from block indices (`sliding_window_block_mask`), never by evaluating the window over
n x n pairs, eagerly and inside a compiled model alike.
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's tile of queries and of keys
# Distinct input shapes one process may run through the eager path's compiled FlexAttention. Past
# dynamo's default limit (8) it would silently run FlexAttention eagerly, which materialises n x n
# scores; with this limit a process compiles one kernel per shape and raises past the limit instead.
MAX_SHAPES = 256


def sliding_window_block_mask(n: int, window: int, causal: bool, device: torch.device) -> BlockMask:
    """The window's block mask for length n: per query block, the key blocks it touches, split into
    full ones (every pair visible, no mask evaluated) and partial ones (`visible` decides per pair;
    also every pair of blocks that reaches past n, as FlexAttention's own builder marks them).
    Plain tensor operations on O(n / B * window / B) candidates (which a compiled model traces), into
    the [n / B, n / B] index tables FlexAttention takes."""
    def visible(batch, head, query, key):
        offset = query - key
        return (offset >= 0) & (offset < window) if causal else (offset < window) & (offset > -window)

    blocks = -(-n // BLOCK)
    reach = -(-(window - 1) // BLOCK) + 1  # key blocks on either side that can hold a visible key
    query_block = torch.arange(blocks, device=device)[:, None]
    key_block = query_block + torch.arange(-reach, (0 if causal else reach) + 1, device=device)
    # Over a (query block, key block) pair, query - key spans (i - j) B - (B - 1) .. (i - j) B + (B - 1).
    lowest = (query_block - key_block) * BLOCK - (BLOCK - 1)
    highest = lowest + 2 * (BLOCK - 1)
    seen_lowest, seen_highest = (0 if causal else 1 - window), window - 1
    exists = (key_block >= 0) & (key_block < blocks)
    touched = exists & (highest >= seen_lowest) & (lowest <= seen_highest)
    whole = ((query_block + 1) * BLOCK <= n) & ((key_block + 1) * BLOCK <= n)  # no position past n
    full = exists & whole & (lowest >= seen_lowest) & (highest <= seen_highest)

    def counts_and_indices(selected):
        """[1, 1, blocks] counts and [1, 1, blocks, blocks] key blocks, the selected ones first (the
        width FlexAttention expects; rows are 0 past their count)."""
        ordered = torch.where(selected, key_block, blocks).sort(dim=1).values[:, :blocks]
        indices = F.pad(torch.where(ordered < blocks, ordered, 0), (0, blocks - ordered.shape[1])).to(torch.int32)
        return selected.sum(1, dtype=torch.int32)[None, None], indices[None, None]

    return BlockMask.from_kv_blocks(*counts_and_indices(touched & ~full), *counts_and_indices(full),
                                    BLOCK_SIZE=BLOCK, mask_mod=visible, seq_lengths=(n, n))


cached_block_mask = functools.lru_cache(maxsize=16)(sliding_window_block_mask)


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_sliding_window(q, k, v, *, window: int, causal: bool):
    """q, k, v [batch, heads, n, d] (CUDA, no padding) -> [batch, heads, n, d]. Eager: a block mask
    cached per shape and FlexAttention compiled on its own, one kernel per shape (up to MAX_SHAPES);
    inside a compiled model, both are traced into the model's graph (a nested compile would break it)."""
    if torch.compiler.is_compiling():
        block_mask = sliding_window_block_mask(q.shape[-2], window, causal, q.device)
        return flex_attention(q, k, v, block_mask=block_mask)
    block_mask = cached_block_mask(q.shape[-2], window, causal, q.device)
    with torch._dynamo.config.patch(recompile_limit=MAX_SHAPES, accumulated_recompile_limit=MAX_SHAPES,
                                    fail_on_recompile_limit_hit=True):
        return compiled_flex_attention()(q, k, v, block_mask=block_mask)
