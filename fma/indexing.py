"""Index arithmetic shared by the attention kinds: valid lengths, levels, interaction lists, layouts.

Notation (shared/docs/fma-algorithm.md): `m` = block_size (fine block), `p` = rank (summaries per cell),
coarse levels l = 1..L with cell width w_l = m * 2^(l-1), L = log2(n/m) - 1. A valid length n has
n/m a power of two and at least 4; `padded_length` gives the valid length a sequence is padded to.
This module is at the bottom of `fma`: it imports nothing else from the package.
"""

import functools
import math

import torch


def padded_length(n: int, block_size: int) -> int:
    """The smallest valid length >= n: block_size * 2^k with at least 4 blocks."""
    blocks = max(4, math.ceil(n / block_size))
    return block_size * (1 << (blocks - 1).bit_length())


def level_widths(n: int, block_size: int) -> list[int]:
    """Cell widths of coarse levels 1..L for a valid length n: m, 2m, ..., n/4."""
    return [block_size << (level - 1) for level in range(1, (n // block_size).bit_length() - 1)]


def coarse_cells(first_query: torch.Tensor, width: int, causal: bool) -> list[torch.Tensor]:
    """The interaction list at one level: per block (given by its first query), the cells of width
    `width` it attends to; -1 or >= n/w: none.

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


def block_neighbourhoods(n: int, block: int, causal: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions for attention between neighbouring blocks.

    Returns query positions [blocks, block] and key positions [blocks, keys]: the previous block,
    the own block and, unless causal, the next one (just the own block when there is one block).
    The last block's query positions past n - 1 repeat n - 1, so every row has a real query; key
    positions outside [0, n) are for the caller to mask.
    """
    blocks = -(-n // block)
    positions = torch.arange(blocks * block, device=device).view(blocks, block)
    shifts = (0,) if blocks == 1 else (-1, 0) if causal else (-1, 0, 1)
    keys = torch.cat([positions + shift * block for shift in shifts], dim=1)
    return positions.clamp(max=n - 1), keys


def at_positions(x: torch.Tensor, positions: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """x indexed along `dim` by `positions` (any shape, clamped into range): that dim becomes positions.shape."""
    index = positions.clamp(0, x.shape[dim] - 1)
    return x.index_select(dim, index.flatten()).unflatten(dim, index.shape)


@functools.lru_cache(maxsize=32)
def block_local_layout(n: int, block_size: int, rank: int, causal: bool, device: torch.device):
    """Which keys each fine block's queries see in Fast Multipole Attention, computed once per shape,
    on `device` (no host-to-device copy, also where a compiled graph recomputes it).

    Returns key_index [n/m, S] long, indices into cat([k, level-1 summaries, ..., level-L]), and
    allowed [n/m, m, S] bool (query within block x slot). S = 2m + 2pL causal, 3m + 3pL bidirectional.
    A slot whose block or cell lies outside the sequence points at key 0 and is not allowed.
    Every coarse cell is at least m wide, so all m queries of a block see the same cells.
    """
    m, p = block_size, rank
    first_query = torch.arange(n // m, device=device) * m
    # Fine: the previous block and the own block (causal), or blocks b-1, b, b+1 (bidirectional).
    _, fine = block_neighbourhoods(n, m, causal, device)
    slots, exists = [fine], [(fine >= 0) & (fine < n)]

    # Coarse: at each level the cells of the interaction list, p summaries per cell.
    offset = n
    for width in level_widths(n, m):
        num_cells = n // width
        for cell in coarse_cells(first_query, width, causal):
            slots.append(offset + cell[:, None] * p + torch.arange(p, device=device))
            exists.append(((cell >= 0) & (cell < num_cells))[:, None].expand(-1, p))
        offset += num_cells * p

    exists = torch.cat(exists, dim=1)
    key_index = torch.cat(slots, dim=1).masked_fill(~exists, 0)
    allowed = exists[:, None, :].repeat(1, m, 1)
    if causal:  # within the own block (slots m..2m-1) a query sees tokens up to itself
        allowed[:, :, m : 2 * m] &= torch.ones(m, m, dtype=torch.bool, device=device).tril()
    return key_index, allowed


def key_logit_bias(batch, n, m, rank, scale_coarse, key_padding_mask, coarse_counts, dtype, device):
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
