"""Sliding-window attention: `model=local`.

`window` = w, exactly:
- causal: query i sees keys j with i - w < j <= i (w tokens: itself and the w - 1 before it);
- bidirectional: query i sees keys j with |i - j| < w (w - 1 tokens each side and itself).
A window of at least n is full attention. CUDA inputs without padding run on FlexAttention
(`flex.py`), everything else block by block (`blockwise.py`); `naive.py` is the n x n reference.
"""

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
