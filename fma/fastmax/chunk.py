"""Fastmax (Gerami et al. 2024, "FAST: Factorizable Attention for Speeding up Transformers").

    out_i = sum_j f(q_i.k_j) v_j / sum_j f(q_i.k_j),   f(x) = sum_{l=0..p} x^l / l!,   j <= i when causal,

on queries and keys centred over the head dimension and scaled to unit length (`normalise`, the
paper's normalisation as we read it; the authors' code divides by the largest norm in the sequence
instead, which lets later tokens change earlier outputs), so that q.k lies in [-1, 1]. There f > 0
for p = 2 (1 + x + x^2/2 = ((1 + x)^2 + 1) / 2 >= 1/2) and f >= 0 for p = 1 (zero only where q = -k),
so every weight is a non-negative share.

Factorisation: f(q.k) = phi_q(q).phi_k(k) with phi(x) = [1, x, x_a x_b for a <= b] (the last part for
p = 2 only): (q.k)^2 / 2 = sum_a q_a^2 k_a^2 / 2 + sum_{a<b} q_a q_b k_a k_b, so each distinct product
appears once, the query's squares with weight 1 and the key's with 1/2 (exact in any float format):
D = 1 + d + d(d+1)/2 features (2145 at d = 64, where vec(x x^T) would give 4161), zero-padded to a
multiple of `ALIGN`. The products are laid out by cyclic diagonal, x_a x_{(a+s) mod d} for s = 0 .. d/2,
which a strided view of [x, x] builds in one broadcast product. The values w_j = [v_j, 1] (padded to a
multiple of `ALIGN` too) carry the normaliser in the same product: sum_j f(q_i.k_j) w_j = phi_q(q_i) @ S,
S = sum_j phi_k(k_j) w_j^T [D, e], e = d_v + 1; O(n d^(p+1)), never n x n.

Causal, chunked: within a chunk of C positions f(q.k) with a causal mask (C x C scores); across chunks
phi_q(q) times the state of all earlier chunks (their exclusive prefix sum). Non-causal: one state for
all. The work runs piece by piece, each of about `SEGMENT_TOKENS` positions x heads (`blocks`): whole
sequences of several batch elements, or for a long sequence one batch element in segments of whole
chunks, the state carried from segment to segment; a piece's chunks run at once.

Memory. `_FastmaxFunction` has a hand-written backward that recomputes features and states piece by
piece, so all it saves is q, k, v (input dtype, [b, h, n, d] each), the output and the normaliser
(compute dtype, [b, h, n, d_v] and [b, h, n]), the padding mask, and states in the compute dtype:
causal, the carried state at the start of each segment after the first ([1, h, D, e] each, none when
the whole sequence fits one piece); non-causal, each row's state [b, h, D, e]. Per position: 3 d
numbers in the input dtype and d_v + 1 in the compute dtype, plus at most D e / (segment length),
whatever n. Alive only within one piece, never saved: phi(k), phi(q) [., h, L, D] in the matmul dtype,
the chunk states and their prefix sums [., h, L / C, D, e], the C x C scores, and in backward the
states expanded to E [., h, L / C, d + d^2, e] and one d x d matrix per position. E holds S's rows for
x_a and x_a x_b (`gradient_rows`), so that the gradient of phi(x).(S y) with respect to x is
(y @ E^T)[:d] + (y @ E^T)[d:].view(d, d) @ x: a matrix product and a small one per position instead
of a scatter over the D features. `naive.py` holds the O(n^2) formula the tests check; a test bounds
the saved bytes per position.

Precision: inputs are upcast to float32 (float64 stays float64): normalisation, the normaliser's division
and the running sums across chunks and segments (states forward, their gradients backward) are float32.
Under autocast the matrix products run in the autocast dtype (bf16 with float32 accumulation, each
product rounded once, like the model's other matmuls), with the features and the C x C scores formed in
it; without autocast everything runs in the compute dtype. The output is cast back.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ALIGN = 8  # feature and value widths are padded to a multiple of this (16-byte rows in bf16)
SEGMENT_TOKENS = 1 << 17  # positions x heads per piece of work (`blocks`): bounds the transient memory
EPS = 1e-6  # normalise's smallest norm


def fastmax_attention(q, k, v, *, p: int, causal: bool, chunk_size: int, padding_mask=None,
                      segment_tokens: int = SEGMENT_TOKENS, feature_rows=None):
    """q, k, v [batch, heads, n, d] -> [batch, heads, n, d] in q's dtype; padded keys get weight 0.
    segment_tokens: positions x heads per piece of work (`blocks`); the result does not depend on it.
    feature_rows: `gradient_rows(d, p)` on q's device (built here if not given)."""
    batch, heads, n, _ = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    device = q.device.type
    matmul = torch.get_autocast_dtype(device) if (torch.is_autocast_enabled(device)
                                                  and compute != torch.float64) else compute
    chunk = max(1, min(chunk_size, n)) if causal else 1
    padded = -(-n // chunk) * chunk
    ignored = padding_mask
    if padded > n:
        q, k, v = (F.pad(x, (0, 0, 0, padded - n)) for x in (q, k, v))
        if ignored is None:
            ignored = torch.zeros(batch, n, dtype=torch.bool, device=q.device)
        ignored = F.pad(ignored, (0, padded - n), value=True)
    if feature_rows is None:
        feature_rows = gradient_rows(q.shape[-1], p, q.device)
    # Non-causal: one chunk per segment (chunk 0), no within-chunk scores.
    out = _FastmaxFunction.apply(q, k, v, ignored, feature_rows, p, causal, chunk if causal else 0, segment_tokens,
                                 compute, matmul)
    return out[:, :, :n]


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit length over the head dimension, per vector (so causal stays causal): |q.k| <= 1."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def normalise_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to x of normalise(x) . grad (what autograd gives for `normalise`)."""
    centred = x - x.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    clamped = norm.clamp_min(EPS)
    unit = centred / clamped
    # d(c / |c|) = (I - u u^T) / |c|; below EPS the norm is a constant and only the 1 / EPS remains.
    centred_grad = (grad - unit * ((unit * grad).sum(-1, keepdim=True) * (norm >= EPS))) / clamped
    return centred_grad - centred_grad.mean(-1, keepdim=True)


def score(x: torch.Tensor, p: int) -> torch.Tensor:
    """f(x) = sum_{l=0..p} x^l / l!, exp's Taylor polynomial of degree p."""
    return 1 + x if p == 1 else 1 + x + x * x / 2


def feature_count(d: int, p: int) -> int:
    """D = 1 + d (+ d(d+1)/2 for p = 2), before padding."""
    return 1 + d + (d * (d + 1) // 2 if p == 2 else 0)


def round_up(x: int, multiple: int = ALIGN) -> int:
    return -(-x // multiple) * multiple


def features(x: torch.Tensor, p: int, *, key: bool, dtype=None) -> torch.Tensor:
    """phi(x) [..., D padded to a multiple of ALIGN] in `dtype` (x's by default), phi_q(q).phi_k(k) = f(q.k):
    [1, x, x_a x_{(a+s) mod d} for s = 0 .. d/2], the squares (s = 0) halved for keys (key=True); for even
    d the last diagonal s = d/2 only for a < d/2 (each pair once); then zeros."""
    d = x.shape[-1]
    size = feature_count(d, p)
    phi = x.new_empty(*x.shape[:-1], round_up(size), dtype=dtype or x.dtype)
    phi[..., 0] = 1
    phi[..., 1:d + 1] = x
    if p == 2:
        rows, start = (d + 1) // 2, d + 1  # whole diagonals s = 0 .. rows - 1, each d products
        windows = torch.cat([x, x[..., :rows - 1]], -1).unfold(-1, d, 1)  # [..., rows, d]: x_{(a+s) mod d}
        into(phi[..., start:start + rows * d].unflatten(-1, (rows, d)), torch.mul, x.unsqueeze(-2), windows)
        if key:
            phi[..., start:start + d] *= 0.5
        if d % 2 == 0:  # s = d/2: pairs (a, a + d/2), a < d/2
            into(phi[..., start + rows * d:size], torch.mul, x[..., :d // 2], x[..., d // 2:])
    phi[..., size:] = 0
    return phi


def into(out: torch.Tensor, op, *args, **kwargs) -> None:
    """op(*args, out=out): the result written once into a view. Under torch.compile, which takes no out=
    into a view, and where autograd records (no out= there), a copy (which inductor fuses into the op)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        out.copy_(op(*args, **kwargs))
    else:
        op(*args, **kwargs, out=out)


def gradient_rows(d: int, p: int, device) -> torch.Tensor:
    """Indices [d (+ d^2 for p = 2)] into phi's features: rows 0 .. d-1 the linear features, then for
    p = 2 row d + a d + b the feature holding x_a x_b (a and b in either order). A state S [D, e] gathered
    by these rows (and for queries its squares' rows doubled) is the matrix E with
    d phi(x).S y / dx = (y @ E^T)[:d] + (y @ E^T)[d:].view(d, d) @ x.
    Built from Python ints. The layer keeps them as a buffer: a compiled step then reads a constant
    input, where the same arithmetic on tensors (% d, minimum) would be folded by inductor into the
    backward's gather index, which its loop merging on CUDA (torch 2.11) fails on."""
    rows = list(range(1, d + 1))
    if p == 2:
        start, diagonals = d + 1, (d + 1) // 2
        for a in range(d):
            for b in range(d):
                shift = (b - a) % d
                rows.append(start + shift * d + a if shift < d - shift  # x_a x_{a+s}, s = 0 .. diagonals - 1
                            else start + (d - shift) * d + b if shift > d - shift  # x_b x_{b+s}
                            else start + diagonals * d + min(a, b))  # s = d/2 (even d)
    return torch.tensor(rows, device=device)


def expand(state: torch.Tensor, rows: torch.Tensor, d: int, query: bool) -> torch.Tensor:
    """The state [..., D, e] as E [..., d (+ d^2), e] (`gradient_rows`); query=True doubles the squares'
    rows (phi_q has q_a^2, whose derivative is 2 q_a; phi_k has k_a^2 / 2)."""
    matrix = state.index_select(-2, rows)
    if query and rows.shape[0] > d:
        matrix[..., d::d + 1, :] *= 2
    return matrix


def feature_gradient(y: torch.Tensor, matrix: torch.Tensor, x: torch.Tensor, d: int) -> torch.Tensor:
    """d/dx of phi(x) . (S y) for every position: y [..., C, e], matrix = expand(S) [..., d (+ d^2), e],
    x [..., C, d] -> [..., C, d] (in y's dtype)."""
    grad = y @ matrix.transpose(-1, -2)  # [..., C, d (+ d^2)]
    if grad.shape[-1] == d:
        return grad
    return grad[..., :d] + (grad[..., d:].unflatten(-1, (d, d)) @ x.unsqueeze(-1)).squeeze(-1)


def exclusive_prefix(carry, chunk_states: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[carry, carry + s_0, carry + s_0 + s_1, ...] over dim 2 in `dtype` (carry None: zeros): each chunk's
    sum of everything before it, and the sum of all (the next carry). A sum, never a difference."""
    sums = chunk_states.new_empty(chunk_states.shape, dtype=dtype)
    sums[:, :, 0] = 0 if carry is None else carry
    into(sums[:, :, 1:], torch.cumsum, chunk_states[:, :, :-1], 2, dtype=dtype)
    if carry is not None:
        sums[:, :, 1:] += carry.unsqueeze(2)
    return sums, sums[:, :, -1] + chunk_states[:, :, -1]


def exclusive_suffix(carry, chunk_states: torch.Tensor, dtype, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from the end, [carry + s_1 + s_2 + ..., ..., carry + s_last, carry] (summed in `dtype`,
    returned in `out_dtype`), and the sum of all in `dtype`."""
    sums, total = exclusive_prefix(carry, chunk_states.flip(2), dtype)
    return sums.to(out_dtype).flip(2), total


def blocks(batch: int, heads: int, n: int, chunk: int, budget: int) -> list[tuple[slice, list[tuple[int, int]]]]:
    """The work in pieces of about `budget` positions x heads: [(batch elements, [(start, stop), ...])].
    Whole sequences of several batch elements where heads x n fits the budget (no state carried between
    pieces), else one batch element at a time, its sequence in segments of whole chunks."""
    if heads * n <= budget:
        group, length = max(1, budget // (heads * n)), n
    else:
        unit = chunk or 1
        group, length = 1, max(unit, budget // heads // unit * unit)
    spans = [(start, min(start + length, n)) for start in range(0, n, length)]
    return [(slice(first, min(first + group, batch)), spans) for first in range(0, batch, group)]


class _Segment:
    """One piece's normalised q, k and values w = [v, 1, 0...] (padded keys 0), [b, h, chunks, C, *];
    chunk 0: the whole segment as one chunk."""

    def __init__(self, q, k, v, ignored, rows, start, stop, chunk, compute, matmul):
        self.q_raw, self.k_raw = (x[rows, :, start:stop].to(compute) for x in (q, k))
        self.q, self.k = normalise(self.q_raw), normalise(self.k_raw)
        batch, heads, length, d_v = v[rows, :, start:stop].shape
        self.d_v = d_v
        self.w = self.q.new_zeros(batch, heads, length, round_up(d_v + 1))
        self.w[..., :d_v] = v[rows, :, start:stop]
        self.w[..., d_v] = 1
        if ignored is not None:
            self.w.masked_fill_(ignored[rows, None, start:stop, None], 0.0)
        chunk = chunk or length
        self.chunks = length // chunk
        self.q, self.k, self.w = (x.unflatten(2, (self.chunks, chunk)) for x in (self.q, self.k, self.w))
        self.qm, self.km, self.wm = (x.to(matmul) for x in (self.q, self.k, self.w))

    def chunked(self, x: torch.Tensor) -> torch.Tensor:
        """[b, h, length, *] -> [b, h, chunks, C, *]."""
        return x.unflatten(2, (self.chunks, -1))


def _single(q, k, v, ignored, rows, spans, chunk, compute, matmul):
    """The non-causal path visits each segment twice: one segment alone is built once (it is small)."""
    return _Segment(q, k, v, ignored, rows, *spans[0], chunk, compute, matmul) if len(spans) == 1 else None


def _scores(segment: _Segment, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within each chunk: q.k [.., C, C] and f(q.k) masked to j <= i, in the matmul dtype."""
    dots = segment.qm @ segment.km.transpose(-1, -2)
    weights = dots + 1 if p == 1 else torch.addcmul(dots + 1, dots, dots, value=0.5)  # `score`, in two passes
    return dots, weights.tril_()


class _FastmaxFunction(torch.autograd.Function):
    """sum_j f(q_i.k_j) [v_j, 1] -> out, piece by piece and chunk by chunk; backward by hand (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, ignored, feature_rows, p, causal, chunk, budget, compute, matmul):
        batch, heads, n, d = q.shape
        d_v = v.shape[-1]
        pieces = blocks(batch, heads, n, chunk, budget)
        sums = q.new_empty(batch, heads, n, round_up(d_v + 1), dtype=compute)
        kept = []  # causal: the carried state at the start of each segment but the first; else each piece's state
        with torch.autocast(q.device.type, enabled=False):
            for rows, spans in pieces:
                if causal:
                    carry = None
                    for start, stop in spans:
                        seg = _Segment(q, k, v, ignored, rows, start, stop, chunk, compute, matmul)
                        phi_k = features(seg.k, p, key=True, dtype=matmul)
                        chunk_states = phi_k.transpose(-1, -2) @ seg.wm  # [b, h, chunks, D, e]
                        del phi_k
                        if carry is not None:
                            kept.append(carry)
                        states, carry = exclusive_prefix(carry, chunk_states, compute)
                        del chunk_states
                        phi_q = features(seg.q, p, key=False, dtype=matmul)
                        part = (phi_q @ states.to(matmul)).to(compute)
                        del phi_q, states
                        part += (_scores(seg, p)[1] @ seg.wm).to(compute)
                        sums[rows, :, start:stop] = part.flatten(2, 3)
                        del part
                else:
                    single = _single(q, k, v, ignored, rows, spans, chunk, compute, matmul)
                    state = None
                    for start, stop in spans:
                        seg = single or _Segment(q, k, v, ignored, rows, start, stop, chunk, compute, matmul)
                        phi_k = features(seg.k, p, key=True, dtype=matmul)
                        part = (phi_k.transpose(-1, -2) @ seg.wm).to(compute)  # [b, h, 1, D, e]
                        del phi_k
                        state = part if state is None else state + part
                    kept.append(state)
                    state = state.to(matmul)
                    for start, stop in spans:
                        seg = single or _Segment(q, k, v, ignored, rows, start, stop, chunk, compute, matmul)
                        phi_q = features(seg.q, p, key=False, dtype=matmul)
                        sums[rows, :, start:stop] = (phi_q @ state).flatten(2, 3)
                        del phi_q
            normaliser = sums[..., d_v].contiguous()  # not a view: saving it must not keep `sums`
            # A query with every key padded has numerator and normaliser 0: output 0 (finite), not 0 / 0.
            out = sums[..., :d_v] / torch.where(normaliser > 0, normaliser, 1.0).unsqueeze(-1)
        ctx.save_for_backward(q, k, v, ignored, feature_rows, out, normaliser, *kept)
        ctx.options = p, causal, chunk, budget, compute, matmul
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, ignored, feature_rows, out, normaliser, *kept = ctx.saved_tensors
        p, causal, chunk, budget, compute, matmul = ctx.options
        batch, heads, n, d = q.shape
        d_v = v.shape[-1]
        grads = [torch.empty_like(x) for x in (q, k, v)]
        with torch.autocast(q.device.type, enabled=False):
            positive = normaliser > 0
            safe = torch.where(positive, normaliser, 1.0)
            grad_out = grad_out.to(compute)
            # d out / d sums: [grad / z, -(grad . out) / z where z > 0, 0 ...]
            grad_sums = grad_out.new_zeros(batch, heads, n, round_up(d_v + 1))
            grad_sums[..., :d_v] = grad_out / safe.unsqueeze(-1)
            grad_sums[..., d_v] = -(grad_out * out).sum(-1) / safe * positive
            del grad_out, positive, safe
            pieces = blocks(batch, heads, n, chunk, budget)
            if causal:
                for rows, spans in reversed(pieces):
                    carry_grad = None
                    for index in reversed(range(len(spans))):
                        start, stop = spans[index]
                        seg = _Segment(q, k, v, ignored, rows, start, stop, chunk, compute, matmul)
                        grad_y = seg.chunked(grad_sums[rows, :, start:stop]).to(matmul)
                        phi_q = features(seg.q, p, key=False, dtype=matmul)
                        grad_states = phi_q.transpose(-1, -2) @ grad_y  # [b, h, chunks, D, e]
                        del phi_q
                        # The gradient of each chunk's keys' state: the gradients of all later chunks' states.
                        later, carry_grad = exclusive_suffix(carry_grad, grad_states, compute, matmul)
                        del grad_states
                        phi_k = features(seg.k, p, key=True, dtype=matmul)
                        grad_w = (phi_k @ later).to(compute)
                        chunk_states = phi_k.transpose(-1, -2) @ seg.wm
                        del phi_k
                        grad_k = feature_gradient(seg.wm, expand(later, feature_rows, d, query=False), seg.km, d)
                        grad_k = grad_k.to(compute)
                        del later
                        carry = kept.pop() if index else None
                        states = exclusive_prefix(carry, chunk_states, compute)[0].to(matmul)
                        del chunk_states, carry
                        grad_q = feature_gradient(grad_y, expand(states, feature_rows, d, query=True), seg.qm, d)
                        grad_q = grad_q.to(compute)
                        del states
                        dots, weights = _scores(seg, p)
                        grad_w += (weights.transpose(-1, -2) @ grad_y).to(compute)
                        del weights
                        grad_dots = (grad_y @ seg.wm.transpose(-1, -2)).tril_()
                        if p == 2:  # times f'(q.k) = 1 + q.k
                            grad_dots = torch.addcmul(grad_dots, grad_dots, dots)
                        del dots
                        grad_q += (grad_dots @ seg.km).to(compute)
                        grad_k += (grad_dots.transpose(-1, -2) @ seg.qm).to(compute)
                        del grad_dots
                        _write_gradients(grads, seg, ignored, rows, start, stop, grad_q, grad_k, grad_w)
            else:
                for (rows, spans), state in zip(pieces, kept):
                    single = _single(q, k, v, ignored, rows, spans, chunk, compute, matmul)
                    state_grad = None
                    for start, stop in spans:
                        seg = single or _Segment(q, k, v, ignored, rows, start, stop, chunk, compute, matmul)
                        phi_q = features(seg.q, p, key=False, dtype=matmul)
                        grad_y = seg.chunked(grad_sums[rows, :, start:stop]).to(matmul)
                        part = (phi_q.transpose(-1, -2) @ grad_y).to(compute)
                        del phi_q
                        state_grad = part if state_grad is None else state_grad + part
                    state_grad, state = state_grad.to(matmul), state.to(matmul)
                    key_matrix = expand(state_grad, feature_rows, d, query=False)
                    query_matrix = expand(state, feature_rows, d, query=True)
                    for start, stop in spans:
                        seg = single or _Segment(q, k, v, ignored, rows, start, stop, chunk, compute, matmul)
                        grad_y = seg.chunked(grad_sums[rows, :, start:stop]).to(matmul)
                        phi_k = features(seg.k, p, key=True, dtype=matmul)
                        grad_w = (phi_k @ state_grad).to(compute)
                        del phi_k
                        grad_k = feature_gradient(seg.wm, key_matrix, seg.km, d).to(compute)
                        grad_q = feature_gradient(grad_y, query_matrix, seg.qm, d).to(compute)
                        _write_gradients(grads, seg, ignored, rows, start, stop, grad_q, grad_k, grad_w)
        return (*grads, None, None, None, None, None, None, None, None)


def _write_gradients(grads, seg, ignored, rows, start, stop, grad_q, grad_k, grad_w):
    """A piece's gradients with respect to normalised q, k and w [b, h, chunks, C, *], taken back to q, k, v."""
    grad_q, grad_k, grad_w = (x.flatten(2, 3) for x in (grad_q, grad_k, grad_w))
    grad_v = grad_w[..., :seg.d_v]
    if ignored is not None:
        grad_v = grad_v.masked_fill(ignored[rows, None, start:stop, None], 0.0)
    grads[0][rows, :, start:stop] = normalise_backward(seg.q_raw, grad_q)
    grads[1][rows, :, start:stop] = normalise_backward(seg.k_raw, grad_k)
    grads[2][rows, :, start:stop] = grad_v
