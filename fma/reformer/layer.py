"""Reformer LSH attention (Kitaev, Kaiser & Levskaya 2020): `model=reformer`; the computation, and
why its causal key sets are fixed by the prefix, are in `blockwise.py`.

backend: "torch" runs `blockwise.lsh_attention` (any device and dtype); "flex" the same key sets on
FlexAttention (`flex.py`; CUDA only: FlexAttention has no backward on the CPU, and no log-sum-exp
when compiled there); "auto" takes flex for CUDA inputs in bf16, fp16 or fp32, torch elsewhere."""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention
from .blockwise import hash_buckets, lsh_attention
from .flex import flex_lsh_attention

BACKENDS = ("torch", "flex")


@register_attention("reformer")
class ReformerAttention(AttentionLayer):
    """LSH attention with a shared query/key projection; options as named in the paper:
    n_hashes (rounds), n_buckets (1, or even), chunk_size (w above), fresh_rotations; backend
    (auto, torch or flex, the module docstring) picks only the implementation."""

    def __init__(self, *, dim: int, num_heads: int, causal: bool, n_hashes: int = 4, n_buckets: int = 32,
                 chunk_size: int = 64, fresh_rotations: bool = True, backend: str = "auto"):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if n_hashes < 1:
            raise ConfigurationError(f"n_hashes={n_hashes} must be at least 1; set model.attention.n_hashes=.")
        if n_buckets != 1 and (n_buckets < 2 or n_buckets % 2):
            raise ConfigurationError(
                f"n_buckets={n_buckets} must be 1 or even (angular LSH gives 2 buckets per rotation column); "
                f"set model.attention.n_buckets=."
            )
        if chunk_size < 1:
            raise ConfigurationError(f"chunk_size={chunk_size} must be at least 1; set model.attention.chunk_size=.")
        if backend != "auto" and backend not in BACKENDS:
            raise ConfigurationError(
                f"Unknown reformer backend {backend!r}; use model.attention.backend= one of auto, {', '.join(BACKENDS)}."
            )
        self.n_hashes, self.n_buckets, self.chunk_size = n_hashes, n_buckets, chunk_size
        self.backend = backend
        self.fresh_rotations = fresh_rotations
        self.qkv = nn.Linear(dim, 2 * dim, bias=False)  # shared query/key, and value
        self.register_buffer("rotations", torch.randn(num_heads, self.head_dim, n_hashes, n_buckets // 2))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[batch, seq, dim] -> query, key = query / |query|, value; each [batch, heads, seq, head_dim]."""
        batch, seq, _ = x.shape
        shared, v = self.qkv(x).view(batch, seq, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return shared, F.normalize(shared, dim=-1), v

    def buckets(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [b, h, n, d] -> buckets [b, h, n_hashes, n]."""
        if self.n_buckets == 1:
            return torch.zeros(*keys.shape[:2], self.n_hashes, keys.shape[2], dtype=torch.long, device=keys.device)
        fresh = self.training and self.fresh_rotations
        return hash_buckets(keys, torch.randn_like(self.rotations) if fresh else self.rotations)

    def attend(self, q, k, v, padding_mask):
        buckets = self.buckets(k)
        if padding_mask is not None:
            buckets = buckets.masked_fill(padding_mask[:, None, None, :], self.n_buckets)
        backend = self.backend
        if backend == "auto":
            backend = "flex" if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32) else "torch"
        if backend == "torch":
            return lsh_attention(q, k, v, buckets, window=self.chunk_size, causal=self.causal)
        if not q.is_cuda:
            raise ConfigurationError(
                f"backend=flex needs CUDA tensors (got device {q.device}): FlexAttention has no backward on the "
                f"CPU; set model.attention.backend=auto or torch."
            )
        return flex_lsh_attention(q, k, v, buckets, window=self.chunk_size, causal=self.causal)
