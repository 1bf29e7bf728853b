"""Fastmax (FAST, Gerami et al. 2024): reference (`naive.py`), factorised chunked path (`chunk.py`), layer."""

from .layer import FastmaxAttention

__all__ = ["FastmaxAttention"]
