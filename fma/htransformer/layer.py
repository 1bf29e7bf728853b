"""H-Transformer-1D (Zhu & Soricut 2021): `model=htransformer`; the computation is in `blockwise.py`."""

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention
from .blockwise import hierarchical_attention


@register_attention("htransformer")
class HTransformer1D(AttentionLayer):
    """H-Transformer-1D attention; block_size is the paper's Nr (tokens per block at every level)."""

    def __init__(self, *, dim: int, num_heads: int, causal: bool, block_size: int = 16):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if block_size < 2 or block_size % 2:
            raise ConfigurationError(
                f"block_size={block_size} must be even and at least 2 (a block at level l holds block_size/2 "
                f"coarse tokens of level l+1); set model.attention.block_size=."
            )
        self.block_size = block_size

    def attend(self, q, k, v, padding_mask):
        return hierarchical_attention(q, k, v, block_size=self.block_size, causal=self.causal,
                                      padding_mask=padding_mask)
