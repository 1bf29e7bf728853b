"""Nyströmformer attention (Xiong et al. 2021), the path the layer runs: O(n m) time and memory.

    out = F1 · pinv(A) · (F3 · V) + conv(V),
    F1 = softmax(Q K~^T / sqrt(d)) [n, m],   A = softmax(Q~ K~^T / sqrt(d)) [m, m],
    F3 = softmax(Q~ K^T / sqrt(d)) [m, n],

with landmarks Q~, K~ the means of m segments of consecutive real positions, pinv(A) by the paper's
iteration (`iterative_pinv`) and conv an optional depthwise convolution of V along the sequence, one
kernel per head. Grouped as (F1 pinv(A)) (F3 V), nothing is n x n.

Segments: the L real positions of a row, in order, split into m runs of floor(L / m) or ceil(L / m)
positions (rank r goes to segment floor(r m / L)); padded positions belong to none, so the output at
real positions is that of the sequence with its pads removed (up to the convolution, which sees
padded values as zeros). For L divisible by m these are the paper's segments of L / m. For L < m each
real position is its own landmark and the other m - L are empty. Those drop out exactly: their
columns of F1 and A are masked and their rows of A are rows of I, so A is block-diagonal, [A of the
real landmarks, I] up to order, and so is every step of the iteration. (With m >= n, the output is
exact softmax attention once the iteration has converged: S pinv(S) S = S.)

Precision: everything runs in float32 (float64 stays float64) with autocast off, and the output is
cast back: the pseudo-inverse amplifies rounding, and a bf16 iteration drifts from the float32 one
by a few percent after a dozen steps.
"""

import torch
import torch.nn.functional as F


def nystrom_attention(q, k, v, *, num_landmarks: int, pinv_iterations: int, conv_weight=None, padding_mask=None):
    """q, k, v [batch, heads, n, d] -> [batch, heads, n, d] in q's dtype.

    conv_weight [heads, width] (odd width) or None; padding_mask [batch, n] bool, True = padded key.
    """
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = (x.to(compute) for x in (q, k, v))
        batch, _, n, head_dim = q.shape
        real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if padding_mask is None else ~padding_mask
        segment = landmark_segments(real, num_landmarks)
        counts = segment_sums(real[:, None, :, None].to(compute), segment, num_landmarks)[:, 0, :, 0]  # [b, m]
        q_landmarks, k_landmarks = (segment_sums(x, segment, num_landmarks) / counts.clamp_min(1)[:, None, :, None]
                                    for x in (q, k))
        empty = (counts == 0)[:, None, None, :]  # [b, 1, 1, m]
        scale = head_dim ** -0.5
        lowest = torch.finfo(compute).min  # not -inf: a row with every entry masked stays finite
        kernel_1 = (q @ k_landmarks.transpose(-1, -2) * scale).masked_fill(empty, lowest).softmax(-1)
        kernel_2 = (q_landmarks @ k_landmarks.transpose(-1, -2) * scale).masked_fill(empty, lowest).softmax(-1)
        identity = torch.eye(num_landmarks, dtype=compute, device=q.device)
        kernel_2 = torch.where(empty.transpose(-1, -2), identity, kernel_2)  # empty landmarks' rows: rows of I
        kernel_3 = (q_landmarks @ k.transpose(-1, -2) * scale).masked_fill(~real[:, None, None, :], lowest).softmax(-1)
        out = (kernel_1 @ iterative_pinv(kernel_2, pinv_iterations)) @ (kernel_3 @ v)
        if conv_weight is not None:
            out = out + value_convolution(v.masked_fill(~real[:, None, :, None], 0.0), conv_weight.to(compute))
    return out.to(dtype)


def landmark_segments(real: torch.Tensor, num_landmarks: int) -> torch.Tensor:
    """real [batch, n] bool -> segment [batch, n] long in 0..m-1 at real positions, m (dropped) at padded ones."""
    rank = real.cumsum(-1) - 1
    length = real.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(real, rank * num_landmarks // length, num_landmarks)


def segment_sums(x: torch.Tensor, segment: torch.Tensor, num_landmarks: int) -> torch.Tensor:
    """x [batch, heads, n, d], segment [batch, n] -> [batch, heads, m, d]: sums per segment (a scatter: O(n d))."""
    index = segment[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[-1])
    sums = x.new_zeros(x.shape[0], x.shape[1], num_landmarks + 1, x.shape[-1]).scatter_add(2, index, x)
    return sums[:, :, :num_landmarks]


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a [..., m, m], the paper's iteration (Razavi et al. 2014).

    Z0 = a^T / (||a||_1 ||a||_inf), largest column sum times largest row sum of each matrix: that bounds
    sigma_max^2, so a Z0 has its eigenvalues in [0, 1], where the iteration converges. Each step
    Z <- Z (13 I - aZ (15 I - aZ (7 I - aZ))) / 4 takes the error e = 1 - sigma^2 z of a singular value to
    e^3 (3 + e) / 4: third order near the answer, but only about 3.25 x closer while e is near 1, so the
    paper's 6 steps invert singular values down to about sqrt(||a||_1 ||a||_inf) / 30 and damp smaller ones.
    """
    identity = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norms = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)
    z = a.transpose(-1, -2) / norms[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


def value_convolution(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """v [batch, heads, n, d], weight [heads, width] -> [batch, heads, n, d]: each head's values
    convolved along the sequence with its own kernel, centred, zeros beyond the ends (the paper's
    depthwise Conv2d with kernel (width, 1))."""
    heads, width = weight.shape
    return F.conv2d(v, weight[:, None, :, None], padding=(width // 2, 0), groups=heads)
