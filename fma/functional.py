"""Fast Multipole Attention as a function of queries, keys, values and their coarse summaries.

Notation (shared/docs/fma-algorithm.md): `m` = block_size (fine block), `p` = rank (summaries per cell),
coarse levels l = 1..L with cell width w_l = m * 2^(l-1), L = log2(n/m) - 1. A valid length n has
n/m a power of two and at least 4; `padded_length` gives the valid length a sequence is padded to.

The portable path is the block-local view: every fine block's m queries share one gathered key set
(neighbour fine blocks plus their coarse cells at every level) under a fixed mask, so memory is
O(n * (m + p*L)) per head and no n x n tensor ever exists.
"""

import functools
import importlib.util
import math
import os

import torch

from .local import block_neighbourhoods, exp_scores


def kernel_output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised buffer for a fused kernel to fill; full of NaN when FMA_TRITON_POISON=1, so
    that a test sees every element a kernel fails to write."""
    if os.environ.get("FMA_TRITON_POISON") == "1":
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def padded_length(n: int, block_size: int) -> int:
    """The smallest valid length >= n: block_size * 2^k with at least 4 blocks."""
    blocks = max(4, math.ceil(n / block_size))
    return block_size * (1 << (blocks - 1).bit_length())


def level_widths(n: int, block_size: int) -> list[int]:
    """Cell widths of coarse levels 1..L for a valid length n: m, 2m, ..., n/4."""
    return [block_size << (level - 1) for level in range(1, (n // block_size).bit_length() - 1)]


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
    return BACKENDS[backend](
        q, k, v, coarse_k, coarse_v, block_size=block_size, rank=rank, causal=causal,
        scale_coarse=scale_coarse, key_padding_mask=key_padding_mask, coarse_counts=coarse_counts,
    )


def block_local_attention(q, k, v, coarse_k, coarse_v, *, block_size, rank, causal, scale_coarse,
                          key_padding_mask, coarse_counts):
    """The portable backend: gather each fine block's key set, then dense attention per block."""
    batch, heads, n, head_dim = q.shape
    m, num_blocks = block_size, n // block_size
    key_index, allowed = block_local_layout(n, m, rank, causal, q.device)

    # Every key (fine, then level 1, ..., level L) with its additive logit term, gathered per block.
    keys = torch.cat([k, *coarse_k], dim=2)[:, :, key_index]  # [batch, heads, blocks, S, d]
    values = torch.cat([v, *coarse_v], dim=2)[:, :, key_index]
    score_dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32
    key_bias = _key_logit_bias(
        batch, n, m, rank, scale_coarse, key_padding_mask, coarse_counts, score_dtype, q.device
    )
    key_bias = key_bias[:, key_index][:, None, :, None, :]  # [batch, 1, blocks, 1, S]

    queries = q.unflatten(2, (num_blocks, m))
    scores = torch.einsum("bhnqd,bhnsd->bhnqs", queries, keys).to(score_dtype) * head_dim**-0.5
    _, unnormalised, total = exp_scores(scores + key_bias, allowed)  # a row seeing no key: all zero
    weights = (unnormalised / torch.where(total > 0, total, 1.0)).to(v.dtype)
    out = torch.einsum("bhnqs,bhnsd->bhnqd", weights, values)
    return out.reshape(batch, heads, n, head_dim)


def _triton_backend(*args, **kwargs):
    """The fused GPU kernels (fma/triton_attention.py), imported on first use: importing triton
    together with the package would fix TRITON_INTERPRET for the whole process."""
    from .triton_attention import triton_block_local_attention

    return triton_block_local_attention(*args, **kwargs)


BACKENDS = {"torch": block_local_attention, "triton": _triton_backend}


def triton_supports(q: torch.Tensor, block_size: int) -> bool:
    """Whether the triton backend handles q's device, dtype and shape (what backend "auto" asks)."""
    if not q.is_cuda or not triton_installed():
        return False
    from .triton_attention import SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    return (block_size in SUPPORTED_BLOCK_SIZES and q.shape[-1] in SUPPORTED_HEAD_DIMS
            and q.dtype in SUPPORTED_DTYPES and q.shape[0] * q.shape[1] <= 65535)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _key_logit_bias(batch, n, m, rank, scale_coarse, key_padding_mask, coarse_counts, dtype, device):
    """[batch, n + sum_l (n/w_l)*p]: per fine key 0 or -inf (pad); per summary log(count) if
    scale_coarse else 0, and -inf when it stands for no real token (log 0 = -inf does that too)."""
    fine = torch.zeros(batch, n, dtype=dtype, device=device)
    if key_padding_mask is not None:
        fine = fine.masked_fill(key_padding_mask, -math.inf)
    parts = [fine]
    for level, width in enumerate(level_widths(n, m)):
        if coarse_counts is None:
            counts = torch.full((batch, n // width * rank), width / rank, dtype=dtype, device=device)
        else:
            counts = coarse_counts[level].to(dtype)
        parts.append(counts.log() if scale_coarse else torch.zeros_like(counts).masked_fill(counts == 0, -math.inf))
    return torch.cat(parts, dim=1)


@functools.lru_cache(maxsize=32)
def block_local_layout(n: int, block_size: int, rank: int, causal: bool, device: torch.device):
    """Which keys each fine block's queries see, computed once per shape.

    Returns key_index [n/m, S] long, indices into cat([k, level-1 summaries, ..., level-L]), and
    allowed [n/m, m, S] bool (query within block x slot). S = 2m + 2pL causal, 3m + 3pL bidirectional.
    A slot whose block or cell lies outside the sequence points at key 0 and is not allowed.
    Every coarse cell is at least m wide, so all m queries of a block see the same cells.
    """
    m, p = block_size, rank
    first_query = torch.arange(n // m) * m
    # Fine: the previous block and the own block (causal), or blocks b-1, b, b+1 (bidirectional).
    _, fine = block_neighbourhoods(n, m, causal)
    slots, exists = [fine], [(fine >= 0) & (fine < n)]

    # Coarse: at each level the cells of the interaction list, p summaries per cell.
    offset = n
    for width in level_widths(n, m):
        num_cells = n // width
        for cell in coarse_cells(first_query, width, causal):
            slots.append(offset + cell[:, None] * p + torch.arange(p))
            exists.append(((cell >= 0) & (cell < num_cells))[:, None].expand(-1, p))
        offset += num_cells * p

    exists = torch.cat(exists, dim=1)
    key_index = torch.cat(slots, dim=1).masked_fill(~exists, 0)
    allowed = exists[:, None, :].repeat(1, m, 1)
    if causal:  # within the own block (slots m..2m-1) a query sees tokens up to itself
        allowed[:, :, m : 2 * m] &= torch.ones(m, m, dtype=torch.bool).tril()
    return key_index.to(device), allowed.to(device)


def coarse_cells(first_query: torch.Tensor, width: int, causal: bool) -> list[torch.Tensor]:
    """Per block (given by its first query), the level's interaction-list cells; -1 or >= n/w: none.

    Causal: parent P = i // 2w, half h: cell 2P-2, and 2P-1 when h = 1.
    Bidirectional: cell g = i // w; even g: g-2, g+2, g+3; odd g: g-3, g-2, g+2.
    """
    cell = first_query // width
    if causal:
        parent, half = cell // 2, cell % 2
        return [2 * parent - 2, torch.where(half == 1, 2 * parent - 1, -1)]
    even = cell % 2 == 0
    return [
        torch.where(even, cell - 2, cell - 3),
        torch.where(even, cell + 2, cell - 2),
        torch.where(even, cell + 3, cell + 2),
    ]
