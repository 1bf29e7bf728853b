"""H-Transformer-1D's block-wise path (fma/htransformer/blockwise.py) against the per-query loop over
explicit coverage lists (fma/htransformer/naive.py), and against exact attention where averaging is exact."""

import pytest
import torch
import torch.nn.functional as F

from attention_testing import assert_same_outputs_and_gradients, padding, random_qkv
from fma.htransformer.blockwise import hierarchical_attention, num_levels
from fma.htransformer.naive import coverage, hierarchical_attention_reference


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, block_size, real", [(37, 4, 37), (29, 2, 24), (40, 6, 33)])
def test_htransformer_matches_reference(causal, n, block_size, real):
    """Fast path equals the per-query loop over explicit coverage lists, padding included."""
    mask = padding(2, n, real)
    assert_same_outputs_and_gradients(
        lambda q, k, v: hierarchical_attention(q, k, v, block_size=block_size, causal=causal, padding_mask=mask),
        lambda q, k, v: hierarchical_attention_reference(q, k, v, block_size=block_size, causal=causal,
                                                         padding_mask=mask),
        random_qkv(n),
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, block_size", [(37, 4), (64, 2)])
def test_htransformer_is_full_attention_when_coarse_tokens_are_constant(causal, n, block_size):
    """With Q, K, V constant over the coarsest tokens (2^L), averaging is exact and a coarse token
    weighted as its c tokens (+ log c) reproduces full attention: one softmax, each key once."""
    group = 1 << num_levels(n, block_size)
    assert group >= 8
    q, k, v = (x.detach()[:, :, :: group].repeat_interleave(group, dim=2)[:, :, :n] for x in random_qkv(n))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = hierarchical_attention(q, k, v, block_size=block_size, causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, block_size", [(37, 4), (64, 2), (100, 6), (16, 8), (300, 16)])
def test_htransformer_covers_each_key_exactly_once(causal, n, block_size):
    """Each query's coverage list counts every token of its causal past (or of the sequence) once,
    and always holds the whole previous fine block."""
    for i in range(n):
        entries = coverage(i, n, block_size, causal)
        tokens = sorted(j for level, first in entries for j in range(first, min(n, first + (1 << level))))
        assert tokens == list(range(i + 1 if causal else n))
        block = i // block_size
        assert {(0, j) for j in range(max(0, (block - 1) * block_size), block * block_size)} <= set(entries)
