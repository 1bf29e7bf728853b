"""Sliding-window attention's FlexAttention path (fma/local/flex.py) against its block-wise path
(fma/local/blockwise.py, CPU-tested against the n x n reference) in float64 (GPU tests skip without
CUDA); its block mask, built from block indices, against FlexAttention's own builder (CPU)."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attention_testing import relative_error
from fma.local.blockwise import neighbour_block_attention
from fma.local.flex import flex_sliding_window, sliding_window_block_mask

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def block_lists(mask, full: bool) -> list[list[int]]:
    """Per query block, the sorted key blocks of its partial (or full) list."""
    counts, indices = (mask.full_kv_num_blocks, mask.full_kv_indices) if full else (mask.kv_num_blocks, mask.kv_indices)
    return [sorted(indices[0, 0, row, :count].tolist()) for row, count in enumerate(counts[0, 0].tolist())]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n, window", [(64, 500), (129, 128), (300, 150), (1000, 1), (1000, 128), (5000, 700)])
def test_block_mask_from_indices_equals_flex_attentions_own(n, window, causal):
    """Same partial and full key blocks per query block as create_block_mask, which evaluates all n x n pairs."""
    def visible(batch, head, query, key):
        offset = query - key
        return (offset >= 0) & (offset < window) if causal else (offset < window) & (offset > -window)

    mask = sliding_window_block_mask(n, window, causal, torch.device("cpu"))
    expected = create_block_mask(visible, None, None, n, n, device="cpu", _compile=False)
    for full in (False, True):
        assert block_lists(mask, full) == block_lists(expected, full)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flex_attention_with_the_mask_equals_the_blockwise_path(causal):
    """Eager FlexAttention (CPU, float64) over the index-built mask, across a partial last block."""
    n, window = 300, 150
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=sliding_window_block_mask(n, window, causal, q.device))
    _, numerator, denominator = neighbour_block_attention(q, k, v, block=window, causal=causal, window=window)
    assert relative_error(out, numerator / denominator) < 1e-12


@needs_cuda
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


@needs_cuda
def test_gpu_many_lengths_in_one_process_stay_linear_in_memory():
    """Past dynamo's default of 8 compiled shapes, the eager path must not fall back to eager
    FlexAttention (n x n scores): after nine lengths, a 64K sequence stays within O(n * window)."""
    window, heads, dim = 128, 4, 64
    for n in [1000 + 97 * i for i in range(9)]:
        q = torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16)
        flex_sliding_window(q, q, q, window=window, causal=True)
    n = 65536
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flex_sliding_window(q, k, v, window=window, causal=True).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 64 * n * heads * dim * 2, f"{extra / 2**30:.2f} GiB for one 64K layer: an n x n path"
