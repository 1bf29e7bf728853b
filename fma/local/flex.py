"""Sliding-window attention on FlexAttention: the GPU path.

FlexAttention skips every key block outside the window and masks only the partial ones, so time
and memory stay O(n * window) like the block-wise path (which the GPU tests hold it to).
"""

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def sliding_window_block_mask(n: int, window: int, causal: bool, device: torch.device, compiled: bool):
    """FlexAttention block mask of the window; `compiled`: built through its own compiled kernel
    (eager callers; never n x n), else as plain operations inside a compiled model, which evaluate
    the window over all n x n pairs once per forward (open: build it from block indices instead)."""
    def visible(batch, head, query, key):
        offset = query - key
        return (offset >= 0) & (offset < window) if causal else (offset < window) & (offset > -window)

    return create_block_mask(visible, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, _compile=compiled)


cached_block_mask = functools.lru_cache(maxsize=16)(sliding_window_block_mask)


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_sliding_window(q, k, v, *, window: int, causal: bool):
    """q, k, v [batch, heads, n, d] (CUDA, no padding) -> [batch, heads, n, d]. Eager: a block mask
    cached per shape and FlexAttention compiled on its own; inside a compiled model, both are traced
    into the model's graph (a nested compile would break it)."""
    if torch.compiler.is_compiling():
        block_mask = sliding_window_block_mask(q.shape[-2], window, causal, q.device, compiled=False)
        return flex_attention(q, k, v, block_mask=block_mask)
    block_mask = cached_block_mask(q.shape[-2], window, causal, q.device, compiled=True)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask)
