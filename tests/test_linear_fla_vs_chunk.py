"""Causal linear attention on flash-linear-attention's kernels (fma/linear/fla.py) against the chunked
torch path (fma/linear/chunk.py, CPU-tested against the O(n^2) formula).

CPU: fla's kernels need a GPU (they do not run under TRITON_INTERPRET=1: its loops index with plain
ints), so the CPU tests check what fla.py adds around them (feature map, float32 denominator with
eps, layout, padding) with a torch numerator in its place, and the backend option. GPU (skipped
without CUDA or without fla-core, the `gpu` extra): fla's numerator in bf16 (and fp32, TF32 dots)
against float64, outputs and gradients; its registered operators under torch.library.opcheck.
"""

import pytest
import torch

from attention_testing import assert_same_outputs_and_gradients, padding, random_qkv, relative_error
from fma import ConfigurationError, build_attention
from fma.linear.chunk import causal_denominator, linear_attention
from fma.linear.fla import fla_available, fla_causal_linear_attention

needs_fla = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()),
                               reason="needs a CUDA GPU and fla-core")


def torch_numerator(phi_q, phi_k, v):
    """sum_{j <= i} (phi_q_i . phi_k_j) v_j on [b, n, h, d], the O(n^2) way: what fla computes."""
    weights = torch.einsum("bihd,bjhd->bhij", phi_q, phi_k).tril()
    return torch.einsum("bhij,bjhd->bihd", weights, v)


@pytest.mark.parametrize("with_padding", [False, True])
def test_fla_wrapper_matches_chunk_path(with_padding):
    """Around a torch numerator, the wrapper equals chunk.linear_attention: outputs and gradients (float64)."""
    mask = padding(2, 23, real=17) if with_padding else None
    assert_same_outputs_and_gradients(
        lambda q, k, v: fla_causal_linear_attention(q, k, v, eps=1e-6, padding_mask=mask, numerator=torch_numerator),
        lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=8, eps=1e-6, padding_mask=mask),
        random_qkv(23),
    )


@pytest.mark.parametrize("n, chunk_size", [(23, 8), (64, 64), (5, 64), (130, 1)])
def test_causal_denominator_equals_one_cumsum(n, chunk_size):
    """fla's denominator by chunked prefix sums equals phi(q_i) . sum_{j <= i} phi(k_j) (float64)."""
    generator = torch.Generator().manual_seed(n)
    phi_q, phi_k = (torch.rand(2, 3, n, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    expected = (phi_q * phi_k.cumsum(-2)).sum(-1, keepdim=True)
    torch.testing.assert_close(causal_denominator(phi_q, phi_k, chunk_size), expected, rtol=1e-12, atol=1e-12)


def test_backend_option():
    with pytest.raises(ConfigurationError, match="model.attention.backend="):
        build_attention("linear", dim=16, num_heads=2, causal=True, backend="triton")
    if not fla_available():
        with pytest.raises(ConfigurationError, match="model.attention.backend="):
            build_attention("linear", dim=16, num_heads=2, causal=True, backend="fla")
    else:
        layer = build_attention("linear", dim=16, num_heads=2, causal=True, backend="fla")
        with pytest.raises(ConfigurationError, match="model.attention.backend="):
            layer(torch.randn(1, 8, 16))
    torch.manual_seed(0)
    auto = build_attention("linear", dim=16, num_heads=2, causal=True, chunk_size=4)
    torch.manual_seed(0)
    torch_path = build_attention("linear", dim=16, num_heads=2, causal=True, chunk_size=4, backend="torch")
    x = torch.randn(2, 20, 16)
    assert torch.equal(auto(x), torch_path(x))  # on the CPU, auto is the torch path
    non_causal = build_attention("linear", dim=16, num_heads=2, causal=False, backend="fla")  # matmuls, no fla
    assert non_causal(x).shape == x.shape


# GPU (skipped without CUDA or fla-core) ------------------------------------------------------------


@needs_fla
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-2)])
@pytest.mark.parametrize("n", [1000, 4133, 16384])
@pytest.mark.parametrize("key_shift", [0.0, -7.0])
def test_fla_on_the_gpu_matches_float64(monkeypatch, dtype, tolerance, n, key_shift):
    """fla's numerator (bf16; fp32 with fla's TF32 dots) against the chunked path in float64; keys
    near -7 (elu + 1 about 1e-3, where a bf16 feature map would cancel to 0) included."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the float64 side is exact anyway
    generator = torch.Generator("cuda").manual_seed(n)
    q, k, v, grad = (torch.randn(2, 4, n, 64, device="cuda", generator=generator) for _ in range(4))
    q, k = 0.5 * q, key_shift + 0.5 * k
    fast_inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fla_causal_linear_attention(*fast_inputs, eps=1e-6)
    out.backward(grad.to(dtype))
    exact_inputs = [x.detach().to(dtype).double().requires_grad_() for x in (q, k, v)]  # the same rounded inputs
    expected = linear_attention(*exact_inputs, causal=True, chunk_size=64, eps=1e-6)
    expected.backward(grad.to(dtype).double())
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected) < tolerance
    for fast, exact in zip(fast_inputs, exact_inputs):
        assert relative_error(fast.grad, exact.grad) < tolerance


@needs_fla
def test_fla_operators_pass_opcheck():
    from fma.linear.fla import causal_numerator

    generator = torch.Generator("cuda").manual_seed(0)
    phi_q, phi_k, v = (torch.rand(1, 200, 2, 64, device="cuda", generator=generator, dtype=torch.bfloat16)
                       .requires_grad_() for _ in range(3))
    torch.library.opcheck(causal_numerator, (phi_q, phi_k, v))


@needs_fla
def test_gpu_layer_on_fla_matches_torch():
    """backend fla on CUDA in bf16 (with padding), close to the torch backend in float32."""
    torch.manual_seed(0)
    layer = build_attention("linear", dim=256, num_heads=4, causal=True, backend="fla").cuda()
    reference = build_attention("linear", dim=256, num_heads=4, causal=True, backend="torch").cuda()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3000, 256, device="cuda")
    mask = torch.zeros(2, 3000, dtype=torch.bool, device="cuda")
    mask[1, 2500:] = True
    with torch.no_grad():
        expected = reference(x, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, mask)
    assert out.dtype == torch.bfloat16
    assert relative_error(out[0], expected[0]) < 2e-2
    assert relative_error(out[1, :2500], expected[1, :2500]) < 2e-2
