"""H-Transformer-1D (Zhu & Soricut 2021): `model=htransformer`; the computation is in `blockwise.py`."""

from ..downsample import Downsample
from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..multipole.layer import summarised_attention
from ..registry import register_attention
from .blockwise import hierarchical_attention


@register_attention("htransformer")
class HTransformer1D(AttentionLayer):
    """H-Transformer-1D attention; block_size is the paper's Nr (tokens per block at every level).

    Causal, it is FMA with a fixed averaging basis: fine blocks m = Nr, at coarse level l each cell's
    p = Nr / 2 summaries are means of 2^l consecutive tokens, weighted by the tokens they stand for
    (scale_coarse), over the same interaction lists (tests/test_htransformer_blockwise_vs_naive.py: equal
    to rounding, padding included). So causal H-Transformer-1D runs FMA's path, on its fused kernels
    where they take the input; bidirectional (queries averaged too) runs `blockwise.py`.
    """

    def __init__(self, *, dim: int, num_heads: int, causal: bool, block_size: int = 16):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if block_size < 2 or block_size % 2:
            raise ConfigurationError(
                f"block_size={block_size} must be even and at least 2 (a block at level l holds block_size/2 "
                f"coarse tokens of level l+1); set model.attention.block_size=."
            )
        self.block_size = block_size
        self.average = Downsample("avgpool", head_dim=self.head_dim, block_size=block_size, rank=block_size // 2,
                                  max_seq_len=block_size)  # no parameters: any length

    def attend(self, q, k, v, padding_mask):
        if self.causal:
            return summarised_attention(q, k, v, padding_mask, key_downsample=self.average,
                                        value_downsample=self.average, block_size=self.block_size, causal=True,
                                        scale_coarse=True, backend="auto")
        return hierarchical_attention(q, k, v, block_size=self.block_size, causal=False, padding_mask=padding_mask)
