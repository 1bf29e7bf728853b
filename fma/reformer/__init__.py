"""Reformer LSH attention: reference (`naive.py`), block-wise torch path (`blockwise.py`), layer."""

from .layer import ReformerAttention

__all__ = ["ReformerAttention"]
