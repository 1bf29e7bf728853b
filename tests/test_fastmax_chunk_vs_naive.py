"""Fastmax's factorised chunked path (fma/fastmax/chunk.py) against the O(n^2) formula (fma/fastmax/naive.py):
outputs and gradients in float64 and float32, the hand-written backward under gradcheck, the feature map
and its gradient, the bytes saved for backward, hand-computed weights, causality, padding, bf16 against
fp32, and the layer's settings."""

import pytest
import torch

from attention_testing import assert_same_outputs_and_gradients, padding, random_qkv, relative_error
from fma.errors import ConfigurationError
from fma.fastmax import FastmaxAttention  # registers "fastmax"
from fma.fastmax.chunk import (blocks, expand, feature_count, feature_gradient, features, fastmax_attention,
                               gradient_rows, normalise, round_up, score)
from fma.fastmax.naive import fastmax_reference
from fma.registry import build_attention


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal, chunk_size, segment_tokens", [
    (True, 1, 1 << 17), (True, 3, 1 << 17), (True, 8, 1 << 17), (True, 23, 1 << 17), (True, 64, 1 << 17),
    (True, 3, 30), (True, 4, 46), (False, 8, 1 << 17), (False, 8, 30), (False, 8, 46)])
def test_fastmax_matches_quadratic_formula(p, causal, chunk_size, segment_tokens):
    """Chunked causal (chunk sizes that do not divide n = 23, one chunk, longer than n) and non-causal
    paths equal the plain O(n^2) formula: outputs and gradients. segment_tokens 30 (2 heads x 23 > 30):
    each batch element alone, its sequence in segments with the state carried across; 46: one batch
    element's whole sequence per piece."""
    assert_same_outputs_and_gradients(
        lambda q, k, v: fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=chunk_size,
                                          segment_tokens=segment_tokens),
        lambda q, k, v: fastmax_reference(q, k, v, p=p, causal=causal),
        random_qkv(23),
    )


