"""H-Transformer-1D: reference (`naive.py`), block-wise torch path (`blockwise.py`), layer."""

from .layer import HTransformer1D

__all__ = ["HTransformer1D"]
