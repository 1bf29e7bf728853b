"""`multipole_attention`: Fast Multipole Attention as a function, one entry to its two paths.

backend "torch" runs `blocklocal.block_local_attention` (any device and dtype); "triton" runs the
fused kernels of `fused.py` (CUDA, or the CPU under TRITON_INTERPRET=1). `triton_supports` says
whether the kernels take an input, which is what backend "auto" asks. Triton is imported only when
the kernels are used: importing it with the package would fix TRITON_INTERPRET for the process.
"""

import torch

from ..indexing import level_widths, padded_length
from ..kernels import TRITON_INSTALLED
from .blocklocal import block_local_attention

BACKENDS = ("torch", "triton")


def multipole_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coarse_k: list[torch.Tensor],
    coarse_v: list[torch.Tensor],
    *,
    block_size: int,
    causal: bool,
    scale_coarse: bool,
    key_padding_mask: torch.Tensor | None = None,
    coarse_counts: list[torch.Tensor] | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """One softmax over fine keys and the coarse summaries of every level -> [batch, heads, n, d].

    q, k, v: [batch, heads, n, d] with n a valid length (see `padded_length`).
    coarse_k[l-1], coarse_v[l-1]: level-l summaries, [batch, heads, (n / w_l) * p, d], cell-major.
    key_padding_mask: [batch, n] bool, True at keys no query may attend to (padding); None: none.
    coarse_counts[l-1]: [batch, (n / w_l) * p], how many real tokens each level-l summary stands
        for; 0 masks the summary, and with `scale_coarse` its logit gets + log(count). None: every
        summary stands for w_l / p tokens (nothing is padded).
    A query that sees no key at all (its whole range is padding) gets output 0, not NaN.
    """
    batch, heads, n, head_dim = q.shape
    if padded_length(n, block_size) != n:
        raise ValueError(
            f"length {n} is not block_size * 2^k with at least 4 blocks (block_size={block_size}); "
            f"pad to padded_length(n, block_size)={padded_length(n, block_size)} and mask the pads"
        )
    widths = level_widths(n, block_size)
    if len(coarse_k) != len(widths) or len(coarse_v) != len(widths):
        raise ValueError(f"n={n}, block_size={block_size} has {len(widths)} coarse levels; got {len(coarse_k)}")
    rank = coarse_k[0].shape[2] * widths[0] // n
    for width, summaries in zip(widths + widths, coarse_k + coarse_v):
        if summaries.shape != (batch, heads, n // width * rank, head_dim):
            raise ValueError(
                f"level of width {width}: expected {n // width * rank} summaries, got shape {tuple(summaries.shape)}"
            )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if backend == "triton":
        from .fused import triton_block_local_attention as attend
    else:
        attend = block_local_attention
    return attend(q, k, v, coarse_k, coarse_v, block_size=block_size, rank=rank, causal=causal,
                  scale_coarse=scale_coarse, key_padding_mask=key_padding_mask, coarse_counts=coarse_counts)


def triton_supports(q: torch.Tensor, block_size: int) -> bool:
    """Whether the fused kernels take q on its device, in its dtype and shape (what "auto" asks)."""
    if not q.is_cuda or not TRITON_INSTALLED:
        return False
    from .fused import SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    return (block_size in SUPPORTED_BLOCK_SIZES and q.shape[-1] in SUPPORTED_HEAD_DIMS
            and q.dtype in SUPPORTED_DTYPES and q.shape[0] * q.shape[1] <= 65535)
