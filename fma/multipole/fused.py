"""Fused Triton kernels for Fast Multipole Attention: backend "triton" of `multipole_attention`.

Same function as `blocklocal.block_local_attention` (one softmax per query over its fine keys
and the coarse summaries of every level, same masks and logit biases), without ever holding the
gathered [blocks, S, d] key set or any n x n tensor.

Forward (`_multipole_forward_kernel`), one program per (fine block of m queries, batch * head):
  - q tile [m, d] stays in registers; online softmax (flash attention) in fp32, base-2 exponents
    (scores are pre-multiplied by log2(e), so the stored log-sum-exp is in base 2 too);
  - fine key tiles of BLOCK_N keys (`launch_config`) over the block's neighbourhood: blocks b-1, b
    (causal, with the diagonal mask k <= q) or b-1, b, b+1 (bidirectional), clipped to the sequence;
    each fine key adds its padding bias (0, or -inf at pads) when a key_padding_mask is given;
  - coarse tiles of BLOCK_C summaries: the <= 2pL (causal) or 3pL (bidirectional) summaries the
    block sees are gathered inside the kernel through `coarse_index` [n/m, C] (int32 rows of the
    levels' summaries concatenated, -1 = none; built once per shape from `block_local_layout`),
    each with its log-count bias (-inf for a summary of no real token);
  - writes out (input dtype) and the row log-sum-exp (fp32; +inf for a row that sees no key, so
    the backward's exp2(s - lse) is 0 there; the row's output is 0).

Backward (flash attention 2: scores recomputed from the saved log-sum-exp), two launches:
  - `_multipole_backward_query_kernel`, one program per (query block, batch * head), first computes and
    stores its rows' delta = rowsum(dO * O) (fp32; done in torch it took longer on the H200 than
    all three kernels together), then walks the same tiles as the forward: dQ accumulated in
    registers and stored once; dK~ and dV~ of the coarse summaries accumulated with fp32
    `tl.atomic_add` into fp32 buffers [batch, heads, sum_l (n/w_l) p, d] (a summary is seen by
    several query blocks), cast to the input dtype afterwards;
  - `_multipole_backward_key_kernel` (launched second: it reads delta), one program per (tile of BLOCK_N
    fine keys, batch * head), walks the queries that see those keys (blocks j, j+1 causal;
    j-1, j, j+1 bidirectional): dK and dV in registers, stored once. Chosen over atomics for the
    fine keys: deterministic, no fp32 buffers of size n*d to zero, add into and cast, at the price
    of recomputing the fine scores twice.
  Only the coarse gradients are summed with atomics, so they alone vary in the last bits between
  runs.

Supported: CUDA tensors (or anything under TRITON_INTERPRET=1), float16 / bfloat16 / float32,
block_size m in {16, 32, 64, 128}, head_dim in {16, 32, 64, 128}. Float32 inputs use TF32 dots
exactly when `torch.backends.cuda.matmul.allow_tf32` is on, like torch's matmuls. Set
FMA_TRITON_POISON=1 to allocate outputs filled with NaN (a test that every element is written).
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..indexing import block_local_layout, key_logit_bias
from ..kernels import interpreted, kernel_output

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def launch_config(kernel: str, block_size: int, head_dim: int, causal: bool) -> dict:
    """Launch parameters of one kernel ("forward", "backward_query", "backward_key") for block size m,
    head_dim d and the mask: BLOCK_N (the fine key tile; the key kernel's key and query tile, so at
    most m), num_warps, num_stages. Fixed, no autotuning: chosen by scripts/tune_kernels.py at
    train.py's shapes (benchmarks/s7/tune_kernels/): the causal forward takes both fine blocks in one
    tile of 2m keys, the query kernel one pipeline stage; 8 warps once a tile holds 128 x 128 elements."""
    warps = 8 if max(block_size, head_dim) >= 128 else 4
    if kernel == "forward" and causal and 2 * block_size <= 128:
        return dict(BLOCK_N=2 * block_size, num_warps=warps, num_stages=2)
    return dict(BLOCK_N=min(block_size, 64), num_warps=warps, num_stages=1 if kernel == "backward_query" else 2)


def triton_block_local_attention(q, k, v, coarse_k, coarse_v, *, block_size, rank, causal, scale_coarse,
                                 key_padding_mask, coarse_counts):
    """Backend "triton": the same arguments and result as `blocklocal.block_local_attention`.

    q, k, v [batch, heads, n, d]; coarse_k[l-1], coarse_v[l-1] [batch, heads, (n / w_l) p, d];
    key_padding_mask [batch, n] bool or None; coarse_counts per level [batch, (n / w_l) p] or None.
    Differentiable in q, k, v and every coarse level; output in q's dtype (the others are cast to it).
    """
    batch, heads, n, head_dim = q.shape
    m = block_size
    unsupported = (
        f"block_size {m} (supported: {SUPPORTED_BLOCK_SIZES})" if m not in SUPPORTED_BLOCK_SIZES else
        f"head_dim {head_dim} (supported: {SUPPORTED_HEAD_DIMS})" if head_dim not in SUPPORTED_HEAD_DIMS else
        f"dtype {q.dtype} (supported: {SUPPORTED_DTYPES})" if q.dtype not in SUPPORTED_DTYPES else None
    )
    if unsupported:
        raise ValueError(f"the triton FMA backend does not support {unsupported}; use backend 'torch'")
    if not q.is_cuda and not interpreted():
        raise ValueError(f"triton FMA backend needs CUDA tensors (got device {q.device}); use backend 'torch'")
    if batch * heads > 65535:  # the grid's second dimension
        raise ValueError(f"triton FMA backend supports batch * heads <= 65535, got {batch * heads}")

    if key_padding_mask is None and coarse_counts is None:  # the same for every call of this shape
        fine_bias, coarse_bias = None, _unmasked_coarse_bias(n, m, rank, scale_coarse, q.device)
    else:
        score_bias = key_logit_bias(batch, n, m, rank, scale_coarse, key_padding_mask, coarse_counts,
                                     torch.float32, q.device) * LOG2E  # base 2, like the kernels' scores
        fine_bias = score_bias[:, :n].contiguous() if key_padding_mask is not None else None
        coarse_bias = score_bias[:, n:].contiguous()
    coarse_index = _coarse_index(n, m, rank, causal, q.device)
    k, v = k.to(q.dtype), v.to(q.dtype)
    coarse_k = torch.cat([c.to(q.dtype) for c in coarse_k], dim=2)
    coarse_v = torch.cat([c.to(q.dtype) for c in coarse_v], dim=2)
    out, _ = multipole_forward(q, k, v, coarse_k, coarse_v, fine_bias, coarse_bias, coarse_index, m, causal)
    return out


@functools.lru_cache(maxsize=32)
def _coarse_index(n: int, m: int, rank: int, causal: bool, device: torch.device) -> torch.Tensor:
    """[n/m, C] int32: per fine block, rows into cat(level 1, ..., level L summaries) it attends to,
    -1 for none; C = the layout's coarse slots (2pL or 3pL) padded to a power of two >= 16, or above
    64 to a multiple of the 64-slot coarse tile (H-Transformer-1D's p = 8 at 16K: 144 slots -> 192, not 256)."""
    key_index, allowed = block_local_layout(n, m, rank, causal, device)
    fine_slots = (2 if causal else 3) * m
    coarse = (key_index[:, fine_slots:] - n).masked_fill(~allowed[:, 0, fine_slots:], -1)
    slots = coarse.shape[1]
    width = max(16, triton.next_power_of_2(slots)) if slots <= 64 else 64 * triton.cdiv(slots, 64)
    coarse = torch.nn.functional.pad(coarse, (0, width - coarse.shape[1]), value=-1)
    return coarse.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=32)
