"""Fused Triton kernels for the learned downsampling (`groupedconv`) and `avgpool`: every level at once.

What is computed (fma/downsample.py, docs/fma-algorithm.md): for keys (or values) x [B, H, n, d] and
levels l = 1..L of cell width w_l = m * 2^(l-1) (the widest is n / 4),
    S_l[bh, cell, r, c] = b_l[r, c] + sum_{t < w_l} W_l[r, t, c] * x[bh, cell * w_l + t, c].
avgpool is the same with W_l[r, t, c] = [t // (w_l / p) == r] and no bias, times 1 / (w_l / p), or
times 1 / (real count) when padded. All levels are written into ONE buffer [B, H, T, d],
T = sum_l (n / w_l) * p, level l at rows [off_l, off_l + (n / w_l) * p), cell-major; `Downsample`
returns per-level views of it (`torch.split`), so a consumer may also take the buffer whole.

Bandwidth floor (METHOD.md), the numbers this is measured against. n = 65,536, B = 2, H = 8, d = 64,
m = 64, p = 2, bf16 (L = 9 levels, T = 4,088 summaries per head), H200 copy rate ~4.3 TB/s:
  forward:  read x 134.2 MB + write summaries 8.4 MB (+ W 16.7 MB fp32, once from DRAM; it is shared
            by all 16 heads and should stay in L2)          -> 142.6 MB (159 MB with W) = 33 us (37 us)
  backward: read x 134.2 MB + write dx 134.2 MB + read dS 8.4 MB (+ W read, dW written 16.7 MB each)
                                                            -> 277 MB (310 MB)          = 64 us (72 us)
  The arithmetic is not free either: n * B*H * d * p * L = 1.2 G fused multiply-adds per pass over x
  (forward; dx and dW each the same again), which is 36 us per pass at the H200's ~33.5 T fp32 FMA/s
  (no tensor-core formulation: the product is per channel). Forward and each half of the backward
  therefore sit near both a ~35 us memory floor and a ~36 us FMA floor; a realistic target is
  ~2x those: forward ~80 us, backward ~150 us per side.

What this design moves (each kernel reads x or writes dx exactly once):
  forward  `_forward_kernel`: x once (134 MB); summaries once (levels whose cells fit in a program's
           chunk stored directly in x's dtype; the few summaries of wider cells accumulated with fp32
           atomics into a small scratch, ~2 MB at the shape above, then finished in torch); W from L2,
           each W element loaded by a program is reused by E (bh, top-cell) pairs (16 by default).
  backward `_grad_input_kernel`: reads dS (L2) and W (L2), writes dx once (134 MB).
           `_grad_weight_kernel`: reads x once (134 MB) and dS, reduces over every (bh, top cell) in
           registers, then fp32 atomics into dW: W*L*p*d atomics (~19 M at the shape above).
           db is a torch sum over dS (8 MB).

The k-folding: the widest cell is W* = n / 4 wide, and every cell width divides W*, so the tokens
t = k * W* + o (k = 0..3) sit at the same position o mod w_l inside their level-l cells for EVERY
level: a program that handles the in-cell offsets [o, o + C) handles them in all 4 top cells and in a
group of heads, so one load of W serves E = 4 * (heads in the group) rows of x.

Kernels read x through its strides (a permuted view of the qkv projection is not copied), need
nothing newer than Triton 3.0 (loads/stores with masks, atomic_add, sum/where/arange), and run on
the CPU under TRITON_INTERPRET=1 (set before this module is imported).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .functional import level_widths

# Debugging aid for tests: fill freshly allocated outputs with NaN so that an unwritten element shows.
POISON_OUTPUTS = False
# The last compiled kernel of each kind (for inspecting registers, spills and the IR).
LAST_COMPILED: dict = {}
# Tests may force the forward chunk (in-cell offsets per program; a multiple of m dividing n / 4).
FORWARD_CHUNK: int | None = None


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


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
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, out_ptr, scratch_ptr,
    H, BH, sx_b, sx_h, sx_n, sx_d,
    d, m, num_levels, W_TOP, NTOP, N2, T, CHUNK, COARSE_OFF, TC,
    P: tl.constexpr, LP: tl.constexpr, E: tl.constexpr, BD: tl.constexpr,
    AVG: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """One program: in-cell offsets [o0, o0 + CHUNK) of each top cell, E (bh, top cell) pairs, BD channels.

    acc[row, e, c] (row = (level, r)) collects sum_t W[row, pos_l(t), c] * x[e, t, c] token by token;
    a level whose cells fit in the chunk is stored (with bias, scale) whenever its cell ends; wider
    levels are added to the fp32 scratch at the end (finished by the caller)."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_e = tl.program_id(2)
    o0 = pid_o * CHUNK

    rows = tl.arange(0, LP)
    row_ok, level, r, width, w_offset, s_offset = _row_meta(rows, P, m, num_levels, d, N2)
    cols = pid_c * BD + tl.arange(0, BD)
    col_ok = cols < d
    ee = pid_e * E + tl.arange(0, E)
    k_top = ee % NTOP
    bh = ee // NTOP
    e_ok = bh < BH
    bh = tl.where(e_ok, bh, 0)
    b_idx = bh // H
    h_idx = bh % H
    tok0 = k_top * W_TOP + o0  # first token of the chunk, per e
    x_rows = x_ptr + b_idx.to(tl.int64) * sx_b + h_idx.to(tl.int64) * sx_h + tok0.to(tl.int64) * sx_n
    x_ptrs = x_rows[:, None] + (cols * sx_d)[None, :]
    x_mask = e_ok[:, None] & col_ok[None, :]
    w_ptrs = w_ptr + w_offset[:, None] + cols[None, :]
    w_mask = row_ok[:, None] & col_ok[None, :]
    out_rows = bh.to(tl.int64) * T * d  # [E]
    if HAS_BIAS:
        bias = tl.load(b_ptr + (level * P + r)[:, None] * d + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
    if AVG:
        segment = width // P

    acc = tl.zeros((LP, E, BD), dtype=tl.float32)
    pos = o0 % width  # position of the current token inside its level-l cell, per row
    for i in range(0, CHUNK):
        xv = tl.load(x_ptrs + i * sx_n, mask=x_mask, other=0.0).to(tl.float32)
        if AVG:
            wv = tl.where(row_ok & (pos // segment == r), 1.0, 0.0)
            acc += wv[:, None, None] * xv[None, :, :]
        else:
            wv = tl.load(w_ptrs + (pos * d)[:, None], mask=w_mask, other=0.0).to(tl.float32)
            acc += wv[:, None, :] * xv[None, :, :]
        pos = pos + 1
        done = row_ok & (pos == width) & (width <= CHUNK)  # cells that end with this token
        pos = tl.where(pos == width, 0, pos)
        if (i + 1) % m == 0:  # every cell end is a level-1 cell end
            cell = (tok0[None, :] + i) // width[:, None]  # [LP, E]
            summary = s_offset[:, None] + cell * P + r[:, None]
            value = acc
            if HAS_BIAS:
                value = value + bias[:, None, :]
            if HAS_SCALE:
                sc = tl.load(scale_ptr + b_idx[None, :] * T + summary, mask=done[:, None] & e_ok[None, :], other=0.0)
                value = value * sc[:, :, None]
            elif AVG:
                value = value / segment.to(tl.float32)[:, None, None]
            o_ptrs = out_ptr + (out_rows[None, :] + summary * d)[:, :, None] + cols[None, None, :]
            o_mask = done[:, None, None] & x_mask[None, :, :]
            tl.store(o_ptrs, value.to(out_ptr.dtype.element_ty), mask=o_mask)
            acc = tl.where(done[:, None, None], 0.0, acc)

    # Levels wider than the chunk: this program holds one partial sum per (row, e); add it up.
    if CHUNK < W_TOP:
        coarse = row_ok & (width > CHUNK)
        cell = tok0[None, :] // width[:, None]
        summary = s_offset[:, None] + cell * P + r[:, None] - COARSE_OFF
        s_ptrs = scratch_ptr + (bh.to(tl.int64)[None, :] * TC * d + summary * d)[:, :, None] + cols[None, None, :]
        tl.atomic_add(s_ptrs, acc, mask=coarse[:, None, None] & x_mask[None, :, :])


@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, dx_ptr,
    BH, n, d, m, num_levels, W_TOP, NTOP, N2, T,
    P: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, AVG: tl.constexpr,
):
    """dx[e, o0 + i, c] = sum_rows W[row, pos_l(o0 + i), c] * dS[e, summary of row, c] for a BT x BD tile
    and E (bh, top cell) pairs; rows one at a time, so nothing is reduced across threads."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_e = tl.program_id(2)
    o0 = pid_o * BT
    ti = tl.arange(0, BT)
    cols = pid_c * BD + tl.arange(0, BD)
    col_ok = cols < d
    ee = pid_e * E + tl.arange(0, E)
    k_top = ee % NTOP
    bh = ee // NTOP
    e_ok = bh < BH
    bh = tl.where(e_ok, bh, 0)
    tok0 = k_top * W_TOP + o0
    g_rows = g_ptr + bh.to(tl.int64) * T * d
    g_mask = e_ok[:, None] & col_ok[None, :]

    acc = tl.zeros((E, BT, BD), dtype=tl.float32)
    for row in range(0, num_levels * P):
        level = row // P
        r = row % P
        width = m << level
        pos = o0 % width + ti  # a BT tile lies inside one level-1 cell: no wrap
        summary = P * (N2 - (N2 >> level)) + (tok0 // width) * P + r  # [E]
        gv = tl.load(g_rows[:, None] + (summary * d)[:, None] + cols[None, :], mask=g_mask, other=0.0)
        gv = gv.to(tl.float32)
        if AVG:
            wv = tl.where(pos // (width // P) == r, 1.0, 0.0)
            acc += wv[None, :, None] * gv[:, None, :]
        else:
            w_base = (P * d * m * ((1 << level) - 1) + r * width * d).to(tl.int64)
            wv = tl.load(w_ptr + w_base + (pos * d)[:, None] + cols[None, :], mask=col_ok[None, :], other=0.0)
            acc += wv.to(tl.float32)[None, :, :] * gv[:, None, :]

    dx_ptrs = dx_ptr + (bh.to(tl.int64) * n * d + tok0.to(tl.int64) * d)[:, None, None] + (ti * d)[None, :, None]
    dx_ptrs += cols[None, None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=g_mask[:, None, :])


@triton.jit
def _grad_weight_kernel(
    x_ptr, g_ptr, dw_ptr,
    H, BH, sx_b, sx_h, sx_n, sx_d,
    d, m, num_levels, W_TOP, NTOP, N2, T, E_PER_SPLIT,
    P: tl.constexpr, LP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """dW[row, pos_l(o0 + i), c] += sum_e dS[e, summary of row, c] * x[e, o0 + i, c] for one BT x BD
    tile of in-cell offsets over a range of (bh, top cell) pairs e; fp32 atomics at the end."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    o0 = pid_o * BT
    ti = tl.arange(0, BT)
    rows = tl.arange(0, LP)
    row_ok, level, r, width, w_offset, s_offset = _row_meta(rows, P, m, num_levels, d, N2)
    cols = pid_c * BD + tl.arange(0, BD)
    col_ok = cols < d
    g_mask = row_ok[:, None] & col_ok[None, :]
    x_tile = (ti * sx_n)[:, None] + (cols * sx_d)[None, :]

    acc = tl.zeros((LP, BT, BD), dtype=tl.float32)
    e_start = pid_s * E_PER_SPLIT
    e_end = tl.minimum(e_start + E_PER_SPLIT, BH * NTOP)
    for e in range(e_start, e_end):
        k_top = e % NTOP
        bh = e // NTOP
        tok0 = k_top * W_TOP + o0
        x_base = (bh // H).to(tl.int64) * sx_b + (bh % H).to(tl.int64) * sx_h + tok0.to(tl.int64) * sx_n
        xv = tl.load(x_ptr + x_base + x_tile, mask=col_ok[None, :], other=0.0).to(tl.float32)
        summary = s_offset + (tok0 // width) * P + r
        gv = tl.load(g_ptr + bh.to(tl.int64) * T * d + (summary * d)[:, None] + cols[None, :], mask=g_mask, other=0.0)
        acc += gv.to(tl.float32)[:, None, :] * xv[None, :, :]

    pos = o0 % width  # [LP]
    dw_ptrs = dw_ptr + (w_offset + pos * d)[:, None, None] + (ti * d)[None, :, None] + cols[None, None, :]
    tl.atomic_add(dw_ptrs, acc, mask=g_mask[:, None, :])


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


def _pow2_divisor(m: int, cap: int) -> int:
    """The largest power of two that divides m, at most cap."""
    return min(m & -m, cap)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(x: torch.Tensor) -> int:
    return 4 * _num_sms(x.device.index or 0) if x.is_cuda else 64


def _empty(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


# Tile sizes: E (bh, top cell) pairs share each loaded W element; BD channels per program.
FWD_E, FWD_BD, FWD_WARPS = 16, 16, 8
BWD_E, BWD_BT, BWD_BD, BWD_WARPS = 16, 16, 16, 4
DW_BT, DW_BD, DW_WARPS = 16, 16, 8


def _forward(x, w_cat, b_cat, scale, layout: Layout, avg: bool):
    """Summaries of every level into one buffer [B, H, T, d] (x's dtype)."""
    chunk = FORWARD_CHUNK
    B, H, n, d = x.shape
    BH, p, m = B * H, layout.p, layout.m
    T, top, num_levels = layout.total, layout.top, layout.num_levels
    ntop = n // top
    LP = triton.next_power_of_2(num_levels * p)
    E = min(FWD_E, triton.next_power_of_2(BH * ntop))
    BD = min(FWD_BD, triton.next_power_of_2(d))
    e_groups, c_groups = triton.cdiv(BH * ntop, E), triton.cdiv(d, BD)
    if chunk is None:  # the widest chunk (fewest atomics) that still gives enough programs
        chunk = top
        while chunk > m and (top // chunk) * e_groups * c_groups < _target_programs(x):
            chunk //= 2
    coarse_level = next((i for i, w in enumerate(layout.widths) if w > chunk), num_levels)
    coarse_off = layout.offsets[coarse_level]
    out = _empty((B, H, T, d), x.dtype, x.device)
    scratch = torch.zeros((BH, T - coarse_off, d), dtype=torch.float32, device=x.device)
    dummy = scratch
    LAST_COMPILED["forward"] = _forward_kernel[(top // chunk, c_groups, e_groups)](
        x, w_cat if w_cat is not None else dummy, b_cat if b_cat is not None else dummy,
        scale if scale is not None else dummy, out, scratch,
        H, BH, *x.stride(), d, m, num_levels, top, ntop, 2 * n // m, T, chunk, coarse_off, T - coarse_off,
        P=p, LP=LP, E=E, BD=BD, AVG=avg, HAS_BIAS=b_cat is not None, HAS_SCALE=scale is not None,
        num_warps=FWD_WARPS,
    )
    if coarse_level < num_levels:  # finish the wide levels: bias, scale, cast
        tail = scratch.view(B, H, T - coarse_off, d)
        if b_cat is not None:
            tail += torch.cat([
                b_cat[i * p * d:(i + 1) * p * d].view(1, p, d).expand(n // w, p, d).reshape(-1, d)
                for i, w in enumerate(layout.widths) if i >= coarse_level
            ]).float()
        if scale is not None:
            tail *= scale[:, None, coarse_off:, None]
        elif avg:
            tail *= torch.cat([
                torch.full((n // w * p,), p / w, device=x.device) for w in layout.widths[coarse_level:]
            ])[:, None]
        out[:, :, coarse_off:] = tail
    return out


def _grad_input(g, w_cat, layout: Layout, avg: bool, shape, dtype):
    B, H, n, d = shape
    BH, p = B * H, layout.p
    ntop = n // layout.top
    E = min(BWD_E, triton.next_power_of_2(BH * ntop))
    BT = _pow2_divisor(layout.m, BWD_BT)
    BD = min(BWD_BD, triton.next_power_of_2(d))
    dx = _empty(shape, dtype, g.device)
    grid = (layout.top // BT, triton.cdiv(d, BD), triton.cdiv(BH * ntop, E))
    LAST_COMPILED["grad_input"] = _grad_input_kernel[grid](
        g, w_cat if w_cat is not None else g, dx,
        BH, n, d, layout.m, layout.num_levels, layout.top, ntop, 2 * n // layout.m, layout.total,
        P=p, E=E, BT=BT, BD=BD, AVG=avg, num_warps=BWD_WARPS,
    )
    return dx


def _grad_weight(x, g, layout: Layout):
    B, H, n, d = x.shape
    BH, p = B * H, layout.p
    ntop = n // layout.top
    LP = triton.next_power_of_2(layout.num_levels * p)
    BT = _pow2_divisor(layout.m, DW_BT)
    BD = min(DW_BD, triton.next_power_of_2(d))
    tiles = (layout.top // BT) * triton.cdiv(d, BD)
    pairs = BH * ntop
    splits = max(1, min(pairs // 8, triton.cdiv(_target_programs(x), tiles)))
    per_split = triton.cdiv(pairs, splits)
    splits = triton.cdiv(pairs, per_split)
    dw = torch.zeros(p * d * sum(layout.widths), dtype=torch.float32, device=x.device)
    LAST_COMPILED["grad_weight"] = _grad_weight_kernel[(layout.top // BT, triton.cdiv(d, BD), splits)](
        x, g, dw, H, BH, *x.stride(), d, layout.m, layout.num_levels, layout.top, ntop, 2 * n // layout.m,
        layout.total, per_split, P=p, LP=LP, BT=BT, BD=BD, num_warps=DW_WARPS,
    )
    return dw


class _FusedDownsample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_cat, b_cat, scale, layout, avg):
        out = _forward(x, w_cat, b_cat, scale, layout, avg)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w_cat, scale)
        ctx.layout, ctx.avg, ctx.x_meta = layout, avg, (x.shape, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w_cat, scale = ctx.saved_tensors
        layout, avg = ctx.layout, ctx.avg
        B, H, n, d = ctx.x_meta[0]
        g = grad.reshape(B * H, layout.total, d)
        if not g.is_contiguous():
            g = g.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            g_in = g
            if avg:  # the scale is part of the (fixed) weights: fold it into the gradient
                if scale is not None:
                    g_in = g.view(B, H, layout.total, d) * scale[:, None, :, None]
                else:
                    per_summary = torch.cat([
                        torch.full((n // w * layout.p,), layout.p / w, device=g.device) for w in layout.widths
                    ])
                    g_in = g * per_summary[:, None]
                g_in = g_in.reshape(B * H, layout.total, d).to(torch.float32)
            dx = _grad_input(g_in, w_cat, layout, avg, (B, H, n, d), ctx.x_meta[1])
        if ctx.needs_input_grad[1]:
            dw = _grad_weight(x, g, layout).to(w_cat.dtype)
        if ctx.needs_input_grad[2]:
            db = torch.cat([
                g[:, layout.offsets[i]:layout.offsets[i + 1]].unflatten(1, (-1, layout.p)).sum((0, 1), dtype=torch.float32)
                .reshape(-1) for i in range(layout.num_levels)
            ]).to(w_cat.dtype if w_cat is not None else torch.float32)
        return dx, dw, db, None, None, None


def fused_summaries(
    x: torch.Tensor,
    kind: str,
    block_size: int,
    rank: int,
    weights: list[torch.Tensor] | None = None,
    biases: list[torch.Tensor] | None = None,
    counts: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """All levels' summaries of x [B, H, n, d] (zero at pads) in one buffer [B, H, T, d] of x's dtype.

    kind "groupedconv": weights[l] [p, w_l, d], biases[l] [p, d] for every level of this n (extra
    levels, for longer sequences, are ignored). kind "avgpool": no parameters; counts (per level
    [B, (n / w_l) * p], real tokens per summary, as Downsample computes them) or None (no padding).
    Differentiable in x, weights and biases. Level l occupies rows offsets[l-1]:offsets[l] of dim 2,
    see `Layout.of(n, block_size, rank).offsets`.
    """
    if kind not in ("groupedconv", "avgpool"):
        raise ValueError(f"no fused kernel for downsampling {kind!r}")
    layout = Layout.of(x.shape[2], block_size, rank)
    avg = kind == "avgpool"
    w_cat = b_cat = scale = None
    if avg:
        if counts is not None:
            scale = torch.cat(counts, dim=1).to(torch.float32).clamp_min(1).reciprocal().contiguous()
    else:
        w_cat = torch.cat([w.reshape(-1) for w in weights[: layout.num_levels]])
        b_cat = torch.cat([b.reshape(-1) for b in biases[: layout.num_levels]])
    return _FusedDownsample.apply(x, w_cat, b_cat, scale, layout, avg)


def split_levels(buffer: torch.Tensor, block_size: int, rank: int) -> list[torch.Tensor]:
    """Per-level views [B, H, (n / w_l) * p, d] of a buffer from `fused_summaries` (n from its size)."""
    sizes = []
    total, n = buffer.shape[2], None
    # T = p * (2n/m - 4): solve for n.
    n = (total // rank + 4) * block_size // 2
    layout = Layout.of(n, block_size, rank)
    assert layout.total == total
    sizes = [layout.offsets[i + 1] - layout.offsets[i] for i in range(layout.num_levels)]
    return list(buffer.split(sizes, dim=2))


# ---------------------------------------------------------------------------------------------------
# Benchmark helper (for the lead's benchmark script; not used by tests)
# ---------------------------------------------------------------------------------------------------


def benchmark_downsample(n=65536, batch=2, heads=8, d=64, m=64, p=2, dtype=torch.bfloat16, kind="groupedconv"):
    """Median forward+backward milliseconds of the fused and the torch path of `Downsample` on CUDA.

    The input is a non-contiguous view [batch, heads, n, d] of a qkv-like projection, as in the model.
    Returns {"fused_ms", "torch_ms", "fused_fwd_ms", "torch_fwd_ms", "floor_fwd_bwd_ms"}.
    """
    from triton.testing import do_bench

    from .downsample import Downsample

    device = "cuda"
    module = Downsample(kind, head_dim=d, block_size=m, rank=p, max_seq_len=n).to(device)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.01 * torch.randn_like(param))
    qkv = torch.randn(batch, n, 3, heads, d, device=device, dtype=dtype)
    x = qkv[:, :, 1].permute(0, 2, 1, 3).requires_grad_()  # non-contiguous, like fma/multipole.py
    x = x.detach().requires_grad_()
    layout = Layout.of(n, m, p)
    grad = torch.randn(batch, heads, layout.total, d, device=device, dtype=dtype)
    results = {}
    for name, fused in (("fused", True), ("torch", False)):
        def fwd():
            return module(x, None, fused=fused)[0]

        def fwd_bwd():
            out = fwd()
            grads = [g.to(o.dtype) for g, o in zip(split_levels(grad, m, p), out)]
            torch.autograd.backward(out, grads)

        results[f"{name}_fwd_ms"] = do_bench(fwd, return_mode="median")
        results[f"{name}_ms"] = do_bench(fwd_bwd, return_mode="median")
    elem = torch.finfo(dtype).bits // 8
    x_bytes = batch * heads * n * d * elem
    s_bytes = batch * heads * layout.total * d * elem
    results["floor_fwd_bwd_ms"] = (3 * x_bytes + 2 * s_bytes) / 4.3e12 * 1e3
    return results
