"""FMA's learned basis (coarse summaries of keys and values): reference, torch and Triton paths, module."""

from .module import DOWNSAMPLE_KINDS, FUSED_KINDS, Downsample

__all__ = ["DOWNSAMPLE_KINDS", "FUSED_KINDS", "Downsample"]
