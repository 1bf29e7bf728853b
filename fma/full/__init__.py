"""Exact attention: PyTorch SDPA (`layer.py`) and the plain formula (`naive.py`)."""

from .layer import SDPA_BACKENDS, FullAttention

__all__ = ["SDPA_BACKENDS", "FullAttention"]
