"""Sliding-window attention's FlexAttention path (fma/local/flex.py) against its block-wise path
(fma/local/blockwise.py, CPU-tested against the n x n reference) in float64 (skipped without CUDA)."""

import pytest
import torch

from attention_testing import relative_error
from fma.local.blockwise import neighbour_block_attention
from fma.local.flex import flex_sliding_window

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
