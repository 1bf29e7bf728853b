"""What the attention tests share: relative errors, small baseline layers, random inputs, and the
float64 comparison of a fast path with its reference (outputs and gradients)."""

import math

import torch

from fma import build_attention


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; where expected is exactly zero only exact zero
    passes, and NaN never does."""
    actual, expected = actual.double(), expected.double()
    error = ((actual - expected).norm() / expected.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()
    return math.inf if math.isnan(error) else error


# Options that give each kind several blocks, chunks, buckets or levels at length 40.
SMALL_OPTIONS = {
    "fastmax": {"chunk_size": 4},
    "htransformer": {"block_size": 4},
    "linear": {"chunk_size": 4},
    "linformer": {"k": 8, "max_seq_len": 40},
    "local": {"window": 5},
    "nystromformer": {"num_landmarks": 4, "conv_kernel_size": 3},
    "reformer": {"n_hashes": 3, "n_buckets": 4, "chunk_size": 4},
}


def make_layer(kind: str, causal: bool, **options):
    """A float64 layer in eval mode (Reformer: the fixed rotations), with seeded weights."""
    torch.manual_seed(0)
    return build_attention(kind, dim=16, num_heads=2, causal=causal, **options).double().eval()


def random_qkv(n: int, batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, dtype=torch.float64, generator=generator).requires_grad_()
            for _ in range(3)]


def assert_same_outputs_and_gradients(fast, reference, inputs):
    """fast(*inputs) equals reference(*inputs) in float64, and so do the gradients of a random projection."""
    out, expected = fast(*inputs), reference(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    direction = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * direction).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * direction).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def padding(batch: int, n: int, real: int) -> torch.Tensor:
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask[:, real:] = True
    return mask
