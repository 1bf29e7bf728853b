"""Linear attention (Katharopoulos et al. 2020) with elu(x) + 1 features: `model=linear` (`chunk.py`).

backend: "torch" runs `chunk.py` (any device and dtype); "fla" runs the causal form's numerator on
flash-linear-attention's chunked Triton kernels (`fla.py`; CUDA, fla-core installed: the `gpu`
extra), the non-causal form on `chunk.py`'s two matmuls either way; "auto" is torch for now: on
the H200 (triton 3.6, fla-core 0.6.0) fla's layer is 1.2-1.5x faster than torch's at 4K-128K
(benchmarks/s10/linear_fla/), but its first call autotunes for about 77 s and its GPU numerics test
has not passed yet (benchmarks/s10/fla_tests_call2.log).
"""

import torch

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention
from .chunk import linear_attention, linear_attention_step, running_sums
from .fla import fla_available, fla_causal_linear_attention

BACKENDS = ("torch", "fla")


@register_attention("linear")
class LinearAttention(AttentionLayer):
    """Linear attention with elu + 1 features (no 1/sqrt(d): the feature map replaces the softmax).

    chunk_size: positions per chunk in the causal form (quadratic within, recurrent across).
    eps: added to the normaliser.
    backend: auto, torch or fla (the module docstring); picks only the implementation.
    """

    def __init__(self, *, dim: int, num_heads: int, causal: bool, chunk_size: int = 64, eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if chunk_size < 1:
            raise ConfigurationError(f"chunk_size={chunk_size} must be at least 1; set model.attention.chunk_size=.")
        if eps < 0:
            raise ConfigurationError(f"eps={eps} must not be negative; set model.attention.eps=.")
        if backend != "auto" and backend not in BACKENDS:
            raise ConfigurationError(
                f"Unknown linear backend {backend!r}; use model.attention.backend= one of auto, {', '.join(BACKENDS)}."
            )
        self.chunk_size, self.eps, self.backend = chunk_size, eps, backend
        if backend == "fla" and causal and not fla_available():
            raise ConfigurationError(
                "backend=fla needs fla-core (pip install -e '.[gpu]'; it did not import here); "
                "set model.attention.backend=auto or torch."
            )

    def attend(self, q, k, v, padding_mask):
        if self.causal and self.uses_fla(q):
            return fla_causal_linear_attention(q, k, v, eps=self.eps, padding_mask=padding_mask)
        return linear_attention(q, k, v, causal=self.causal, chunk_size=self.chunk_size, eps=self.eps,
                                padding_mask=padding_mask)

    def uses_fla(self, q) -> bool:
        if self.backend == "fla" and not q.is_cuda:
            raise ConfigurationError(
                f"backend=fla needs CUDA tensors (got device {q.device}); set model.attention.backend=auto or torch."
            )
        return self.backend == "fla"

    def decode_state(self, q, k, v):
        """The running sums of `chunk.running_sums`: batch * heads * (head_dim + 1) * head_dim numbers, O(1) in n."""
        return running_sums(k, v)

    def decode_step(self, q, k, v, state):
        return linear_attention_step(q, k, v, state, eps=self.eps)
