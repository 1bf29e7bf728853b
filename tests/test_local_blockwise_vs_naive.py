"""Sliding-window attention's block-wise path (fma/local/blockwise.py, through the layer) against its
n x n reference (fma/local/naive.py)."""

import pytest

from attention_testing import assert_same_outputs_and_gradients, make_layer, padding, random_qkv
from fma.local.naive import banded_softmax_attention


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 5, 8])
def test_local_matches_banded_softmax(causal, window):
    """The block-wise path equals softmax over an explicit n x n band mask (lengths not divisible by window)."""
    n = 23
    q, k, v = random_qkv(n)
    mask = padding(2, n, real=20)
    layer = make_layer("local", causal, window=window)
    assert_same_outputs_and_gradients(
        lambda q, k, v: layer.attend(q, k, v, mask),
        lambda q, k, v: banded_softmax_attention(q, k, v, window=window, causal=causal, padding_mask=mask),
        [q, k, v])
