"""Nyströmformer attention (Xiong et al. 2021): `model=nystromformer`, bidirectional only (`landmark.py`)."""

import torch
from torch import nn

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..registry import register_attention
from .landmark import nystrom_attention


@register_attention("nystromformer")
class NystromAttention(AttentionLayer):
    """Softmax attention through m landmarks (segment means of queries and keys) and a pseudo-inverse.

    num_landmarks: m, the rank of the approximation (paper: 64).
    pinv_iterations: steps of the iterative pseudo-inverse (paper: 6).
    conv_kernel_size: width of the depthwise convolution of the values added to the output, one
        learned kernel per head (paper's code: 33); odd, so that it is centred; 0 or None: off.
    """

    has_causal_form = False
    why_no_causal_form = ("Attention kind 'nystromformer' is bidirectional only: its landmarks average queries "
                          "and keys over segments of the sequence, so every position sees future ones and "
                          "next-token prediction would read its answer.")

    def __init__(self, *, dim: int, num_heads: int, causal: bool, num_landmarks: int = 64,
                 pinv_iterations: int = 6, conv_kernel_size: int | None = 33):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if num_landmarks < 1:
            raise ConfigurationError(
                f"num_landmarks={num_landmarks} must be at least 1; set model.attention.num_landmarks=.")
        if pinv_iterations < 1:
            raise ConfigurationError(
                f"pinv_iterations={pinv_iterations} must be at least 1; set model.attention.pinv_iterations=.")
        conv_kernel_size = conv_kernel_size or 0
        if conv_kernel_size < 0 or (conv_kernel_size and conv_kernel_size % 2 == 0):
            raise ConfigurationError(
                f"conv_kernel_size={conv_kernel_size} must be odd (a kernel centred on each position) or 0 (off); "
                f"set model.attention.conv_kernel_size=, e.g. 33."
            )
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.conv_weight = None
        if conv_kernel_size:
            bound = conv_kernel_size ** -0.5  # nn.Conv2d's default init for this fan-in
            self.conv_weight = nn.Parameter(torch.empty(num_heads, conv_kernel_size).uniform_(-bound, bound))

    def attend(self, q, k, v, padding_mask):
        return nystrom_attention(q, k, v, num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations,
                                 conv_weight=self.conv_weight, padding_mask=padding_mask)
