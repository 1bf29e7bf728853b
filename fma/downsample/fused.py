"""Fused Triton kernels for the learned downsampling (`groupedconv`) and `avgpool`: every level at once.

What is computed (`cellwise.py`; method spec: shared/docs/fma-algorithm.md): for keys (or values)
x [B, H, n, d] and levels l = 1..L of cell width w_l = m * 2^(l-1) (the widest, W* = n / 4),
    S_l[bh, cell, r, c] = b_l[r, c] + sum_{t < w_l} W_l[r, t, c] * x[bh, cell * w_l + t, c].
avgpool is the same with W_l[r, t, c] = [t // (w_l / p) == r], no bias, times p / w_l, or times
1 / (real count) when padded. All levels go into ONE buffer [B, H, T, d], T = sum_l (n / w_l) * p,
level l at rows offsets[l-1]:offsets[l] (`Layout`), cell-major; `Downsample` returns per-level views
of it (`torch.split`, one cat in backward), so a consumer can take the buffer whole instead of
concatenating. Summaries come out in x's dtype (the torch path promotes bf16 x with fp32 weights
to fp32).

API: `fused_summaries(x, kind, block_size, rank, weights, biases, counts) -> buffer` (autograd: dx,
dW, db); `split_levels(buffer side, block_size, rank)`. It takes one or two sides (a layer's keys
and values, each with its own filters), which every kernel runs in one launch: the side is the
grid's second axis, and the buffer [S, B, H, T, d] holds the sides in order. Timing:
scripts/bench_downsample.py.

Floor (bytes moved at the H200's copy rate) at n = 65,536, B = 2, H = 8, d = 64, m = 64, p = 2, bf16 (L = 9 levels, T = 4,088
summaries per head), H200 copy rate ~4.3 TB/s:
  forward:  read x 134.2 MB + write summaries 8.4 MB                  = 142.6 MB -> 33 us
            (+ W, 4.19 M fp32 parameters = 16.7 MB, shared by all heads: 159 MB -> 37 us)
  backward: read x 134.2 MB + write dx 134.2 MB + read dS 8.4 MB      = 276.8 MB -> 64 us
            (+ W read and dW written, 16.7 MB each: 310 MB -> 72 us)
  fwd + bwd: ~98 us per side (keys or values) without W, ~109 us with it.
  Arithmetic: B*H * n * d * p * L = 1.21 G multiply-adds per product (forward, dx, dW each): 36 us
  on the fp32 FMA units, a few us on the tensor cores, which is why the kernels use tensor cores.

Design (each kernel reads x, or writes dx, exactly once; nothing per level):
  The k-folding: every width divides W*, so tokens t = k * W* + o (k = 0..3, the 4 top cells) sit
  at the same in-cell position o mod w_l at EVERY level. A program owns in-cell offsets o, a group of
  E (bh, top cell) pairs and BD channels, so each W element it loads serves E rows of x.
  Per channel c the work is a small matrix product, batched over c with a 3-D `tl.dot`:
  forward  `_summaries_forward_kernel`, grid (offset chunk x E-group x channel block), channel block fastest:
           per tile of TOK tokens (inside one level-1 cell) acc[c, e, row] += x[c, e, t] @ W[c, t, row],
           row = (level, r), W gathered at each level's in-cell position. Levels whose cells fit in
           the chunk are stored (bias, scale, cast) when their cell ends; wider levels are added with
           fp32 atomics (one per program, row, e, channel) to a small scratch, finished by
           `_summaries_finish_kernel`. Reads x once + W (L2); writes each summary once.
  backward `_summaries_grad_input_kernel`: dx[c, e, t] = dS[c, e, row] @ W[c, row, t]; the W tile is loaded
           once per program and serves several E-groups; dx written once.
           `_summaries_grad_weight_kernel`: dW[c, row, t] += dS[c, row, e] @ x[c, e, t] over all (bh, top cell)
           pairs of a split, then fp32 atomics into dW (W* * L * p * d ~ 19 M at the shape above).
           db: one torch sum over dS plus an index_add.
  bf16/fp16 inputs: tensor-core products in that dtype; fp32 weights enter as hi + lo halves (about
  16 significant bits, two products) so they keep fp32-like accuracy. fp32 inputs: `tl.dot` with
  input_precision FP32_PRECISION ("tf32x3": three tf32 products, fp32-level accuracy; "ieee":
  exact but on the FMA units, ~3.5x slower; env FMA_DOWNSAMPLE_FP32_PRECISION).

Measured on an H200 (triton 3.6, torch 2.11) at the shape above, bf16, median of do_bench:
  kernels: forward ~280 us, dx ~270 us, dW ~290 us (each ~8x its share of the floor). Through
  `Downsample` (scripts/bench_downsample.py): forward 0.34 ms, forward + backward 1.6 ms, against 8.9 ms and
  26.1 ms for the torch path. About 0.9 ms of the 1.6 is GPU work (the three kernels, the split /
  cat of the weights and gradients, db); the rest is host-side launch and autograd overhead, which
  dominates at small n (n = 4,096: 1.3 ms fused, 1.5 ms torch; 16,384: 1.4 vs 5.4 ms). fp32
  (tf32x3): 0.48 / 1.9 ms against 5.4 / 19.5 ms. avgpool: 0.24 / 0.84 ms against 0.44 / 2.4 ms.
  What limits the kernels (Nsight Compute): L1/shared-memory throughput at 55-80% with DRAM at ~15%.
  The channel dimension is the batch of the products AND the contiguous one in memory, so every
  operand tile must be transposed through shared memory on its way to the tensor cores, and Triton
  reads it back element-wise with bank conflicts. Smaller channel blocks (less conflict) lose more
  in sector waste than they gain (measured). The lever that would remove it is a channel-major
  layout of K/V ([B, H, d, n], tokens contiguous) from the qkv projection, or a hand-written CUDA
  kernel that transposes in registers. An fp32 FMA formulation with per-token outer products
  (the first version) was 5-10x slower still: Triton has no way to keep the broadcast operands in
  registers.

Kernels read x through its strides (a permuted view of the qkv projection is not copied). They use
masked loads/stores, atomic_add, where/arange and `tl.dot` on 3-D blocks (batched; documented since
Triton 3.0, but 3-D dots inside loops failed to compile before triton 3.3, triton-lang/triton#5620;
the GPU here has 3.6). Under TRITON_INTERPRET=1 (set before this module is imported) they run on the
CPU; the interpreter's bf16 `tl.dot` returns garbage (triton 3.9), so there half-precision products
run on upcast values (`_dot`, EMULATE).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..indexing import level_widths
from ..kernels import interpreted, kernel_output

# Under the Triton interpreter (CPU) half-precision products run on upcast values (see _dot).
_INTERPRETED = interpreted()
# Tests may force the forward chunk (in-cell offsets per program; a multiple of m dividing n / 4).
FORWARD_CHUNK: int | None = None


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
# Loop trip counts (CHUNK // TOK, E_GROUPS) are compile-time constants: one compilation per value, a
# few per shape, and the Triton 3.6 interpreter cannot iterate over a run-time bound (with numpy >= 2.4
# its scalars are 1-element arrays that `range` refuses).


@triton.jit
def _row_meta(rows, P: tl.constexpr, m, num_levels, d, N2):
    """Per row (level, r): valid, level width w, offset of W_l[r] in W_cat, first summary of level l."""
    valid = rows < num_levels * P
    level = tl.where(valid, rows // P, 0)
    r = rows % P
    width = m * (1 << level)
    w_offset = (P * d * m * ((1 << level) - 1) + r * width * d).to(tl.int64)
    s_offset = P * (N2 - (N2 >> level))  # sum_{l' < l} (n / w_l') * p, with N2 = 2n / m
    return valid, level, r, width, w_offset, s_offset


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b, batched over dim 0. fp32 operands: PRECISION ("ieee" = exact fp32). EMULATE (the
    Triton interpreter, whose bf16 tl.dot returns garbage in triton 3.9): the same product, upcast."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _program_tile(NC, NE, SPAN, d, TOK, BD: tl.constexpr, BT: tl.constexpr):
    """This program's place in the grid: its block of (bh, top cell) pairs, its first in-cell offset
    o0 (block * SPAN), its BD channels and BT tile tokens with their masks. Channel blocks vary
    fastest, so programs that read the same rows run together."""
    pid = tl.program_id(0)
    cols = (pid % NC) * BD + tl.arange(0, BD)
    tt = tl.arange(0, BT)
    return (pid // NC) % NE, (pid // (NC * NE)) * SPAN, cols, cols < d, tt, tt < TOK


@triton.jit
def _pairs(first, E: tl.constexpr, NTOP, BH, W_TOP, o0):
    """E (bh, top cell) pairs from pair index `first`: bh (0 past the end), valid, first token."""
    ee = first + tl.arange(0, E)
    bh = ee // NTOP
    e_ok = bh < BH
    return tl.where(e_ok, bh, 0), e_ok, (ee % NTOP) * W_TOP + o0


@triton.jit
def _summaries_forward_kernel(
    x_ptr, x2_ptr, w_ptr, w2_ptr, b_ptr, b2_ptr, scale_ptr, out_ptr, scratch_ptr,
    H, BH, sx_b, sx_h, sx_n, sx_d,
    d, m, num_levels, W_TOP, NTOP, N2, T, CHUNK: tl.constexpr, COARSE_OFF, TC, W_LO, NC, NE,
    P: tl.constexpr, LP: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, TOK: tl.constexpr,
    BT: tl.constexpr, AVG: tl.constexpr, SPLIT_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """One program: in-cell offsets [o0, o0 + CHUNK) of each top cell, E (bh, top cell) pairs e, BD
    channels c. Per tile of TOK tokens (inside one level-1 cell), for every channel c at once:
        acc[c, e, row] += x[c, e, t] @ W[c, t, row],   row = (level, r), t = pos_level(token)
    (W in two halves hi + lo when SPLIT_W). A level whose cells fit in the chunk is stored (bias,
    scale, cast) whenever its cell ends; wider levels are added at the end to the fp32 scratch.
    Grid axis 1: the side (0: x, W, b; 1: x2, W2, b2, the same shapes and strides), each with its
    own part of the output and the scratch."""
    side = tl.program_id(1)
    if side == 1:
        x_ptr = x2_ptr
        w_ptr = w2_ptr
        b_ptr = b2_ptr
    out_ptr += side.to(tl.int64) * BH * T * d
    scratch_ptr += side.to(tl.int64) * BH * TC * d
    pid_e, o0, cols, col_ok, tt, t_ok = _program_tile(NC, NE, CHUNK, d, TOK, BD, BT)
    rows = tl.arange(0, LP)
    row_ok, level, r, width, w_offset, s_offset = _row_meta(rows, P, m, num_levels, d, N2)
    bh, e_ok, tok0 = _pairs(pid_e * E, E, NTOP, BH, W_TOP, o0)  # tok0: first token of the chunk, per e
    b_idx = bh // H
    h_idx = bh % H

    x_base = b_idx.to(tl.int64) * sx_b + h_idx.to(tl.int64) * sx_h + tok0.to(tl.int64) * sx_n  # [E]
    x_ptrs = x_ptr + (cols * sx_d)[:, None, None] + x_base[None, :, None] + (tt * sx_n)[None, None, :]
    x_mask = col_ok[:, None, None] & e_ok[None, :, None] & t_ok[None, None, :]  # [BD, E, BT]
    w_ptrs = w_ptr + cols[:, None, None] + (tt * d)[None, :, None] + w_offset[None, None, :]
    w_mask = col_ok[:, None, None] & t_ok[None, :, None] & row_ok[None, None, :]  # [BD, BT, LP]
    o_mask = col_ok[:, None, None] & e_ok[None, :, None]  # [BD, E, 1]
    out_base = out_ptr + cols[:, None, None] + (bh.to(tl.int64) * T * d)[None, :, None]
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows[None, :] * d + cols[:, None], mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        bias = bias.to(tl.float32)[:, None, :]  # [BD, 1, LP]
    if AVG:
        segment = width // P

    acc = tl.zeros((BD, E, LP), dtype=tl.float32)
    for it in range(0, CHUNK // TOK):
        start = o0 + it * TOK  # in-cell offset of the tile; the tile lies inside one level-1 cell
        xv = tl.load(x_ptrs + tl.cast(it * TOK, tl.int64) * sx_n, mask=x_mask, other=0.0)
        pos = start % width  # [LP] position of the tile's first token in its level-l cell
        if AVG:
            hit = ((pos[None, :] + tt[:, None]) // segment[None, :] == r[None, :]) & t_ok[:, None] & row_ok[None, :]
            wv = tl.broadcast_to(tl.where(hit, 1.0, 0.0).to(xv.dtype)[None, :, :], (BD, BT, LP))
            acc = _dot(xv, wv, acc, PRECISION, EMULATE)
        else:
            wp = w_ptrs + (pos * d)[None, None, :]
            acc = _dot(xv, tl.load(wp, mask=w_mask, other=0.0), acc, PRECISION, EMULATE)
            if SPLIT_W:
                acc = _dot(xv, tl.load(wp + W_LO, mask=w_mask, other=0.0), acc, PRECISION, EMULATE)
        end = start + TOK
        if end % m == 0:  # a level-1 cell ends here; so may cells of wider levels
            done = row_ok & (end % width == 0) & (width <= CHUNK)  # [LP]
            cell = (tok0[:, None] + (end - o0 - 1)) // width[None, :]  # [E, LP]
            summary = s_offset[None, :] + cell * P + r[None, :]
            value = acc
            if HAS_BIAS:
                value = value + bias
            if HAS_SCALE:
                sc = tl.load(scale_ptr + b_idx[:, None] * T + summary, mask=e_ok[:, None] & done[None, :], other=0.0)
                value = value * sc[None, :, :]
            elif AVG:
                value = value / segment.to(tl.float32)[None, None, :]
            tl.store(out_base + (summary * d)[None, :, :], value.to(out_ptr.dtype.element_ty),
                     mask=o_mask & done[None, None, :])
            acc = tl.where(done[None, None, :], 0.0, acc)

    # Levels wider than the chunk: this program holds one partial sum per (row, e); add it up.
    if CHUNK < W_TOP:
        coarse = row_ok & (width > CHUNK)
        summary = s_offset[None, :] + (tok0[:, None] // width[None, :]) * P + r[None, :] - COARSE_OFF  # [E, LP]
        s_ptrs = scratch_ptr + cols[:, None, None] + (bh.to(tl.int64) * TC * d)[None, :, None] + (summary * d)[None, :, :]
        tl.atomic_add(s_ptrs, acc, mask=o_mask & coarse[None, None, :])


@triton.jit
def _summaries_grad_input_kernel(
    g_ptr, w_ptr, w2_ptr, dx_ptr,
    BH, n, d, m, num_levels, W_TOP, NTOP, N2, T, E_GROUPS: tl.constexpr, W_LO, G_LO, NC, NE,
    P: tl.constexpr, LP: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, TOK: tl.constexpr,
    BT: tl.constexpr, AVG: tl.constexpr, SPLIT_W: tl.constexpr, SPLIT_G: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """dx[c, e, t] = dS[c, e, row] @ W[c, row, t] for a tile of TOK tokens at in-cell offset o0 and BD
    channels; the W tile is loaded once and serves E_GROUPS groups of E (bh, top cell) pairs.
    A split operand (W or dS) is stored as hi at ptr and lo at ptr + *_LO. Grid axis 1: the side
    (1: W2; dS and dx of all sides in one buffer each, side-major)."""
    side = tl.program_id(1)
    if side == 1:
        w_ptr = w2_ptr
    g_ptr += side.to(tl.int64) * BH * T * d
    dx_ptr += side.to(tl.int64) * BH * n * d
    pid_e, o0, cols, col_ok, tt, t_ok = _program_tile(NC, NE, TOK, d, TOK, BD, BT)
    row_ok, level, r, width, w_offset, s_offset = _row_meta(tl.arange(0, LP), P, m, num_levels, d, N2)
    pos = o0 % width  # [LP]
    if AVG:
        hit = ((pos[:, None] + tt[None, :]) // (width // P)[:, None] == r[:, None]) & row_ok[:, None] & t_ok[None, :]
        w_hi = tl.broadcast_to(tl.where(hit, 1.0, 0.0).to(g_ptr.dtype.element_ty)[None, :, :], (BD, LP, BT))
    else:
        w_ptrs = w_ptr + cols[:, None, None] + (w_offset + pos * d)[None, :, None] + (tt * d)[None, None, :]
        w_mask = col_ok[:, None, None] & row_ok[None, :, None] & t_ok[None, None, :]
        w_hi = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if SPLIT_W:
            w_lo = tl.load(w_ptrs + W_LO, mask=w_mask, other=0.0)

    for group in range(0, E_GROUPS):
        bh, e_ok, tok0 = _pairs((pid_e * E_GROUPS + group) * E, E, NTOP, BH, W_TOP, o0)
        summary = s_offset[None, :] + (tok0[:, None] // width[None, :]) * P + r[None, :]  # [E, LP]
        g_ptrs = g_ptr + cols[:, None, None] + (bh.to(tl.int64) * T * d)[None, :, None] + (summary * d)[None, :, :]
        g_mask = col_ok[:, None, None] & e_ok[None, :, None] & row_ok[None, None, :]
        gv = tl.load(g_ptrs, mask=g_mask, other=0.0)
        acc = _dot(gv, w_hi, tl.zeros((BD, E, BT), dtype=tl.float32), PRECISION, EMULATE)
        if SPLIT_W:
            acc = _dot(gv, w_lo, acc, PRECISION, EMULATE)
        if SPLIT_G:
            acc = _dot(tl.load(g_ptrs + G_LO, mask=g_mask, other=0.0), w_hi, acc, PRECISION, EMULATE)
        dx_ptrs = dx_ptr + cols[:, None, None] + ((bh.to(tl.int64) * n + tok0) * d)[None, :, None] + (tt * d)[None, None, :]
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty),
                 mask=col_ok[:, None, None] & e_ok[None, :, None] & t_ok[None, None, :])


@triton.jit
def _summaries_grad_weight_kernel(
    x_ptr, x2_ptr, g_ptr, dw_ptr,
    H, BH, sx_b, sx_h, sx_n, sx_d,
    d, m, num_levels, W_TOP, NTOP, N2, T, E_GROUPS: tl.constexpr, W_SIDE, NC, NE,
    P: tl.constexpr, LP: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, TOK: tl.constexpr,
    BT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """dW[c, row, t] += dS[c, row, e] @ x[c, e, t] over E_GROUPS groups of E (bh, top cell) pairs, for
    a tile of TOK tokens at in-cell offset o0 and BD channels; fp32 atomics into dW at the end. Grid
    axis 1: the side (1: x2; dS and dW of all sides in one buffer each, side-major, W_SIDE apart)."""
    side = tl.program_id(1)
    if side == 1:
        x_ptr = x2_ptr
    g_ptr += side.to(tl.int64) * BH * T * d
    dw_ptr += side.to(tl.int64) * W_SIDE
    pid_e, o0, cols, col_ok, tt, t_ok = _program_tile(NC, NE, TOK, d, TOK, BD, BT)
    row_ok, level, r, width, w_offset, s_offset = _row_meta(tl.arange(0, LP), P, m, num_levels, d, N2)

    acc = tl.zeros((BD, LP, BT), dtype=tl.float32)
    for group in range(0, E_GROUPS):
        bh, e_ok, tok0 = _pairs((pid_e * E_GROUPS + group) * E, E, NTOP, BH, W_TOP, o0)
        summary = s_offset[:, None] + (tok0[None, :] // width[:, None]) * P + r[:, None]  # [LP, E]
        g_ptrs = g_ptr + cols[:, None, None] + (summary * d)[None, :, :] + (bh.to(tl.int64) * T * d)[None, None, :]
        gv = tl.load(g_ptrs, mask=col_ok[:, None, None] & row_ok[None, :, None] & e_ok[None, None, :], other=0.0)
        x_base = (bh // H).to(tl.int64) * sx_b + (bh % H).to(tl.int64) * sx_h + tok0.to(tl.int64) * sx_n  # [E]
        x_ptrs = x_ptr + (cols * sx_d)[:, None, None] + x_base[None, :, None] + (tt * sx_n)[None, None, :]
        xv = tl.load(x_ptrs, mask=col_ok[:, None, None] & e_ok[None, :, None] & t_ok[None, None, :], other=0.0)
        acc = _dot(gv, xv, acc, PRECISION, EMULATE)

    pos = o0 % width  # [LP]
    dw_ptrs = dw_ptr + cols[:, None, None] + (w_offset + pos * d)[None, :, None] + (tt * d)[None, None, :]
    tl.atomic_add(dw_ptrs, acc, mask=col_ok[:, None, None] & row_ok[None, :, None] & t_ok[None, None, :])


@triton.jit
def _summaries_finish_kernel(
    scratch_ptr, b_ptr, b2_ptr, scale_ptr, rows_ptr, out_ptr,
    H, BH, d, T, TC, COARSE_OFF, total,
    BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_MODE: tl.constexpr,
):
    """out[side, bh, COARSE_OFF + s, c] = (scratch[side, bh, s, c] + b[row(s), c]) * scale, cast (b2
    for side 1): the summaries of the levels wider than a forward chunk. SCALE_MODE 0: none, 1:
    scale[b, s] (avgpool, padded), 2: scale[s] (avgpool, w / p tokens per summary)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    c = idx % d
    s = (idx // d) % TC + COARSE_OFF
    bh = idx // (d * TC)  # side * BH + (b, h)
    value = tl.load(scratch_ptr + idx, mask=ok, other=0.0)
    if HAS_BIAS:
        row = tl.load(rows_ptr + s, mask=ok, other=0)
        first = bh < BH
        value += tl.load(b_ptr + row * d + c, mask=ok & first, other=0.0).to(tl.float32)
        value += tl.load(b2_ptr + row * d + c, mask=ok & ~first, other=0.0).to(tl.float32)
    if SCALE_MODE == 1:
        value *= tl.load(scale_ptr + ((bh % BH) // H) * T + s, mask=ok, other=0.0)
    if SCALE_MODE == 2:
        value *= tl.load(scale_ptr + s, mask=ok, other=0.0)
    tl.store(out_ptr + (bh * T + s) * d + c, value.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shapes of one call: n tokens, block m, rank p, levels L, widths, summary offsets per level."""

    n: int
    m: int
    p: int
    widths: tuple[int, ...]
    offsets: tuple[int, ...]  # first summary of each level in the concatenated buffer, then T

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, n: int, m: int, p: int) -> "Layout":
        widths = tuple(level_widths(n, m))
        if not widths or widths[-1] * 4 != n:
            raise ValueError(f"length {n} is not a valid FMA length for block_size {m} (m * 2^k, at least 4m)")
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + n // w * p)
        return cls(n, m, p, widths, tuple(offsets))

    @property
    def num_levels(self) -> int:
        return len(self.widths)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @property
    def top(self) -> int:
        return self.widths[-1]


@functools.lru_cache(maxsize=32)
def summary_tables(n: int, m: int, p: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per summary of the concatenated buffer [T]: its row level * p + r (int64), and p / w_l (fp32).

    Device operations only, and passed to the operators as inputs: eager callers get them cached per
    shape; a compiled model computes them inside its graph. (Cached inside an operator, they would be
    allocated in a CUDA graph's memory pool and outlive it, which CUDA graph trees refuse.)
    """
    blocks = 2 * n // m
    summary = torch.arange(p * (blocks - 4), device=device)
    first = p * (blocks - blocks // 2 ** torch.arange(len(level_widths(n, m)), device=device))  # per level
    level = (summary[:, None] >= first).sum(1) - 1
    return level * p + (summary - first[level]) % p, (p / m) * torch.exp2(-level.float())


def _pow2_divisor(m: int, cap: int) -> int:
    """The largest power of two that divides m, at most cap."""
    return min(m & -m, cap)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(x: torch.Tensor) -> int:
    return 4 * _num_sms(x.device.index or 0) if x.is_cuda else 64


# Tile sizes (tuned on an H200 at the module docstring's shape, then at train.py's 4,096 x 16 by
# scripts/tune_kernels.py, benchmarks/tune_kernels): E (bh, top cell) pairs per tile (the M or K
# dimension of the batched products, >= 16, at most the pairs there are), BD channels (the batch of
# the products), TOK tokens per tile (a power of two dividing m, padded to >= 16 for the products).
FWD_E, FWD_BD, FWD_TOK, FWD_WARPS, FWD_STAGES = 64, 8, 16, 8, 2
DX_E, DX_BD, DX_TOK, DX_WARPS, DX_STAGES = 128, 16, 32, 4, 2
DW_E, DW_BD, DW_TOK, DW_WARPS, DW_STAGES = 32, 16, 32, 8, 2
# fp32 inputs: "tf32x3" (three tf32 products, fp32-level accuracy, tensor cores) or "ieee" (exact
# fp32 on the FMA units, ~3.5x slower at n = 64K).
FP32_PRECISION = os.environ.get("FMA_DOWNSAMPLE_FP32_PRECISION", "tf32x3")


# Shared memory the operand tiles of one program may take (bytes, all pipeline stages): below the
# H200's 227 KiB per block, leaving room for what Triton adds. Many rows (L levels x p, e.g. p = 8 for
# H-Transformer-1D's averages) make the tiles above too large; E, then BD, are halved until they fit.
SHARED_MEMORY_BUDGET = 200 * 1024


def _tiles(layout: Layout, d: int, pairs: int, E: int, BD: int, TOK: int, *, stages: int, tile_bytes):
    """(LP, E, BD, TOK, BT): rows padded to a power of two >= 16, and the clamped tile sizes.
    tile_bytes(LP, E, BD, BT): the bytes of operand tiles one pipeline stage of the kernel loads; E,
    then BD, shrink until `stages` of them fit SHARED_MEMORY_BUDGET."""
    LP = max(16, triton.next_power_of_2(layout.num_levels * layout.p))
    E = max(16, min(E, triton.next_power_of_2(pairs)))
    BD = min(BD, triton.next_power_of_2(d))
    TOK = _pow2_divisor(layout.m, TOK)
    BT = max(16, TOK)
    while stages * tile_bytes(LP, E, BD, BT) > SHARED_MEMORY_BUDGET and (E > 16 or BD > 1):
        E, BD = (E // 2, BD) if E > 16 else (E, BD // 2)
    return LP, E, BD, TOK, BT


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _operand(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int, bool]:
    """t as a kernel operand for inputs of `dtype`: (flat tensor, offset of the lo half, split).

    For half-precision inputs an fp32 tensor becomes hi = t.to(dtype) followed by lo = (t - hi) in
    dtype, so that two tensor-core products reproduce the fp32 values to about 2^-17; else t as is
    (fp32 inputs: fp32 operands)."""
    t = t.reshape(-1)
    if not _half(dtype):
        return t.to(torch.float32).contiguous(), 0, False
    if t.dtype == dtype:
        return t.contiguous(), 0, False
    t = t.to(torch.float32)
    split = torch.empty(2, t.numel(), dtype=dtype, device=t.device)
    split[0] = t
    split[1] = t - split[0]
    return split.reshape(-1), t.numel(), True


def _sides(tensors):
    """The kernels' two side arguments: (first, second), the first repeated for one side."""
    return tensors[0], tensors[-1]


def _split_weights(w_ops, dummy):
    """Per side the W operands of `_operand` results (or [dummy] without weights), their lo offset, split."""
    return ([w for w, _, _ in w_ops], w_ops[0][1], w_ops[0][2]) if w_ops is not None else ([dummy], 0, False)


def _side_inputs(x, x2):
    """The sides given to an operator as a list ([x] or [x, x2]), made contiguous where their strides
    differ: the kernels take one set of strides."""
    if x2 is None:
        return [x]
    return [x, x2] if x2.stride() == x.stride() else [x.contiguous(), x2.contiguous()]


def _forward(xs, w_ops, b_cats, scale, rows, per_summary, layout: Layout, avg: bool):
    """Summaries of every level of each side x in xs (1 or 2 tensors [B, H, n, d], one shape and
    stride) into one buffer [S, B, H, T, d] (x's dtype). w_ops: per side `_operand` of W_cat, or None;
    b_cats: per side b_cat [L p d], or None; rows, per_summary: `summary_tables`."""
    x, S = xs[0], len(xs)
    B, H, n, d = x.shape
    BH, p, m = B * H, layout.p, layout.m
    T, top, num_levels = layout.total, layout.top, layout.num_levels
    ntop = n // top
    size, w_parts = (2 if _half(x.dtype) else 4), (2 if w_ops is not None and w_ops[0][2] else 1)
    LP, E, BD, TOK, BT = _tiles(layout, d, BH * ntop, FWD_E, FWD_BD, FWD_TOK, stages=FWD_STAGES,  # x, W tiles
                                tile_bytes=lambda LP, E, BD, BT: size * BD * BT * (E + w_parts * LP))
    e_groups, c_groups = triton.cdiv(BH * ntop, E), triton.cdiv(d, BD)
    chunk = FORWARD_CHUNK
    if chunk is None:  # the widest chunk (fewest atomics) that still gives enough programs
        chunk = top
        while chunk > m and S * (top // chunk) * e_groups * c_groups < _target_programs(x):
            chunk //= 2
    assert chunk % m == 0 and top % chunk == 0, f"chunk {chunk} must be a multiple of {m} dividing {top}"
    coarse_level = next((i for i, w in enumerate(layout.widths) if w > chunk), num_levels)
    coarse_off = layout.offsets[coarse_level]
    out = kernel_output((S, B, H, T, d), x.dtype, x.device)
    scratch = torch.zeros((S, BH, T - coarse_off, d), dtype=torch.float32, device=x.device)
    ws, w_lo, split_w = _split_weights(w_ops, scratch)
    bs = b_cats if b_cats is not None else [scratch]
    _summaries_forward_kernel[(top // chunk * c_groups * e_groups, S)](
        *_sides(xs), *_sides(ws), *_sides(bs), scale if scale is not None else scratch, out, scratch,
        H, BH, *x.stride(), d, m, num_levels, top, ntop, 2 * n // m, T, chunk, coarse_off, T - coarse_off, w_lo,
        c_groups, e_groups,
        P=p, LP=LP, E=E, BD=BD, TOK=TOK, BT=BT, AVG=avg, SPLIT_W=split_w, HAS_BIAS=b_cats is not None,
        HAS_SCALE=scale is not None, PRECISION=FP32_PRECISION, EMULATE=_INTERPRETED,
        num_warps=FWD_WARPS, num_stages=FWD_STAGES,
    )
    if coarse_level < num_levels:  # finish the wide levels: bias, scale, cast
        total, block = scratch.numel(), 1024
        _summaries_finish_kernel[(triton.cdiv(total, block),)](
            scratch, *_sides(bs), scale if scale is not None else per_summary, rows, out,
            H, BH, d, T, T - coarse_off, coarse_off, total,
            BLOCK=block, HAS_BIAS=b_cats is not None, SCALE_MODE=1 if scale is not None else 2 if avg else 0,
        )
    return out


def _grad_input(g_op, w_ops, layout: Layout, avg: bool, shape, dtype):
    """dx [S, B, H, n, d] (dtype) from dS (`_operand` of g [S, B*H, T, d]; avgpool: g times the summary
    scales) and per side W (`_operand` of W_cat; None for avgpool)."""
    S, B, H, n, d = shape
    BH = B * H
    ntop = n // layout.top
    size = 2 if _half(dtype) else 4
    g_parts, w_parts = (2 if g_op[2] else 1), (2 if w_ops is not None and w_ops[0][2] else 1)
    LP, E, BD, TOK, BT = _tiles(layout, d, BH * ntop, DX_E, DX_BD, DX_TOK, stages=DX_STAGES,  # dS, W tiles
                                tile_bytes=lambda LP, E, BD, BT: size * BD * LP * (g_parts * E + w_parts * BT))
    tiles = (layout.top // TOK) * triton.cdiv(d, BD)
    groups = triton.cdiv(BH * ntop, E)
    splits = min(groups, triton.cdiv(_target_programs(g_op[0]), S * tiles))  # W tile loads: one per split
    per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, per_split)
    dx = kernel_output(shape, dtype, g_op[0].device)
    g, g_lo, split_g = g_op
    ws, w_lo, split_w = _split_weights(w_ops, g)
    _summaries_grad_input_kernel[(layout.top // TOK * triton.cdiv(d, BD) * splits, S)](
        g, *_sides(ws), dx,
        BH, n, d, layout.m, layout.num_levels, layout.top, ntop, 2 * n // layout.m, layout.total, per_split,
        w_lo, g_lo, triton.cdiv(d, BD), splits, P=layout.p, LP=LP, E=E, BD=BD, TOK=TOK, BT=BT, AVG=avg,
        SPLIT_W=split_w, SPLIT_G=split_g, PRECISION=FP32_PRECISION, EMULATE=_INTERPRETED,
        num_warps=DX_WARPS, num_stages=DX_STAGES,
    )
    return dx


def _grad_weight(xs, g, layout: Layout):
    """dW_cat [S, R] (fp32) from the sides xs (1 or 2 tensors [B, H, n, d], one shape and stride) and
    dS g [S, B*H, T, d] (x's dtype)."""
    x, S = xs[0], len(xs)
    B, H, n, d = x.shape
    BH = B * H
    ntop = n // layout.top
    size = 2 if _half(x.dtype) else 4
    LP, E, BD, TOK, BT = _tiles(layout, d, BH * ntop, DW_E, DW_BD, DW_TOK, stages=DW_STAGES,  # dS, x tiles
                                tile_bytes=lambda LP, E, BD, BT: size * BD * E * (LP + BT))
    tiles = (layout.top // TOK) * triton.cdiv(d, BD)
    groups = triton.cdiv(BH * ntop, E)
    splits = min(groups, triton.cdiv(_target_programs(x), S * tiles))  # each split: one set of atomics
    per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, per_split)
    dw = torch.zeros(S, layout.p * d * sum(layout.widths), dtype=torch.float32, device=x.device)
    _summaries_grad_weight_kernel[(layout.top // TOK * triton.cdiv(d, BD) * splits, S)](
        *_sides(xs), g, dw, H, BH, *x.stride(), d, layout.m, layout.num_levels, layout.top, ntop,
        2 * n // layout.m, layout.total, per_split, dw.shape[1], triton.cdiv(d, BD), splits, P=layout.p, LP=LP,
        E=E, BD=BD, TOK=TOK, BT=BT, PRECISION=FP32_PRECISION, EMULATE=_INTERPRETED,
        num_warps=DW_WARPS, num_stages=DW_STAGES,
    )
    return dw


# The kernels as registered operators (torch.library): torch.compile traces through them without a
# graph break (the fake implementations give the shapes), CUDA graphs can capture them, and autograd
# is registered on the forward operator. Half-precision operands are split (`_operand`) inside them.


@torch.library.custom_op("fma::summaries_forward", mutates_args=())
def summaries_forward(x: torch.Tensor, x2: Optional[torch.Tensor], w_cat: Optional[torch.Tensor],
                      w2_cat: Optional[torch.Tensor], b_cat: Optional[torch.Tensor], b2_cat: Optional[torch.Tensor],
                      scale: Optional[torch.Tensor], rows: torch.Tensor, per_summary: torch.Tensor,
                      block_size: int, rank: int, avg: bool) -> torch.Tensor:
    """Every level's summaries of x [B, H, n, d] (W_cat, b_cat) and, if given, of a second side x2 of
    x's shape and dtype (its own W2_cat, b2_cat) in one buffer [S, B, H, T, d] (x's dtype), both sides
    in each kernel launch; scale [B, T] (avgpool, padded) is shared; rows and per_summary from
    `summary_tables`."""
    xs = _side_inputs(x, x2)
    w_ops = None if w_cat is None else [_operand(w, x.dtype) for w in [w_cat, w2_cat][:len(xs)]]
    b_cats = None if b_cat is None else [b_cat, b2_cat][:len(xs)]
    return _forward(xs, w_ops, b_cats, scale, rows, per_summary, Layout.of(x.shape[2], block_size, rank), avg)


# The fake implementations use shape arithmetic only (no Layout): under torch.compile the shapes may
# be symbolic. T = sum_l (n / w_l) p = p (2n / m - 4); sum_l w_l = n / 2 - m.


@summaries_forward.register_fake
def _(x, x2, w_cat, w2_cat, b_cat, b2_cat, scale, rows, per_summary, block_size, rank, avg):
    batch, heads, n, d = x.shape
    return x.new_empty(1 if x2 is None else 2, batch, heads, rank * (2 * n // block_size - 4), d)


@torch.library.custom_op("fma::summaries_grad_input", mutates_args=())
def summaries_grad_input(g: torch.Tensor, w_cat: Optional[torch.Tensor], w2_cat: Optional[torch.Tensor],
                         scale: Optional[torch.Tensor], per_summary: torch.Tensor, x_shape: list[int],
                         block_size: int, rank: int, avg: bool) -> torch.Tensor:
    """dx [S, B, H, n, d] in g's dtype from dS g [S, B*H, T, d] and each side's W (w2_cat for side 1;
    avgpool: the summary scales instead: `scale` when padded, else per_summary from `summary_tables`)."""
    S, (B, H, n, d) = g.shape[0], x_shape
    layout = Layout.of(n, block_size, rank)
    if avg:  # the summary scales are part of the (fixed) weights: fold them into dS
        if scale is not None:
            g_in = (g.view(S, B, H, layout.total, d).float() * scale[:, None, :, None]).view(g.shape)
        else:
            g_in = g.float() * per_summary[:, None]
        g_op, w_ops = _operand(g_in, g.dtype), None
    else:
        g_op, w_ops = (g, 0, False), [_operand(w, g.dtype) for w in [w_cat, w2_cat][:S]]
    return _grad_input(g_op, w_ops, layout, avg, (S, B, H, n, d), g.dtype)


@summaries_grad_input.register_fake
def _(g, w_cat, w2_cat, scale, per_summary, x_shape, block_size, rank, avg):
    return g.new_empty(g.shape[0], *x_shape)


@torch.library.custom_op("fma::summaries_grad_weight", mutates_args=())
def summaries_grad_weight(x: torch.Tensor, x2: Optional[torch.Tensor], g: torch.Tensor, block_size: int,
                          rank: int) -> torch.Tensor:
    """dW_cat [S, R] (fp32; side 1's from x2) from x [B, H, n, d] and dS g [S, B*H, T, d] (x's dtype)."""
    return _grad_weight(_side_inputs(x, x2), g, Layout.of(x.shape[2], block_size, rank))


@summaries_grad_weight.register_fake
def _(x, x2, g, block_size, rank):
    return x.new_empty(g.shape[0], rank * x.shape[3] * (x.shape[2] // 2 - block_size), dtype=torch.float32)


@torch.library.custom_op("fma::summaries_grad_bias", mutates_args=())
def summaries_grad_bias(g: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """db_cat [S, num_rows * d] (fp32, num_rows = L p) from dS g [S, B*H, T, d]: each summary's gradient
    summed into its row (level, r), rows from `summary_tables`."""
    db = torch.zeros(g.shape[0], num_rows, g.shape[3], dtype=torch.float32, device=g.device)
    return db.index_add_(1, rows, g.sum(1, dtype=torch.float32)).flatten(1)


@summaries_grad_bias.register_fake
def _(g, rows, num_rows):
    return g.new_empty(g.shape[0], num_rows * g.shape[3], dtype=torch.float32)


def _save_for_backward(ctx, inputs, output):
    x, x2, w_cat, w2_cat, b_cat, b2_cat, scale, rows, per_summary, block_size, rank, avg = inputs
    ctx.save_for_backward(x, x2, w_cat, w2_cat, scale, rows, per_summary)
    ctx.block_size, ctx.rank, ctx.avg = block_size, rank, avg
    ctx.bias_rows = None if b_cat is None else b_cat.shape[0] // x.shape[3]


def _backward(ctx, grad):
    x, x2, w_cat, w2_cat, scale, rows, per_summary = ctx.saved_tensors
    S, (B, H, n, d) = grad.shape[0], x.shape
    g = grad.reshape(S, B * H, -1, d).to(x.dtype).contiguous()
    m, p = ctx.block_size, ctx.rank
    # Each side's gradient is a view of one buffer [S, ...] that the kernels wrote in one launch.
    need_x, need_w, need_b = (any(ctx.needs_input_grad[i:i + 2]) for i in (0, 2, 4))
    dx = summaries_grad_input(g, w_cat, w2_cat, scale, per_summary, list(x.shape), m, p, ctx.avg) if need_x else None
    dw = summaries_grad_weight(x, x2, g, m, p).to(w_cat.dtype) if need_w else None
    db = summaries_grad_bias(g, rows, ctx.bias_rows).to(w_cat.dtype) if need_b else None
    per_side = [None if t is None else list(t.unbind(0)) + [None] * (2 - S) for t in (dx, dw, db)]
    grads = [side for t in per_side for side in (t or [None, None])]
    return (*grads, None, None, None, None, None, None)


summaries_forward.register_autograd(_backward, setup_context=_save_for_backward)


def fused_summaries(
    xs: list[torch.Tensor],
    kind: str,
    block_size: int,
    rank: int,
    weights: list[torch.Tensor] | None = None,
    biases: list[torch.Tensor] | None = None,
    counts: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """All levels' summaries of each side x in xs (1 or 2 tensors [B, H, n, d] of one shape and dtype,
    zero at pads; a layer's keys and values: 2, summarised in the same kernel launches) in one buffer
    [S, B, H, T, d] of x's dtype.

    kind "groupedconv": per side a weight [sum_l p w_l, d] and a bias [L p, d], levels in order as
    `Downsample` holds them, at least the levels of this n (rows of longer sequences' levels are
    ignored). kind "avgpool": no parameters; counts (per level [B, (n / w_l) * p], real tokens per
    summary, as Downsample computes them; the same for every side) or None (no padding).
    Differentiable in xs, the weights and the biases. Level l occupies rows offsets[l-1]:offsets[l] of
    dim 3, see `Layout.of(n, block_size, rank).offsets`. (Plain arithmetic here, no Layout:
    torch.compile traces this wrapper, and cannot trace a cached classmethod.)
    """
    if kind not in ("groupedconv", "avgpool"):
        raise ValueError(f"no fused kernel for downsampling {kind!r}")
    if len(xs) not in (1, 2):
        raise ValueError(f"the kernels summarise one or two sides at once, not {len(xs)}")
    widths = level_widths(xs[0].shape[2], block_size)
    avg = kind == "avgpool"
    w_cats = b_cats = []
    scale = None
    if avg:
        if counts is not None:
            scale = torch.cat(counts, dim=1).to(torch.float32).clamp_min(1).reciprocal().contiguous()
    else:  # level l's p w_l filter rows and p bias rows, in order
        w_cats = [weight[:rank * sum(widths)].reshape(-1) for weight in weights]
        b_cats = [bias[:len(widths) * rank].reshape(-1) for bias in biases]
    rows, per_summary = summary_tables(xs[0].shape[2], block_size, rank, xs[0].device)
    x, x2 = _first_and_second(xs)
    w_cat, w2_cat = _first_and_second(w_cats)
    b_cat, b2_cat = _first_and_second(b_cats)
    return summaries_forward(x, x2, w_cat, w2_cat, b_cat, b2_cat, scale, rows, per_summary, block_size, rank, avg)


def _first_and_second(items: list) -> tuple:
    """A list of up to two sides as the operators' (first, second) arguments, None where absent."""
    first, second, *_ = [*items, None, None]
    return first, second


def split_levels(buffer: torch.Tensor, block_size: int, rank: int) -> list[torch.Tensor]:
    """Per-level views [B, H, (n / w_l) * p, d] of one side [B, H, T, d] of a buffer from
    `fused_summaries` (n from its size)."""
    total = buffer.shape[2]
    n = (total // rank + 4) * block_size // 2  # T = p * (2n / m - 4)
    sizes = [n // width * rank for width in level_widths(n, block_size)]
    assert sum(sizes) == total, f"{total} summaries fit no valid length for block_size {block_size}, rank {rank}"
    return list(buffer.split(sizes, dim=2))
