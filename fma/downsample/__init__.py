"""FMA's learned basis (coarse summaries of keys and values): reference, torch and Triton paths, module."""

from .module import ANY_LENGTH_KINDS, DOWNSAMPLE_KINDS, FUSED_KINDS, Downsample, summarise_sides

__all__ = ["ANY_LENGTH_KINDS", "DOWNSAMPLE_KINDS", "FUSED_KINDS", "Downsample", "summarise_sides"]
