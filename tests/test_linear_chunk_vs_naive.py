"""Linear attention's chunked path (fma/linear/chunk.py) against the O(n^2) formula (fma/linear/naive.py),
and its bf16 inputs against fp32."""

import pytest
import torch

from attention_testing import assert_same_outputs_and_gradients, random_qkv
from fma.linear.chunk import linear_attention
from fma.linear.naive import linear_attention_reference


@pytest.mark.parametrize("causal, chunk_size", [(True, 1), (True, 3), (True, 8), (True, 23), (True, 64), (False, 8)])
def test_linear_matches_quadratic_formula(causal, chunk_size):
    """Chunked causal (chunk sizes that do not divide n = 23, one chunk, longer than n) and non-causal
    paths equal the plain O(n^2) formula: outputs and gradients."""
    assert_same_outputs_and_gradients(
        lambda q, k, v: linear_attention(q, k, v, causal=causal, chunk_size=chunk_size, eps=1e-6),
        lambda q, k, v: linear_attention_reference(q, k, v, causal=causal, eps=1e-6),
        random_qkv(23),
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("key_shift", [0.0, -7.0])
def test_linear_bf16_matches_fp32(causal, key_shift):
    """bf16 inputs give a finite bf16 output close to the fp32 result; with keys near -7, elu + 1 is
    about 1e-3, which bf16 rounds to 0: only fp32 feature maps and sums keep the weights."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 200, 16, generator=generator) for _ in range(3))
    q, k, v = (x.bfloat16() for x in (3 * q, key_shift + 0.5 * k, v))
    out = linear_attention(q, k, v, causal=causal, chunk_size=16, eps=1e-6)
    expected = linear_attention(q.float(), k.float(), v.float(), causal=causal, chunk_size=16, eps=1e-6)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
