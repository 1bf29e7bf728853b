"""Sliding-window attention: `model=local`.

`window` = w, exactly:
- causal: query i sees keys j with i - w < j <= i (w tokens: itself and the w - 1 before it);
- bidirectional: query i sees keys j with |i - j| < w (w - 1 tokens each side and itself).
A window of at least n is full attention. CUDA inputs without padding run on FlexAttention
(`flex.py`), everything else block by block (`blockwise.py`); `naive.py` is the n x n reference.
"""

import torch
import torch.nn.functional as F

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention
from .blockwise import neighbour_block_attention
from .flex import flex_sliding_window


@register_attention("local")
class LocalAttention(AttentionLayer):
    """Sliding-window softmax attention; `window` = w as defined in the module docstring.

    The default w = 128 = 2m for FMA's default m = 64: at least FMA's fine near field on every side.
    """

    def __init__(self, *, dim: int, num_heads: int, causal: bool, window: int = 128):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if window < 1:
            raise ConfigurationError(
                f"window={window} must be at least 1 (the query itself); set model.attention.window=."
            )
        self.window = window

    def attend(self, q, k, v, padding_mask):
        if q.is_cuda and padding_mask is None:
            return flex_sliding_window(q, k, v, window=self.window, causal=self.causal)
        _, numerator, denominator = neighbour_block_attention(
            q, k, v, block=min(self.window, q.shape[-2]), causal=self.causal, window=self.window,
            padding_mask=padding_mask,
        )
        return (numerator / denominator).to(q.dtype)

    def decode_state(self, q, k, v):
        """The keys and values the next query sees besides its own: the last w - 1, so
        2 * batch * heads * min(n, w - 1) * head_dim numbers, whatever the length."""
        return self.last_keys(k), self.last_keys(v)

    def decode_step(self, q, k, v, state):
        k, v = torch.cat([state[0], k], dim=-2), torch.cat([state[1], v], dim=-2)  # the query's whole window
        return F.scaled_dot_product_attention(q, k, v), (self.last_keys(k), self.last_keys(v))

    def last_keys(self, x):
        """[..., n, d] -> its last min(n, w - 1) positions."""
        return x[..., max(x.shape[-2] - (self.window - 1), 0):, :]
