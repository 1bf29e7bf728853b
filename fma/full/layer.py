"""Exact softmax attention through PyTorch's scaled_dot_product_attention."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# backend "auto": the first of these that supports the inputs (the CPU has math only, in effect).
AUTO_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# One query against the cache (decoding): cuDNN builds an execution plan per key length, which every
# step changes (benchmarks/s7/decode_before_fix/), so "auto" leaves it out.
DECODE_ORDER = AUTO_ORDER[1:]


def visibility_mask(padding_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[batch, seq] padding (True = pad) -> [batch, 1, seq, seq] bool, True where a query may look.

    Every position may see itself, so that a padded query never faces an all-masked row (NaN);
    real queries never see a pad.
    """
    seq = padding_mask.shape[-1]
    allowed = ~padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=padding_mask.device).tril()
    return allowed | torch.eye(seq, dtype=torch.bool, device=padding_mask.device)


@register_attention("full")
class FullAttention(AttentionLayer):
    """O(n^2) exact attention; `backend` pins the SDPA kernel. "auto" takes the fastest that accepts
    the inputs, in the order of `AUTO_ORDER`: on Hopper cuDNN runs causal fwd+bwd at about 1.5x
    FlashAttention-2 (shared/docs/anchors.md), and PyTorch's own order tries flash first."""

    def __init__(self, *, dim: int, num_heads: int, causal: bool, backend: str = "auto"):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if backend != "auto" and backend not in SDPA_BACKENDS:
            raise ConfigurationError(
                f"Unknown SDPA backend {backend!r}; use model.attention.backend= one of auto, "
                f"{', '.join(SDPA_BACKENDS)}."
            )
        self.backend = backend

    def attend(self, q, k, v, padding_mask):
        if padding_mask is None:
            return self.sdpa(q, k, v, is_causal=self.causal)
        return self.sdpa(q, k, v, attn_mask=visibility_mask(padding_mask, self.causal))

    def sdpa(self, q, k, v, order=AUTO_ORDER, **kwargs):
        """scaled_dot_product_attention on the kernel `backend` names ("auto": the first of `order` that runs)."""
        if self.backend == "auto":
            with sdpa_kernel(order, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        with sdpa_kernel(SDPA_BACKENDS[self.backend]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def decode_state(self, q, k, v):
        """A KV cache: (keys, values, length), buffers [batch, heads, capacity, head_dim] whose first `length`
        rows hold every position so far; 2 * batch * heads * capacity * head_dim numbers, capacity < 1.25 n +
        1024. A step writes its row in place (no O(n) copy per token), so a state is consumed by `step`:
        to branch, copy its buffers."""
        n = k.shape[2]
        return cache_with_room(k, n), cache_with_room(v, n), n

    def decode_step(self, q, k, v, state):
        """The new query sees every cached key and itself: no mask."""
        keys, values, length = state
        if length == keys.shape[2]:
            keys, values = cache_with_room(keys, length), cache_with_room(values, length)
        keys[:, :, length:length + 1], values[:, :, length:length + 1] = k, v
        out = self.sdpa(q, keys[:, :, :length + 1], values[:, :, :length + 1], order=DECODE_ORDER)
        return out, (keys, values, length + 1)


def cache_with_room(x: torch.Tensor, length: int) -> torch.Tensor:
    """x's first `length` rows (dim 2) in a new buffer with room for max(1024, length / 4) more."""
    buffer = x.new_empty(*x.shape[:2], length + max(1024, length // 4), x.shape[3])
    buffer[:, :, :length] = x[:, :, :length]
    return buffer
