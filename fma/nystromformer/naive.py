"""Nyströmformer attention as its formula, with torch.linalg.pinv: the ground truth of `landmark.py`
(tests only; no padding: pass the real positions)."""

import torch
import torch.nn.functional as F


def nystrom_attention_reference(q, k, v, *, num_landmarks: int, conv_weight=None) -> torch.Tensor:
    """q, k, v [batch, heads, n, d]; landmark j averages positions ceil(j n / m) .. ceil((j + 1) n / m) - 1
    (empty ones, when n < m, are left out); conv_weight [heads, width] or None."""
    n, head_dim = q.shape[-2:]
    bounds = [-(-j * n // num_landmarks) for j in range(num_landmarks + 1)]
    segments = [(start, end) for start, end in zip(bounds, bounds[1:]) if end > start]
    q_landmarks = torch.stack([q[..., start:end, :].mean(-2) for start, end in segments], dim=-2)
    k_landmarks = torch.stack([k[..., start:end, :].mean(-2) for start, end in segments], dim=-2)
    scale = head_dim ** -0.5
    kernel_1 = torch.softmax(q @ k_landmarks.transpose(-1, -2) * scale, dim=-1)
    kernel_2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2) * scale, dim=-1)
    kernel_3 = torch.softmax(q_landmarks @ k.transpose(-1, -2) * scale, dim=-1)
    out = kernel_1 @ torch.linalg.pinv(kernel_2) @ kernel_3 @ v
    if conv_weight is not None:
        width = conv_weight.shape[-1]
        padded = F.pad(v, (0, 0, width // 2, width // 2))
        out = out + sum(conv_weight[:, t, None, None] * padded[..., t:t + n, :] for t in range(width))
    return out
