"""Fast Multipole Attention: reference (`naive.py`), torch path (`blocklocal.py`), Triton kernels
(`fused.py`), the function choosing between them (`attention.py`) and the layer (`layer.py`)."""

from .attention import multipole_attention
from .layer import FastMultipoleAttention

__all__ = ["FastMultipoleAttention", "multipole_attention"]
