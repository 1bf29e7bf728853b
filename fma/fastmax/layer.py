"""Fastmax (Gerami et al. 2024), factorised polynomial attention: `model=fastmax` (`chunk.py`)."""

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention
from .chunk import fastmax_attention, gradient_rows


@register_attention("fastmax")
class FastmaxAttention(AttentionLayer):
    """Fastmax: weights f(q.k) = sum_{l<=p} (q.k)^l / l! on normalised q and k (no 1/sqrt(d): |q.k| <= 1).

    p: degree of f, 1 (O(n d^2)) or 2 (O(n d^3)).
    chunk_size: positions per chunk in the causal form (quadratic within, recurrent across).
    """

    def __init__(self, *, dim: int, num_heads: int, causal: bool, p: int = 2, chunk_size: int = 512):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if p not in (1, 2):
            raise ConfigurationError(f"p={p} is not a supported degree; set model.attention.p=1 or 2.")
        if chunk_size < 1:
            raise ConfigurationError(f"chunk_size={chunk_size} must be at least 1; set model.attention.chunk_size=.")
        self.p, self.chunk_size = p, chunk_size
        self.register_buffer("gradient_rows", gradient_rows(self.head_dim, p, "cpu"), persistent=False)

    def attend(self, q, k, v, padding_mask):
        return fastmax_attention(q, k, v, p=self.p, causal=self.causal, chunk_size=self.chunk_size,
                                 padding_mask=padding_mask, feature_rows=self.gradient_rows)
