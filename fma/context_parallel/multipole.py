"""Context-parallel Fast Multipole Attention: one sequence split over the ranks of a process group.

Rank r of R holds the contiguous chunk [r c, (r + 1) c) of a sequence of valid length n = R c
(`padded_length(n, m) == n`) with c a multiple of m; since n / m is a power of two, so is R, and every
cell of width w <= c lies inside one chunk while a cell of width w > c is exactly w / c whole chunks.

What a rank needs from the others, per layer (keys and values each, batch and heads aside):
- fine: the previous rank's last block (m tokens; bidirectional: also the next rank's first block);
- coarse: the summaries of the cells its blocks' interaction lists name outside its chunk. At a level with
  w <= c these are at most two cells (causal; bidirectional two on each side, three at w = c), each one rank's own
  complete summary. A cell wider than a chunk is the sum of its w / c chunks' shares (every basis is
  affine in its tokens: groupedconv and conv are a bias plus a sum of filtered tokens, avgpool a sum of
  tokens over the segment width, multilevel a bias plus its children's summaries under its level's map A_l), and
  each rank whose chunk lies in it sends its share [p, d] straight to the rank that needs the cell, which
  adds them; the bias travels once, with the cell's first chunk. A rank's queries see at most two such
  cells per level causal (three bidirectional), none of them its own.
So a rank receives, per layer and per head and channel of keys (the same again for values), m fine tokens
(bidirectional 2m), at most 2p summaries per level inside a chunk (bidirectional 4p; 3p at w = c) and, per
wider level, the shares of at most 2 cells (bidirectional 3) of w / c chunks each, which over all wider
levels is at most p (R - 4) (bidirectional 3p (R/2 - 2)): O(m + p (log(c/m) + R)), against the n - c of
ring attention, which passes every other chunk's keys and values around the ring. `exchanged_numel` counts
it exactly: n = 2^20, m = 64, p = 2 on 64 ranks, 220 causal and 314 bidirectional, against ring's 1,032,192
(on 8 ranks 120 and 226). The R term is the direct sending of shares; a reduction tree over a wide cell's
chunks would make it O(p log R) at the cost of log R rounds, not worth it at a handful of summaries.

Everything moves in one point-to-point exchange per call (`exchange.exchange`, forward and backward),
after which each rank runs the block-local attention of `fma.multipole.blocklocal` for its own blocks
with the same key slots in the same order as the single-process layer: fine keys, then each level's
interaction-list cells, so outputs and gradients equal the single-process layer's up to the order of
floating-point sums (the shares of wide cells). Parameter gradients are each rank's share of the
single-process gradient: summed over ranks (what DDP's all-reduce does) they are its gradient.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..downsample.cellwise import summarise, upward
from ..errors import ConfigurationError
from ..indexing import coarse_cells, level_widths, padded_length
from ..softmax import exp_scores
from .exchange import exchange

FINE_LAST, FINE_FIRST = "last", "first"  # a rank's last block (to the next rank), first block (to the previous)


def check_chunks(chunk: int, world: int, block_size: int) -> int:
    """The full length n = world * chunk, refused unless chunks are whole blocks and n is a valid length."""
    n = chunk * world
    if chunk % block_size or padded_length(n, block_size) != n:
        raise ConfigurationError(
            f"Context-parallel FMA splits one sequence of valid length n (block_size * 2^k, at least 4 blocks) into "
            f"{world} equal chunks of whole blocks; got chunks of {chunk} tokens (n = {n}) with block_size="
            f"{block_size}. Pad the sequence to padded_length(n, block_size) = {padded_length(n, block_size)} "
            f"(and mask the pads) before splitting it, with a number of ranks that divides n / block_size "
            f"(a power of two), e.g. data.seq_len= a multiple of {block_size * world} and at least {4 * block_size}."
        )
    return n


@dataclass(frozen=True)
class Plan:
    """Who needs which cells of the others, for n = world * chunk (all ranks compute the same plan)."""

    n: int
    chunk: int
    world: int
    block_size: int
    rank: int          # p, summaries per cell
    causal: bool
    widths: tuple[int, ...]
    needed: tuple[tuple[tuple[int, ...], ...], ...]   # needed[r][level index]: cells outside r's chunk, sorted

    def contributors(self, level: int, cell: int) -> range:
        """The ranks whose chunks hold a part of `cell` at `level` (0-based): one for w <= c, w / c above."""
        width = self.widths[level]
        first = cell * width // self.chunk
        return range(first, first + max(1, width // self.chunk))

    def pieces(self, sender: int, receiver: int) -> list:
        """What `sender` sends `receiver`, in order: fine blocks, then (level, cell) summaries or shares."""
        items = []
        if receiver == sender + 1:
            items.append(FINE_LAST)
        if not self.causal and receiver == sender - 1:
            items.append(FINE_FIRST)
        for level, cells in enumerate(self.needed[receiver]):
            items += [(level, cell) for cell in cells if sender in self.contributors(level, cell)]
        return items

    def length(self, items) -> int:
        return sum(self.block_size if item in (FINE_LAST, FINE_FIRST) else self.rank for item in items)


@functools.lru_cache(maxsize=64)
def make_plan(n: int, chunk: int, world: int, block_size: int, rank: int, causal: bool) -> Plan:
    widths = tuple(level_widths(n, block_size))
    needed = []
    for r in range(world):
        first_queries = torch.arange(r * chunk, (r + 1) * chunk, block_size)
        per_level = []
        for width in widths:
            cells = {int(c) for cell in coarse_cells(first_queries, width, causal) for c in cell.tolist()}
            local = range(r * chunk // width, (r + 1) * chunk // width) if width <= chunk else range(0)
            per_level.append(tuple(sorted(c for c in cells if 0 <= c < n // width and c not in local)))
        needed.append(tuple(per_level))
    return Plan(n, chunk, world, block_size, rank, causal, widths, tuple(needed))


def exchanged_numel(plan: Plan, receiver: int) -> int:
    """Keys or values (each, per batch row, head and channel) that `receiver` gets from the others."""
    return sum(plan.length(plan.pieces(sender, receiver)) for sender in range(plan.world) if sender != receiver)


def chunk_summaries(downsample, x: torch.Tensor, start: int, n: int) -> list[torch.Tensor]:
    """x [batch, heads, c, d], positions start .. start + c - 1 of a sequence of valid length n ->
    per level: w <= c: the complete summaries of the chunk's own cells [batch, heads, (c / w) p, d], as the
    downsampling's torch path gives them; w > c: the chunk's share of its cell's summary [batch, heads, p, d]
    (the bias included only in the share of the cell's first chunk), the shares adding up to the summary."""
    chunk, m, p, kind = x.shape[2], downsample.block_size, downsample.rank, downsample.kind
    widths = level_widths(n, m)
    inside = [w for w in widths if w <= chunk]
    if kind == "multilevel":
        parameters = downsample.parameters_of_levels(len(widths))
        summaries = upward(x, m, p, parameters[:len(inside)], None)
        share = summaries[-1]  # the chunk is one cell of width c here: [batch, heads, p, d]
        for width, (weight, bias) in zip(widths[len(inside):], parameters[len(inside):]):
            side = start // (width // 2) % 2  # which child of its parent the finer share belongs to
            share = (share.unsqueeze(2) * weight[:, side * p:(side + 1) * p]).sum(3)
            share = share + bias if start % width == 0 else share  # the parent's bias: once, first chunk
            summaries.append(share)
        return summaries
    summaries = []
    for width, (weight, bias) in zip(widths, downsample.parameters_of_levels(len(widths))):
        if width <= chunk:
            summaries.append(summarise(kind, x, width, p, weight, bias, None))
            continue
        offset = start % width
        if kind == "avgpool":  # segment means: the chunk's tokens over their segment's width
            segment = width // p
            of_segment = (offset + torch.arange(chunk, device=x.device)) // segment
            pool = (of_segment == torch.arange(p, device=x.device)[:, None]).to(x.dtype) / segment
            summaries.append(torch.einsum("rt,bhtd->bhrd", pool, x))
            continue
        filters = weight[:, offset:offset + chunk]
        if kind == "groupedconv":
            share = (x.unsqueeze(2) * filters).sum(3)
        else:  # conv
            share = torch.einsum("bhti,rtio->bhro", x, filters)
        summaries.append(share + bias if offset == 0 else share)
    return summaries


@functools.lru_cache(maxsize=64)
def chunk_layout(plan: Plan, receiver: int, device: torch.device):
    """The receiver's key table and, per own block, which of its rows each slot reads.

    Table: [fine: previous block, own chunk, (bidirectional) next block; then per level its cells in order:
    needed cells before the chunk, the chunk's own cells (w <= c), needed cells after]. Returns
    (rows: {(level, cell): first row}, key_index [c / m, S] long, allowed [c / m, m, S] bool, slot_level
    [S] long: -1 for fine slots, else the level index), slots in `block_local_layout`'s order.
    """
    n, c, m, p, causal = plan.n, plan.chunk, plan.block_size, plan.rank, plan.causal
    start = receiver * c
    fine_length = c + (m if causal else 2 * m)
    rows, offset = {}, fine_length
    for level, width in enumerate(plan.widths):
        local = list(range(start // width, (start + c) // width)) if width <= c else []
        for cell in sorted(set(local) | set(plan.needed[receiver][level])):
            rows[level, cell] = offset
            offset += p
    blocks = c // m
    first_query = start + torch.arange(blocks) * m
    shifts = (-1, 0) if causal else (-1, 0, 1)
    fine = torch.cat([first_query[:, None] + shift * m + torch.arange(m) for shift in shifts], dim=1)
    slots, exists, slot_level = [fine - (start - m)], [(fine >= 0) & (fine < n)], [torch.full((fine.shape[1],), -1)]
    for level, width in enumerate(plan.widths):
        for cells in coarse_cells(first_query, width, causal):
            valid = (cells >= 0) & (cells < n // width)
            first = torch.tensor([rows[level, int(cell)] if ok else 0 for cell, ok in zip(cells, valid)])
            slots.append(first[:, None] + torch.arange(p))
            exists.append(valid[:, None].expand(-1, p))
            slot_level.append(torch.full((p,), level))
    exists = torch.cat(exists, dim=1)
    key_index = torch.cat(slots, dim=1).masked_fill(~exists, 0)
    allowed = exists[:, None, :].repeat(1, m, 1)
    if causal:
        allowed[:, :, m:2 * m] &= torch.ones(m, m, dtype=torch.bool).tril()
    return rows, key_index.to(device), allowed.to(device), torch.cat(slot_level).to(device)


def context_parallel_multipole_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer, group=None):
    """FMA of `layer` (a `FastMultipoleAttention`) with the sequence split over the ranks of `group`.

    q, k, v [batch, heads, c, d]: this rank's chunk, positions [rank c, (rank + 1) c) of a sequence of
    valid length n = world c, c a multiple of layer.block_size (refused otherwise, naming the fix); no
    padding (pad and split a valid length). -> this rank's rows of the layer's attention [batch, heads, c, d],
    differentiable. Every rank of `group` must call it for the same layer at the same point. Runs the
    portable torch path whatever layer.backend says (the fused kernels take a whole sequence's layout).
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    batch, heads, chunk, head_dim = q.shape
    m, p, causal = layer.block_size, layer.key_downsample.rank, layer.causal
    n = check_chunks(chunk, world, m)
    layer.check_length(n)
    plan = make_plan(n, chunk, world, m, p, causal)
    start = me * chunk

    own = {"k": chunk_summaries(layer.key_downsample, k, start, n),
           "v": chunk_summaries(layer.value_downsample, v, start, n)}
    fine = {"k": k, "v": v}

    def piece(name, item):
        if item == FINE_LAST:
            return fine[name][:, :, -m:]
        if item == FINE_FIRST:
            return fine[name][:, :, :m]
        level, cell = item
        summaries, width = own[name][level], plan.widths[level]
        if width > chunk:
            return summaries
        row = (cell - start // width) * p
        return summaries[:, :, row:row + p]

    sends, receives, received_items = [], [], []
    for peer in range(world):
        if peer == me:
            continue
        out_items, in_items = plan.pieces(me, peer), plan.pieces(peer, me)
        if out_items:
            sends.append((peer, torch.cat([piece(name, item) for name in "kv" for item in out_items], dim=2)))
        if in_items:
            receives.append((peer, (batch, heads, 2 * plan.length(in_items), head_dim)))
            received_items.append(in_items)
    anchor, buffers = exchange(sends, receives, k, group)

    # What came in: fine neighbour blocks, and per (level, cell) the summary (the sum of its shares).
    zeros = k.new_zeros(batch, heads, m, head_dim)
    got = {"k": {FINE_LAST: zeros, FINE_FIRST: zeros}, "v": {FINE_LAST: zeros, FINE_FIRST: zeros}}
    for items, buffer in zip(received_items, buffers):  # senders in rank order: shares add in that order
        lengths = [m if item in (FINE_LAST, FINE_FIRST) else p for item in items]
        for name, half in zip("kv", buffer.chunk(2, dim=2)):
            for item, part in zip(items, half.split(lengths, dim=2)):
                share = isinstance(item, tuple) and item in got[name]
                got[name][item] = got[name][item] + part if share else part

    rows, key_index, allowed, slot_level = chunk_layout(plan, me, q.device)

    def table(name):
        parts = [got[name][FINE_LAST], fine[name]] + ([] if causal else [got[name][FINE_FIRST]])
        for level, width in enumerate(plan.widths):
            needed = plan.needed[me][level]
            before = [got[name][level, cell] for cell in needed if cell < start // width]
            after = [got[name][level, cell] for cell in needed if cell >= start // width]
            parts += before + ([own[name][level]] if width <= chunk else []) + after
        return torch.cat(parts, dim=2)

    keys, values = table("k")[:, :, key_index], table("v")[:, :, key_index]  # [batch, heads, blocks, S, d]
    score_dtype = torch.promote_types(q.dtype, torch.float32)
    level_bias = torch.tensor([math.log(w / p) if layer.scale_coarse else 0.0 for w in plan.widths] + [0.0],
                              dtype=score_dtype, device=q.device)
    key_bias = level_bias[slot_level]  # slot_level -1: the appended 0 (fine keys)
    queries = q.unflatten(2, (chunk // m, m))
    scores = torch.einsum("bhnqd,bhnsd->bhnqs", queries, keys).to(score_dtype) * head_dim**-0.5
    _, unnormalised, total = exp_scores(scores + key_bias, allowed)
    weights = (unnormalised / torch.where(total > 0, total, 1.0)).to(v.dtype)
    out = torch.einsum("bhnqs,bhnsd->bhnqd", weights, values).reshape(batch, heads, chunk, head_dim)
    return out + anchor
