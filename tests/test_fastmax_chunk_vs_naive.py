"""Fastmax's factorised chunked path (fma/fastmax/chunk.py) against the O(n^2) formula (fma/fastmax/naive.py),
hand-computed weights, causality, padding, bf16 inputs against fp32, and the layer's settings."""

import pytest
import torch

from attention_testing import assert_same_outputs_and_gradients, padding, random_qkv, relative_error
from fma.errors import ConfigurationError
from fma.fastmax import FastmaxAttention  # registers "fastmax"
from fma.fastmax.chunk import fastmax_attention, normalise, score
from fma.fastmax.naive import fastmax_reference
from fma.registry import build_attention


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal, chunk_size", [(True, 1), (True, 3), (True, 8), (True, 23), (True, 64), (False, 8)])
def test_fastmax_matches_quadratic_formula(p, causal, chunk_size):
    """Chunked causal (chunk sizes that do not divide n = 23, one chunk, longer than n) and non-causal
    paths equal the plain O(n^2) formula: outputs and gradients."""
    assert_same_outputs_and_gradients(
        lambda q, k, v: fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=chunk_size),
        lambda q, k, v: fastmax_reference(q, k, v, p=p, causal=causal),
        random_qkv(23),
    )


@pytest.mark.parametrize("causal, p, expected", [
    (False, 2, [[5.0, 1.0], [5.0, 1.0]]), (True, 2, [[6.0, 0.0], [5.0, 1.0]]),
    (False, 1, [[6.0, 0.0], [6.0, 0.0]]), (True, 1, [[6.0, 0.0], [6.0, 0.0]]),
])
def test_fastmax_hand_computed(causal, p, expected):
    """d = 2, so every normalised vector is +-u, u = (1, -1) / sqrt(2), whatever its scale: q_0 = q_1 = k_0 = u
    and k_1 = -u. Scores 1 and -1 give f = 5/2 and 1/2 for p = 2 (weights 5/6, 1/6), f = 2 and 0 for p = 1."""
    q = torch.tensor([[3.0, 1.0], [0.5, -2.0]], dtype=torch.float64)
    k = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    v = torch.tensor([[6.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
    q, k, v = q[None, None], k[None, None], v[None, None]
    for out in (fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=1),
                fastmax_reference(q, k, v, p=p, causal=causal)):
        torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_fastmax_scores_bounded_and_weights_non_negative():
    """Normalised scores lie in [-1, 1] at any input scale, so f >= 0 for p = 1 and f >= 1/2 for p = 2."""
    q, k, _ = random_qkv(64, head_dim=16)
    scores = normalise(1e3 * q) @ normalise(1e-3 * k + 5.0).transpose(-1, -2)
    assert scores.abs().max() <= 1 + 1e-12
    assert score(scores, 1).min() >= 0 and score(scores, 2).min() >= 0.5
    assert score(torch.tensor(-1.0), 1) == 0 and score(torch.tensor(-1.0), 2) == 0.5


@pytest.mark.parametrize("p", [1, 2])
def test_fastmax_causal(p):
    """Output t does not change when queries, keys and values after t change."""
    torch.manual_seed(0)
    q, k, v = (x.detach() for x in random_qkv(23))
    out = fastmax_attention(q, k, v, p=p, causal=True, chunk_size=4)
    changed = [x.clone() for x in (q, k, v)]
    for x in changed:
        x[:, :, 11:] = torch.randn_like(x[:, :, 11:])
    out_changed = fastmax_attention(*changed, p=p, causal=True, chunk_size=4)
    assert torch.equal(out[:, :, :11], out_changed[:, :, :11])
    assert not torch.allclose(out[:, :, 11:], out_changed[:, :, 11:])


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_padded_keys_get_no_weight(p, causal):
    """With keys 17.. padded, the real queries' outputs and gradients equal the formula on the unpadded
    prefix, and every output (padded queries' too) equals the formula with the same mask."""
    real = 17
    assert_same_outputs_and_gradients(
        lambda q, k, v: fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=5,
                                          padding_mask=padding(2, 23, real))[:, :, :real],
        lambda q, k, v: fastmax_reference(q[:, :, :real], k[:, :, :real], v[:, :, :real], p=p, causal=causal),
        random_qkv(23),
    )
    q, k, v = random_qkv(23)
    out = fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=5, padding_mask=padding(2, 23, real))
    torch.testing.assert_close(out, fastmax_reference(q, k, v, p=p, causal=causal, padding_mask=padding(2, 23, real)),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_all_keys_padded_is_finite(causal):
    """A sequence with every key padded (no key to attend to) gives finite outputs and gradients."""
    q, k, v = random_qkv(10)
    mask = padding(2, 10, 6)
    mask[1] = True
    out = fastmax_attention(q, k, v, p=2, causal=causal, chunk_size=4, padding_mask=mask)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_bf16_matches_fp32(p, causal):
    """bf16 inputs give a finite bf16 output close to the fp32 result. Its relative error, about 1.5e-3, is
    the output's bf16 rounding alone; normalising and summing in bf16 instead gives about 3.5e-3."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 200, 16, generator=generator) for _ in range(3))
    q, k, v = (x.bfloat16() for x in (q, k, 3 + v))
    out = fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=16)
    expected = fastmax_attention(q.float(), k.float(), v.float(), p=p, causal=causal, chunk_size=16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    assert relative_error(out, expected) < 2.5e-3


@pytest.mark.parametrize("options, setting", [({"p": 3}, "model.attention.p"), ({"p": 0}, "model.attention.p"),
                                              ({"chunk_size": 0}, "model.attention.chunk_size")])
def test_fastmax_bad_settings(options, setting):
    with pytest.raises(ConfigurationError, match=setting):
        build_attention("fastmax", dim=16, num_heads=2, causal=True, **options)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_layer(p, causal):
    """The registered layer, float64: forward equals the formula between its projections; backward reaches
    every weight."""
    torch.manual_seed(0)
    layer = build_attention("fastmax", dim=16, num_heads=2, causal=causal, p=p, chunk_size=4).double()
    assert isinstance(layer, FastmaxAttention)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    out = layer(x)
    expected = fastmax_reference(*layer.project(x), p=p, causal=causal)
    expected = layer.proj(expected.transpose(1, 2).reshape(2, 11, 16))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in layer.parameters())