def test_fastmax_pieces():
    """Several batch elements per piece where their heads x n fits; else one, in whole chunks."""
    assert blocks(3, 2, 5, 1, 20) == [(slice(0, 2), [(0, 5)]), (slice(2, 3), [(0, 5)])]
    assert blocks(2, 2, 24, 4, 20) == [(slice(0, 1), [(0, 8), (8, 16), (16, 24)]),
                                       (slice(1, 2), [(0, 8), (8, 16), (16, 24)])]
    assert blocks(1, 2, 24, 0, 20) == [(slice(0, 1), [(0, 10), (10, 20), (20, 24)])]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_float32_matches_float64_formula(p, causal):
    """float32 inputs (computed in float32 throughout): outputs and gradients within 1e-5 of the float64
    formula, n = 50 not a multiple of the chunk, two segments, the last 3 keys padded."""
    q, k, v = random_qkv(50, head_dim=16)
    mask = padding(2, 50, 47)
    direction = torch.randn(2, 2, 50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = fastmax_attention(*inputs, p=p, causal=causal, chunk_size=16, padding_mask=mask, segment_tokens=64)
    expected = fastmax_reference(q, k, v, p=p, causal=causal, padding_mask=mask)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad((out * direction.float()).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * direction).sum(), (q, k, v))
    for actual, wanted in zip([out, *grads], [expected, *expected_grads]):
        assert relative_error(actual, wanted) < 1e-5


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_hand_written_backward_gradcheck(p, causal):
    """The custom autograd Function's backward against finite differences (float64, padding, a sequence
    that is not a multiple of the chunk, segments with a carried state)."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=torch.float64, generator=generator).requires_grad_() for _ in range(3))
    mask = padding(1, 7, 5)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=3, padding_mask=mask,
                                          segment_tokens=6),
        (q, k, v), fast_mode=True)


@pytest.mark.parametrize("d", [1, 2, 5, 8, 64])
@pytest.mark.parametrize("p", [1, 2])
def test_fastmax_features(d, p):
    """phi_q(q).phi_k(k) = f(q.k); 1 + d + d(d+1)/2 features for p = 2 (2145 at d = 64), padded to a
    multiple of 8; the gradient of phi(x).S y through the expanded state equals autograd's."""
    generator = torch.Generator().manual_seed(d)
    x, y = (torch.randn(3, 5, d, dtype=torch.float64, generator=generator) for _ in range(2))
    phi_x, phi_y = features(x, p, key=False), features(y, p, key=True)
    assert feature_count(64, 2) == 2145 and phi_x.shape[-1] == round_up(feature_count(d, p)) < feature_count(d, p) + 8
    torch.testing.assert_close(phi_x @ phi_y.transpose(-1, -2), score(x @ y.transpose(-1, -2), p),
                               rtol=1e-12, atol=1e-12)
    state = torch.randn(3, phi_x.shape[-1], 4, dtype=torch.float64, generator=generator)
    weights = torch.randn(3, 5, 4, dtype=torch.float64, generator=generator)
    rows = gradient_rows(d, p, x.device)
    for key in (False, True):
        leaf = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad((features(leaf, p, key=key) @ state * weights).sum(), leaf)
        actual = feature_gradient(weights, expand(state, rows, d, query=not key), x, d)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_compiled_graphs_hold_no_index_arithmetic(causal):
    """gradient_rows is a constant under torch.compile: the arithmetic that built it on tensors (% d,
    minimum) was folded by inductor into the backward's gather index, which its loop merging on CUDA
    (torch 2.11) cannot simplify. The traced forward and backward graphs hold no such ops, and the
    compiled gradient equals eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    traced = set()

    def record(graph, _):
        traced.update(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward)

    layer = build_attention("fastmax", dim=32, num_heads=2, causal=causal, chunk_size=16)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (layer, torch.compile(layer, backend=aot_autograd(fw_compiler=record, bw_compiler=record),
                                     fullgraph=True)):
        leaf = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(run(leaf).square().sum(), leaf)[0])
    torch._dynamo.reset()
    assert traced and not [op for op in traced if "remainder" in op or "minimum" in op]
    assert relative_error(grads[1], grads[0]) <= 1e-5


def saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for backward of fn(*inputs)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_saved_bytes_per_position_bounded(causal):
    """What backward keeps: q, k, v, the output and normaliser per position, and a carried state per
    segment (causal; segments of 128 positions x 2 heads) or one state per row: at most 4 d + 1 numbers
    per position plus D (d + 1) / 128 (both padded), whatever n, and less than one feature vector phi(k)
    [D] per position (what the states and features of a plain autograd graph would far exceed)."""
    d, chunk, segment_tokens = 16, 8, 256
    state = round_up(feature_count(d, 2)) * round_up(d + 1)  # numbers in one state, D x e padded
    per_position = []
    for n in (256, 1024):
        q, k, v = (x.detach().float().requires_grad_() for x in random_qkv(n, batch=1, head_dim=d))
        total = saved_bytes(lambda q, k, v: fastmax_attention(q, k, v, p=2, causal=causal, chunk_size=chunk,
                                                              segment_tokens=segment_tokens), q, k, v)
        per_position.append(total / (2 * n))
    assert per_position[1] <= 4 * (4 * d + 1 + state / 128)
    assert per_position[1] < 4 * feature_count(d, 2)
    assert per_position[1] <= 1.25 * per_position[0]


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


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_fastmax_under_bf16_autocast(p, causal):
    """Under autocast the features, scores and products run in bf16 (running sums in float32): a finite
    output close to the float32 result, in the input dtype as autocast leaves it, and finite gradients."""
    q, k, v = (x.detach().float().requires_grad_() for x in random_qkv(40, head_dim=16))
    mask = padding(2, 40, 37)
    expected = fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=16, padding_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastmax_attention(q, k, v, p=p, causal=causal, chunk_size=16, padding_mask=mask, segment_tokens=64)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert relative_error(out, expected) < 1e-2
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.isfinite(grad).all() and relative_error(grad, expected_grad) < 5e-2


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
