"""What the fused Triton kernels share, without importing Triton: whether it is installed, whether it
runs interpreted on the CPU, and how kernel outputs are allocated. At the bottom of `fma`: imports
nothing else from the package.
"""

import importlib.util
import math
import os

import torch

# A constant, not a call: torch.compile reads it while tracing a model (it cannot trace find_spec).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before triton is
    imported): on the CPU, for tests of the kernels' logic."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised buffer for a fused kernel to fill; full of NaN when FMA_TRITON_POISON=1, so
    that a test sees every element a kernel fails to write."""
    if os.environ.get("FMA_TRITON_POISON") == "1":
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
