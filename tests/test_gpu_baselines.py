"""GPU paths of the baselines against their CPU-tested block-wise paths in float64 (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from fma.local import flex_sliding_window, neighbour_block_attention
from fma.reformer import lsh_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n, window", [(1000, 128), (4096, 512)])
def test_local_flex_path_matches_blockwise_float64(causal, dtype, tolerance, n, window):
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator("cuda").manual_seed(n + window)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", generator=generator) for _ in range(3))
    grad = torch.randn(2, 4, n, 64, device="cuda", generator=generator)
    fast_inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = flex_sliding_window(*fast_inputs, window=window, causal=causal)
    out.backward(grad.to(dtype))
    exact_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    _, numerator, denominator = neighbour_block_attention(*exact_inputs, block=window, causal=causal, window=window)
    expected = numerator / denominator
    expected.backward(grad.double())
    assert relative_error(out, expected) < tolerance
    for fast, exact in zip(fast_inputs, exact_inputs):
        assert relative_error(fast.grad, exact.grad) < tolerance


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_reformer_on_the_gpu_matches_float64(monkeypatch, causal, dtype, tolerance):
    """The same block-wise LSH code in low precision on the GPU (CPU-tested against plain loops)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # restored after the test
    generator = torch.Generator("cuda").manual_seed(7)
    q, v, grad = (torch.randn(2, 4, 2000, 64, device="cuda", generator=generator) for _ in range(3))
    buckets = torch.randint(16, (2, 4, 4, 2000), device="cuda", generator=generator)
    inputs = (q, F.normalize(q, dim=-1), v)
    fast_inputs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = lsh_attention(*fast_inputs, buckets, window=64, causal=causal)
    out.backward(grad.to(dtype))
    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    expected = lsh_attention(*exact_inputs, buckets, window=64, causal=causal)
    expected.backward(grad.double())
    assert relative_error(out, expected) < tolerance
    for fast, exact in zip(fast_inputs, exact_inputs):
        assert relative_error(fast.grad, exact.grad) < tolerance
