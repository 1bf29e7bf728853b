"""Linear attention (Katharopoulos et al. 2020) with elu(x) + 1 features: `model=linear` (`chunk.py`)."""

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention
from .chunk import linear_attention, linear_attention_step, running_sums


@register_attention("linear")
class LinearAttention(AttentionLayer):
    """Linear attention with elu + 1 features (no 1/sqrt(d): the feature map replaces the softmax).

    chunk_size: positions per chunk in the causal form (quadratic within, recurrent across).
    eps: added to the normaliser.
    """

    def __init__(self, *, dim: int, num_heads: int, causal: bool, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if chunk_size < 1:
            raise ConfigurationError(f"chunk_size={chunk_size} must be at least 1; set model.attention.chunk_size=.")
        if eps < 0:
            raise ConfigurationError(f"eps={eps} must not be negative; set model.attention.eps=.")
        self.chunk_size, self.eps = chunk_size, eps

    def attend(self, q, k, v, padding_mask):
        return linear_attention(q, k, v, causal=self.causal, chunk_size=self.chunk_size, eps=self.eps,
                                padding_mask=padding_mask)

    def decode_state(self, q, k, v):
        """The running sums of `chunk.running_sums`: batch * heads * (head_dim + 1) * head_dim numbers, O(1) in n."""
        return running_sums(k, v)

    def decode_step(self, q, k, v, state):
        return linear_attention_step(q, k, v, state, eps=self.eps)
