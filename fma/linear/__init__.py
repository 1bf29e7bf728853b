"""Linear attention: reference (`naive.py`), chunked torch path (`chunk.py`), layer."""

from .layer import LinearAttention

__all__ = ["LinearAttention"]
