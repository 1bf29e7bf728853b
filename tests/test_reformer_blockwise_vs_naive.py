"""Reformer's block-wise LSH attention (fma/reformer/blockwise.py) against plain loops over explicit key
sets (fma/reformer/naive.py) and, with one bucket, against softmax; on the GPU, in fp32 and bf16
against itself in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from attention_testing import assert_same_outputs_and_gradients, make_layer, random_qkv, relative_error
from fma.reformer.blockwise import lsh_attention
from fma.reformer.naive import lsh_attention_reference


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_reformer_one_bucket_one_chunk_is_full_attention_without_self(causal, n_hashes):
    """One bucket and a window spanning the sequence: softmax over every visible key except the query's
    own (which only the first causal query, seeing nothing else, keeps); several identical rounds
    change nothing. (Rounds that differ are checked against the reference below.)"""
    n = 21
    layer = make_layer("reformer", causal, n_hashes=n_hashes, n_buckets=1, chunk_size=n)
    x = torch.randn(2, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    q, k, v = layer.project(x)
    torch.testing.assert_close(k, q / q.norm(dim=-1, keepdim=True))
    visible = ~torch.eye(n, dtype=torch.bool)
    if causal:
        visible = visible.tril()
        visible[0, 0] = True
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(layer.attend(q, k, v, None), torch.softmax(scores, -1) @ v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, n_buckets, chunk_size, n_hashes", [(29, 4, 5, 3), (24, 2, 3, 2), (17, 8, 30, 2)])
def test_reformer_matches_reference(causal, n, n_buckets, chunk_size, n_hashes):
    """The block-wise computation with duplicate counts equals plain loops over each query's union of key sets."""
    layer = make_layer("reformer", causal, n_hashes=n_hashes, n_buckets=n_buckets, chunk_size=chunk_size)
    q, _, v = random_qkv(n)
    k = F.normalize(q.detach(), dim=-1).requires_grad_()
    buckets = layer.buckets(k)
    assert len(buckets.unique()) == n_buckets
    assert_same_outputs_and_gradients(
        lambda q, k, v: lsh_attention(q, k, v, buckets, window=chunk_size, causal=causal),
        lambda q, k, v: lsh_attention_reference(q, k, v, buckets, window=chunk_size, causal=causal),
        [q, k, v],
    )


# GPU (skipped without CUDA) ------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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
