"""Fast Multipole Attention's own decoding state: O((m + p log n) d) per layer instead of every position.

Why it is small: causal query i (block b = i // m) reads the fine keys max(0, (b-1)m)..i and, per level of
width w, cell 2P-2 and, when h = 1, cell 2P-1, with P = i // 2w and h = (i % 2w) // w
(`naive.interaction_lists`): complete cells of the previous parent only, whichever levels the padded
length has. So after n positions a layer keeps, for keys and for values (batch and heads aside):
- fine: positions max(0, (n // m - 1) m)..n-1, at most 2m - 1 of them, [.., f, d];
- per level of width w: the summaries [p, d] of its complete cells max(0, 2 (n // 2w) - 2)..n // w - 1
  (at most 3: the previous parent's two children and the current parent's first), and `partial`, the
  cell being filled as sum_t W[r, t] x_t over its tokens so far (its summary less the bias; avgpool: W =
  `segment_average`, the means), which plus the bias is the cell's summary once it completes. multilevel
  keeps a partial at level 1 only: a coarser cell is its two children's 2p summaries under its level's map
  A_l (shared: one A), formed when the second child completes.
Levels: groupedconv: every level it has filters for (those of max_seq_len); avgpool: level 1, and level
l + 1 from level l's first cell when that completes (segment means of a half cell pool exactly);
multilevel: level 1, and each coarser one when its first cell completes (per_level maps: up to the levels
it has maps for, those of max_seq_len, past which a step is refused). With L levels that is at most
2 d (2m - 1 + 4 p L) numbers per batch row and head (`max_numel`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..downsample.cellwise import summarise, upward
from ..downsample.module import segment_average


@dataclass
class Level:
    """One coarse level of cell width `width`: `summaries` (keys, values) [batch, heads, c p, d] of its kept
    complete cells (c <= 3, from cell `first_kept`), `partial` (keys, values) [batch, heads, p, d] or None."""

    width: int
    summaries: tuple[torch.Tensor, torch.Tensor]
    partial: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class MultipoleState:
    """After `length` positions: the fine keys and values [batch, heads, f, d] and the coarse levels, finest first."""

    length: int
    fine: tuple[torch.Tensor, torch.Tensor]
    levels: list[Level]

    def __iter__(self):
        """Every tensor held (what the state costs in memory)."""
        yield from self.fine
        for level in self.levels:
            yield from level.summaries
            yield from level.partial or ()


def max_numel(block_size: int, rank: int, head_dim: int, num_levels: int) -> int:
    """The most numbers a state of `num_levels` levels holds per batch row and head."""
    return 2 * head_dim * (2 * block_size - 1 + 4 * rank * num_levels)


def fine_start(n: int, block_size: int) -> int:
    """The first fine position the queries from n on read: the previous block's first."""
    return max(0, (n // block_size - 1) * block_size)


def first_kept(n: int, width: int) -> int:
    """The first cell of width `width` the queries from n on read: the previous parent's first child."""
    return max(0, 2 * (n // (2 * width)) - 2)


def cell_filters(downsample, level: int, width: int, like: torch.Tensor):
    """Level `level`'s filters W [p, w, d] (avgpool: [p, w, 1], the means) and bias [p, d] (avgpool: None)."""
    if downsample.kind == "avgpool":
        return segment_average(width, downsample.rank)[:, :, None].to(like), None
    return downsample.level_parameters(level)


def stored_widths(downsample, n: int, block_size: int) -> list[int]:
    """The cell widths of the levels a state after n positions holds (module docstring)."""
    if downsample.kind == "groupedconv":
        count = len(downsample.filter_shapes)
    else:  # levels l with w_l <= reach, besides level 1; multilevel per_level: those it has maps for
        reach = 2 * n if downsample.kind == "avgpool" else n
        count = min(max(1, (reach // block_size).bit_length()), downsample.num_levels or math.inf)
    return [block_size << level for level in range(count)]


def prompt_levels(downsample, x: torch.Tensor, widths: list[int], block_size: int):
    """x [batch, heads, n, d], a prompt's keys or values -> per level (kept summaries, partial or None),
    from the downsampling's own torch path over x zero-filled past n (one partial cell per level)."""
    n, p = x.shape[2], downsample.rank

    def zero_filled(width):
        return F.pad(x, (0, 0, 0, (n // width + 1) * width - n))

    if downsample.kind == "multilevel":
        summaries = upward(zero_filled(widths[-1]), block_size, p, downsample.parameters_of_levels(len(widths)), None)
    else:
        parameters = downsample.parameters_of_levels(len(widths))
        summaries = [summarise(downsample.kind, zero_filled(width), width, p, weight, bias, None)
                     for width, (weight, bias) in zip(widths, parameters)]
    levels = []
    for level, (width, summary) in enumerate(zip(widths, summaries), 1):
        complete = n // width
        partial = None
        if level == 1 or downsample.kind != "multilevel":
            _, bias = cell_filters(downsample, level, width, x)
            partial = summary[:, :, complete * p:(complete + 1) * p]
            partial = partial if bias is None else partial - bias
        levels.append((summary[:, :, first_kept(n, width) * p:complete * p], partial))
    return levels


def prompt_state(layer, k: torch.Tensor, v: torch.Tensor) -> MultipoleState:
    """The state after a prompt's k, v [batch, heads, n, d]."""
    n, m = k.shape[2], layer.block_size
    widths = stored_widths(layer.key_downsample, n, m)
    keys = prompt_levels(layer.key_downsample, k, widths, m)
    values = prompt_levels(layer.value_downsample, v, widths, m)
    levels = [Level(width, (key_summaries, value_summaries), None if key_partial is None else (key_partial, value_partial))
              for width, (key_summaries, key_partial), (value_summaries, value_partial) in zip(widths, keys, values)]
    start = fine_start(n, m)
    return MultipoleState(n, (k[:, :, start:], v[:, :, start:]), levels)


def attend_step(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: MultipoleState):
    """q, k, v [batch, heads, 1, d] of position i = state.length -> (output [batch, heads, 1, d], the next state).

    One softmax, in float32 or better, over the fine keys so far (all at positions <= i) and each level's
    interaction-list cells, whose logits get + log(w/p) (the tokens a summary stands for) with scale_coarse.
    """
    i, p = state.length, layer.key_downsample.rank
    dtype = torch.promote_types(q.dtype, torch.float32)
    keys, values = [state.fine[0], k], [state.fine[1], v]
    bias = [torch.zeros(state.fine[0].shape[2] + 1, dtype=dtype)]
    for level in state.levels:
        parent, half = divmod(i // level.width, 2)
        if parent:  # cells 2P-2 (and 2P-1 when h = 1): the first p (2p) kept summaries
            keys.append(level.summaries[0][:, :, :p * (1 + half)])
            values.append(level.summaries[1][:, :, :p * (1 + half)])
            count = level.width / p if layer.scale_coarse else 1.0
            bias.append(torch.full((p * (1 + half),), math.log(count), dtype=dtype))
    keys, values = torch.cat(keys, 2).to(dtype), torch.cat(values, 2).to(dtype)
    scores = q.to(dtype) @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]) + torch.cat(bias).to(keys.device)
    out = torch.softmax(scores, dim=-1) @ values
    return out.to(q.dtype), next_state(layer, state, k, v)


def next_state(layer, state: MultipoleState, k: torch.Tensor, v: torch.Tensor) -> MultipoleState:
    """The state after appending position i = state.length's k, v [batch, heads, 1, d]."""
    i, n, m, p = state.length, state.length + 1, layer.block_size, layer.key_downsample.rank
    sides = ((layer.key_downsample, k), (layer.value_downsample, v))
    drop = fine_start(n, m) - fine_start(i, m)
    fine = tuple(torch.cat([old, new], 2)[:, :, drop:] for old, new in zip(state.fine, (k, v)))
    levels, finished = [], None  # finished: the index of the cell the previous level completed here, or None
    for number, level in enumerate(state.levels, 1):
        level, finished = advanced(level, number, sides, i, finished, levels[-1] if levels else None, p)
        levels.append(level)
    top = levels[-1]
    multilevel = layer.key_downsample.kind == "multilevel"
    if finished is not None and finished % 2 and multilevel and len(levels) != layer.key_downsample.num_levels:
        # top's cell 1 completed: a new level (per_level maps: unless its map would lie past max_seq_len's levels)
        empty = Level(2 * top.width, tuple(x[:, :, :0] for x in top.summaries), None)
        levels.append(advanced(empty, len(levels) + 1, sides, i, finished, top, p)[0])
    elif finished is not None and layer.key_downsample.kind == "avgpool" and n == top.width:
        pooling = segment_average(2 * p, p)[:, :p].to(k)  # the new level's segment r: half of children 2r, 2r+1
        levels.append(Level(2 * top.width, tuple(x[:, :, :0] for x in top.summaries),
                            tuple(torch.einsum("rj,bhjd->bhrd", pooling, x) for x in top.summaries)))
    return MultipoleState(n, fine, levels)


def advanced(level: Level, number: int, sides, i: int, below: int | None, finer: Level | None, p: int):
    """Level `number` after position i -> (the level, the index of the cell it completed at i, or None).
    below: the index of the cell the finer level `finer` (already advanced) completed at i, or None."""
    width, n = level.width, i + 1
    cell, partial = None, level.partial
    if partial is not None:
        filters = [cell_filters(downsample, number, width, x) for downsample, x in sides]
        partial = tuple(old + weight[:, i % width].to(x) * x for old, (weight, _), (_, x) in zip(partial, filters, sides))
        if n % width == 0:
            cell = tuple(s if bias is None else s + bias for s, (_, bias) in zip(partial, filters))
            partial = tuple(torch.zeros_like(s) for s in partial)
    elif below is not None and below % 2:  # multilevel: the second child completed; the finer level keeps both last
        cell = tuple(summarise("groupedconv", children[:, :, -2 * p:], 2 * p, p, *downsample.level_parameters(number),
                               None)
                     for children, (downsample, _) in zip(finer.summaries, sides))
    if cell is None:
        return Level(width, level.summaries, partial), None
    drop = (first_kept(n, width) - first_kept(i, width)) * p
    summaries = tuple(torch.cat([old, new], 2)[:, :, drop:] for old, new in zip(level.summaries, cell))
    return Level(width, summaries, partial), i // width
