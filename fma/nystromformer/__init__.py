"""Nyströmformer attention: reference (`naive.py`), landmark path (`landmark.py`), layer."""

from .layer import NystromAttention

__all__ = ["NystromAttention"]
