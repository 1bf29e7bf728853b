"""Linformer: reference (`naive.py`), projected torch path (`projected.py`), layer."""

from .layer import LinformerAttention

__all__ = ["LinformerAttention"]
