"""The learned basis in plain PyTorch (backend "torch"): cells reshaped, one product per level.

Any device and dtype; the fused path (`fused.py`) is held to it by the tests.
"""

import torch


def real_counts(kind: str, real: torch.Tensor, width: int, rank: int) -> torch.Tensor:
    """real [batch, n] (1 real, 0 pad) -> [batch, (n / w) * p]: real tokens behind each summary:
    those of its segment (avgpool), or those of its cell shared by its p summaries (learned)."""
    if kind == "avgpool":
        return real.unflatten(1, (-1, width // rank)).sum(2)
    return real.unflatten(1, (-1, width)).sum(2).repeat_interleave(rank, 1) / rank


def summarise(kind: str, x: torch.Tensor, width: int, rank: int, weight, bias, counts) -> torch.Tensor:
    """x [batch, heads, n, d], zero at pads -> one level's summaries [batch, heads, (n / w) * p, d].

    weight, bias: the level's parameters (learned kinds; None for avgpool); counts: that level's
    `real_counts`, or None when nothing is padded.
    """
    if kind == "avgpool":
        segment = width // rank
        sums = x.unflatten(2, (-1, segment)).sum(3)
        return sums / (segment if counts is None else counts.clamp_min(1)[:, None, :, None].to(x.dtype))
    cells = x.unflatten(2, (-1, width))  # [batch, heads, cells, w, d]
    if kind == "groupedconv":
        # Broadcast multiply and sum: on the CPU, einsum("bhcwd,rwd->bhcrd") with a trainable
        # weight ran about 60 times slower (torch 2.13).
        summary = (cells.unsqueeze(3) * weight).sum(4)
    else:
        summary = torch.einsum("bhcwi,rwio->bhcro", cells, weight)
    return (summary + bias).flatten(2, 3)


def upward(x: torch.Tensor, block_size: int, rank: int, parameters, counts) -> list[torch.Tensor]:
    """multilevel: x [batch, heads, n, d], zero at pads -> summaries of levels 1..len(parameters) as `summarise` gives.

    parameters: per level, `Downsample.level_parameters`: level 1's (W1 [p, m, d], b1 [p, d]), groupedconv
    over m-token cells, then each coarser level's map (A_l [p, 2p, d], b_l [p, d]; shared maps: the same
    views at every level). counts: `real_counts` per level, or None when nothing is padded.
    """
    leaf, *maps = parameters
    return upward_from(summarise("groupedconv", x, block_size, rank, *leaf, None), rank, maps, counts)


def upward_from(leaves: torch.Tensor, rank: int, maps, counts) -> list[torch.Tensor]:
    """multilevel's coarser levels from level 1's summaries leaves [batch, heads, (n / m) * p, d] -> levels
    1..len(maps) + 1. A parent's two children are consecutive cells, so in cell-major order their 2p
    summaries are consecutive too: each coarser level is groupedconv of width 2p over the finer level's
    summaries, O(n d p) work in all. maps: (A_l, b_l) of levels 2.. ; counts: `real_counts` per level, or
    None; a child of no real token is zeroed before its parent's map, so it contributes nothing (not even
    its bias). (`multilevel.padded_biases` runs it on the biases alone.)
    """
    summaries = [leaves]
    for merge, children_counts in zip(maps, counts or [None] * len(maps)):
        children = summaries[-1]
        if children_counts is not None:
            children = children.masked_fill((children_counts == 0)[:, None, :, None], 0)
        summaries.append(summarise("groupedconv", children, 2 * rank, rank, *merge, None))
    return summaries
