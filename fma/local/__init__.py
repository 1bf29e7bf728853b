"""Sliding-window attention: reference (`naive.py`), block-wise torch path, FlexAttention path, layer."""

from .layer import LocalAttention

__all__ = ["LocalAttention"]