def _unmasked_coarse_bias(n: int, m: int, rank: int, scale_coarse: bool, device: torch.device) -> torch.Tensor:
    """[1, C] base-2 logit bias of every summary when nothing is padded (one row for every batch)."""
    return (key_logit_bias(1, n, m, rank, scale_coarse, None, None, torch.float32, device) * LOG2E)[:, n:].contiguous()


def _batch_stride(bias):
    """Stride between batch rows of a bias tensor; 0 for one row shared by the whole batch."""
    return 0 if bias is None or bias.shape[0] == 1 else bias.stride(0)


def _strides(x):
    """(batch, head, position) strides; the feature stride must be 1."""
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def _coarse_tiles(num_coarse: int):
    """BLOCK_C (coarse tile) and the number of coarse tiles for C coarse slots."""
    block_c = min(num_coarse, 64)
    return block_c, num_coarse // block_c


# The kernels as registered operators (torch.library): torch.compile traces a model through them
# without a graph break (their fake implementations give the output shapes), CUDA graphs can capture
# them, and autograd is registered on the forward operator.


@torch.library.custom_op("fma::multipole_forward", mutates_args=())
def multipole_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coarse_k: torch.Tensor,
                      coarse_v: torch.Tensor, fine_bias: Optional[torch.Tensor], coarse_bias: torch.Tensor,
                      coarse_index: torch.Tensor, block_size: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, n, d] (q's dtype) and the rows' base-2 log-sum-exp [B, H, n] (fp32). coarse_k, coarse_v:
    every level's summaries in one buffer [B, H, T, d]; fine_bias [B, n] or None, coarse_bias [B or 1, T]
    (base 2); coarse_index [n/m, C] int32 (see `_coarse_index`)."""
    m = block_size
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    coarse_k, coarse_v = coarse_k.contiguous(), coarse_v.contiguous()
    batch, heads, n, head_dim = q.shape
    out = kernel_output((batch, heads, n, head_dim), q.dtype, q.device)
    lse = kernel_output((batch, heads, n), torch.float32, q.device)
    block_c, num_c_tiles = _coarse_tiles(coarse_index.shape[1])
    has_fine_bias = fine_bias is not None
    _multipole_forward_kernel[(n // m, batch * heads)](
        q, k, v, coarse_k, coarse_v, out, lse,
        fine_bias if has_fine_bias else coarse_bias, coarse_bias, coarse_index,
        *_strides(q), *_strides(k), *_strides(v), *_strides(coarse_k), *_strides(out),
        _batch_stride(fine_bias), _batch_stride(coarse_bias),
        heads, n, head_dim**-0.5 * LOG2E,
        BLOCK_M=m, HEAD_DIM=head_dim, BLOCK_C=block_c, NUM_C_TILES=num_c_tiles,
        CAUSAL=causal, HAS_FINE_BIAS=has_fine_bias, PRECISION=_dot_precision(q.dtype),
        **launch_config("forward", m, head_dim, causal),
    )
    return out, lse


@multipole_forward.register_fake
def _(q, k, v, coarse_k, coarse_v, fine_bias, coarse_bias, coarse_index, block_size, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fma::multipole_backward", mutates_args=())
def multipole_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       coarse_k: torch.Tensor, coarse_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       fine_bias: Optional[torch.Tensor], coarse_bias: torch.Tensor, coarse_index: torch.Tensor,
                       block_size: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv [B, H, n, d] and the summaries' gradients [2 (keys, values), B, H, T, d], q's dtype."""
    m = block_size
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    coarse_k, coarse_v = coarse_k.contiguous(), coarse_v.contiguous()
    batch, heads, n, head_dim = q.shape
    grad_out = _last_dim_contiguous(grad_out.to(q.dtype))
    delta = kernel_output((batch, heads, n), torch.float32, q.device)  # rowsum(dO * O), by the query kernel
    dq = kernel_output(q.shape, q.dtype, q.device)
    dk = kernel_output(k.shape, k.dtype, k.device)
    dv = kernel_output(v.shape, v.dtype, v.device)
    dcoarse = torch.zeros((2, *coarse_k.shape), dtype=torch.float32, device=q.device)  # atomics add here
    dck, dcv = dcoarse.unbind(0)
    block_c, num_c_tiles = _coarse_tiles(coarse_index.shape[1])
    has_fine_bias = fine_bias is not None
    fine_bias_arg = fine_bias if has_fine_bias else coarse_bias  # never read without HAS_FINE_BIAS
    fine_bias_stride = _batch_stride(fine_bias)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_FINE_BIAS=has_fine_bias, PRECISION=_dot_precision(q.dtype))
    key_config = launch_config("backward_key", m, head_dim, causal)
    _multipole_backward_query_kernel[(n // m, batch * heads)](
        q, k, v, coarse_k, coarse_v, out, grad_out, lse, delta, dq, dck, dcv,
        fine_bias_arg, coarse_bias, coarse_index,
        *_strides(q), *_strides(k), *_strides(v), *_strides(coarse_k), *_strides(out), *_strides(grad_out),
        *_strides(dq),
        fine_bias_stride, _batch_stride(coarse_bias),
        heads, n, head_dim**-0.5 * LOG2E, head_dim**-0.5,
        BLOCK_M=m, BLOCK_C=block_c, NUM_C_TILES=num_c_tiles, **common, **launch_config("backward_query", m, head_dim, causal),
    )
    _multipole_backward_key_kernel[(n // key_config["BLOCK_N"], batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, fine_bias_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        fine_bias_stride, heads, n, head_dim**-0.5 * LOG2E, head_dim**-0.5,
        BLOCK_M=m, **common, **key_config,
    )
    return dq, dk, dv, dcoarse.to(q.dtype)


@multipole_backward.register_fake
def _(grad_out, q, k, v, coarse_k, coarse_v, out, lse, fine_bias, coarse_bias, coarse_index, block_size, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty((2, *coarse_k.shape))


def _save_for_backward(ctx, inputs, output):
    q, k, v, coarse_k, coarse_v, fine_bias, coarse_bias, coarse_index, block_size, causal = inputs
    ctx.save_for_backward(q, k, v, coarse_k, coarse_v, *output, fine_bias, coarse_bias, coarse_index)
    ctx.block_size, ctx.causal = block_size, causal


def _backward(ctx, grad_out, _grad_lse):
    dq, dk, dv, dcoarse = multipole_backward(grad_out, *ctx.saved_tensors, ctx.block_size, ctx.causal)
    return dq, dk, dv, dcoarse[0], dcoarse[1], None, None, None, None, None


multipole_forward.register_autograd(_backward, setup_context=_save_for_backward)


# Kernels ------------------------------------------------------------------------------------------
# Scores are kept in base 2: s2 = (q . k) * scale * log2(e) + bias * log2(e), softmax via exp2.
# Loops have compile-time trip counts (tiles outside the sequence are masked, not skipped): the
# first and last blocks do one wasted tile, and no loop bound is a run-time scalar.


@triton.jit
def _rows(positions, stride):
    """Offsets [len, 1] of sequence positions along a stride, in int64: at millions of tokens a
    position times the stride of a qkv view (3 * heads * head_dim) passes 2^31."""
    return positions.to(tl.int64)[:, None] * stride


@triton.jit
def _fine_tile(q, K, V, FINE_BIAS_ROW, offs_m, start, sk_n, sv_n, N, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_FINE_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """Fine keys start .. start + BLOCK_N: base-2 scores [M, BLOCK_N] (-inf = not seen), k, v."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    exists = (offs_n >= 0) & (offs_n < N)
    k = tl.load(K + _rows(offs_n, sk_n) + offs_d[None, :], mask=exists[:, None], other=0.0)
    v = tl.load(V + _rows(offs_n, sv_n) + offs_d[None, :], mask=exists[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_FINE_BIAS:
        s += tl.load(FINE_BIAS_ROW + offs_n, mask=exists, other=0.0)[None, :]
    seen = exists[None, :]
    if CAUSAL:
        seen = seen & (offs_n[None, :] <= offs_m[:, None])
    s = tl.where(seen, s, float("-inf"))
    return s, k, v


@triton.jit
def _coarse_tile(q, CK, CV, COARSE_BIAS_ROW, INDEX_ROW, t, sc_n, qk_scale,
                 BLOCK_C: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Coarse tile t of a block's index row: base-2 scores [M, BLOCK_C], summaries ck, cv, rows, valid."""
    offs_d = tl.arange(0, HEAD_DIM)
    index = tl.load(INDEX_ROW + t * BLOCK_C + tl.arange(0, BLOCK_C))
    valid = index >= 0
    index = tl.where(valid, index, 0)
    ck = tl.load(CK + index[:, None] * sc_n + offs_d[None, :], mask=valid[:, None], other=0.0)
    cv = tl.load(CV + index[:, None] * sc_n + offs_d[None, :], mask=valid[:, None], other=0.0)
    bias = tl.load(COARSE_BIAS_ROW + index, mask=valid, other=float("-inf"))
    s = tl.dot(q, tl.trans(ck), input_precision=PRECISION) * qk_scale + bias[None, :]
    s = tl.where(valid[None, :], s, float("-inf"))
    return s, ck, cv, index, valid


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores s [M, N] (-inf = not seen) and its values v [N, D] in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: avoid -inf - -inf
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _query_block(Q, sq_b, sq_h, sq_n, H, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's query block (grid: blocks x batch*heads): its index, bh, batch and head (int64
    for the offsets), row and channel offsets, and the query tile [BLOCK_M, HEAD_DIM]."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sq_b + h * sq_h + _rows(offs_m, sq_n) + offs_d[None, :])
    return block, bh, b, h, offs_m, offs_d, q


@triton.jit
def _multipole_forward_kernel(
    Q, K, V, CK, CV, O, LSE, FINE_BIAS, COARSE_BIAS, COARSE_INDEX,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sc_b, sc_h, sc_n, so_b, so_h, so_n,
    sfb_b, scb_b,
    H, N, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr, NUM_C_TILES: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_FINE_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    block, bh, b, h, offs_m, offs_d, q = _query_block(Q, sq_b, sq_h, sq_n, H, BLOCK_M, HEAD_DIM)
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    CK += b * sc_b + h * sc_h  # coarse_k and coarse_v: contiguous, one shape
    CV += b * sc_b + h * sc_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Fine keys of blocks b-1, b (causal) or b-1, b, b+1.
    for j in range(((2 if CAUSAL else 3) * BLOCK_M) // BLOCK_N):
        s, k, v = _fine_tile(q, K, V, FINE_BIAS + b * sfb_b, offs_m, (block - 1) * BLOCK_M + j * BLOCK_N,
                             sk_n, sv_n, N, qk_scale, BLOCK_N, HEAD_DIM, CAUSAL, HAS_FINE_BIAS, PRECISION)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

    # Coarse summaries, gathered through the block's index row.
    for t in range(NUM_C_TILES):
        s, ck, cv, index, valid = _coarse_tile(q, CK, CV, COARSE_BIAS + b * scb_b,
                                               COARSE_INDEX + block * (NUM_C_TILES * BLOCK_C), t, sc_n, qk_scale,
                                               BLOCK_C, HEAD_DIM, PRECISION)
        m_i, l_i, acc = _online_softmax_step(s, cv, m_i, l_i, acc, PRECISION)

    seen = l_i > 0  # a row that sees no key: output 0, lse +inf (so exp2(s - lse) = 0 backward)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + b * so_b + h * so_h + _rows(offs_m, so_n) + offs_d[None, :], out.to(O.dtype.element_ty))
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse)


@triton.jit
def _multipole_backward_query_kernel(
    Q, K, V, CK, CV, O, DO, LSE, DELTA, DQ, DCK, DCV, FINE_BIAS, COARSE_BIAS, COARSE_INDEX,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sc_b, sc_h, sc_n,
    so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n,
    sfb_b, scb_b,
    H, N, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr, NUM_C_TILES: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_FINE_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ for one query block, its contributions to dK~, dV~ of the summaries it sees, and its rows'
    delta = rowsum(dO * O), stored for `_multipole_backward_key_kernel` (launched after this one)."""
    block, bh, b, h, offs_m, offs_d, q = _query_block(Q, sq_b, sq_h, sq_n, H, BLOCK_M, HEAD_DIM)
    do = tl.load(DO + b * sdo_b + h * sdo_h + _rows(offs_m, sdo_n) + offs_d[None, :])
    o = tl.load(O + b * so_b + h * so_h + _rows(offs_m, so_n) + offs_d[None, :])
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m)
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    coarse_offset = b * sc_b + h * sc_h  # coarse_k, coarse_v and the fp32 DCK, DCV: contiguous, one shape
    CK += coarse_offset
    CV += coarse_offset
    DCK += coarse_offset
    DCV += coarse_offset
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for j in range(((2 if CAUSAL else 3) * BLOCK_M) // BLOCK_N):
        s, k, v = _fine_tile(q, K, V, FINE_BIAS + b * sfb_b, offs_m, (block - 1) * BLOCK_M + j * BLOCK_N,
                             sk_n, sv_n, N, qk_scale, BLOCK_N, HEAD_DIM, CAUSAL, HAS_FINE_BIAS, PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    # Coarse: dQ as above; dK~ = dS^T Q * scale and dV~ = P^T dO, summed over query blocks by atomics.
    # A block's index row holds each summary at most once, so no two lanes of one add collide.
    for t in range(NUM_C_TILES):
        s, ck, cv, index, valid = _coarse_tile(q, CK, CV, COARSE_BIAS + b * scb_b,
                                               COARSE_INDEX + block * (NUM_C_TILES * BLOCK_C), t, sc_n, qk_scale,
                                               BLOCK_C, HEAD_DIM, PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(cv), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(ck.dtype), ck, input_precision=PRECISION)
        dck = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale
        dcv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        grad_offsets = index[:, None] * sc_n + offs_d[None, :]
        tl.atomic_add(DCK + grad_offsets, dck, mask=valid[:, None], sem="relaxed")
        tl.atomic_add(DCV + grad_offsets, dcv, mask=valid[:, None], sem="relaxed")

    dq = dq * sm_scale
    tl.store(DQ + b * sdq_b + h * sdq_h + _rows(offs_m, sdq_n) + offs_d[None, :], dq.to(DQ.dtype.element_ty))


@triton.jit
def _multipole_backward_key_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, FINE_BIAS,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
    sfb_b, H, N, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_FINE_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV for one tile of BLOCK_N fine keys, from every query that sees them."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    key_start = tile * BLOCK_N
    key_block = key_start // BLOCK_M
    offs_n = key_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * sk_b + h * sk_h + _rows(offs_n, sk_n) + offs_d[None, :])
    v = tl.load(V + b * sv_b + h * sv_h + _rows(offs_n, sv_n) + offs_d[None, :])
    if HAS_FINE_BIAS:
        key_bias = tl.load(FINE_BIAS + b * sfb_b + offs_n)
    else:
        key_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    Q += b * sq_b + h * sq_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Queries of blocks j, j+1 (causal) or j-1, j, j+1; those outside [0, N) get lse = +inf: p = 0.
    first_query = (key_block if CAUSAL else key_block - 1) * BLOCK_M
    for i in range(((2 if CAUSAL else 3) * BLOCK_M) // BLOCK_N):
        offs_q = first_query + i * BLOCK_N + tl.arange(0, BLOCK_N)
        exists = (offs_q >= 0) & (offs_q < N)
        q = tl.load(Q + _rows(offs_q, sq_n) + offs_d[None, :], mask=exists[:, None], other=0.0)
        do = tl.load(DO + _rows(offs_q, sdo_n) + offs_d[None, :], mask=exists[:, None], other=0.0)
        lse = tl.load(LSE + offs_q, mask=exists, other=float("inf"))
        delta = tl.load(DELTA + offs_q, mask=exists, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + key_bias[:, None]  # [keys, queries]
        if CAUSAL:
            s_t = tl.where(offs_n[:, None] <= offs_q[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * sdk_b + h * sdk_h + _rows(offs_n, sdk_n) + offs_d[None, :], dk.to(DK.dtype.element_ty))
    tl.store(DV + b * sdv_b + h * sdv_h + _rows(offs_n, sdv_n) + offs_d[None, :], dv.to(DV.dtype.element_ty))
