"""Nyströmformer's landmark path (fma/nystromformer/landmark.py) against its formula with
torch.linalg.pinv (fma/nystromformer/naive.py); the iterative pseudo-inverse; padding; bf16; the layer.

The path uses the paper's iterative pseudo-inverse, the reference the exact one: with enough steps
(30 here) the two agree to 1e-9 relative, in outputs and gradients (float64). The paper's 6 steps
are not enough for random inputs, whose landmark kernel A is nearly uniform (condition numbers 50 to 1e4 here).
"""

import pytest
import torch

from attention_testing import padding, random_qkv, relative_error
from fma import ConfigurationError
from fma.nystromformer import NystromAttention  # registers "nystromformer"
from fma.nystromformer.landmark import iterative_pinv, nystrom_attention
from fma.nystromformer.naive import nystrom_attention_reference
from fma.registry import build_attention

CONVERGED = 30  # pseudo-inverse steps after which the iteration has reached torch.linalg.pinv in float64
TOLERANCE = 1e-9


def conv_weight(heads: int = 2, width: int = 5) -> torch.Tensor:
    return torch.randn(heads, width, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def assert_outputs_and_gradients_within(fast, reference, inputs, tolerance):
    """Relative errors of outputs and of the gradients of a random projection below `tolerance`."""
    out, expected = fast(*inputs), reference(*inputs)
    assert relative_error(out, expected) < tolerance
    direction = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * direction).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * direction).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < tolerance


@pytest.mark.parametrize("n, num_landmarks", [(24, 6), (23, 6), (40, 8), (5, 8)])
@pytest.mark.parametrize("conv", [False, True])
def test_landmark_matches_reference(n, num_landmarks, conv):
    """Segments of n / m, lengths not divisible by m (segments of floor or ceil n / m), fewer positions
    than landmarks; with and without the value convolution."""
    weight = conv_weight() if conv else None
    assert_outputs_and_gradients_within(
        lambda q, k, v: nystrom_attention(q, k, v, num_landmarks=num_landmarks, pinv_iterations=CONVERGED,
                                          conv_weight=weight),
        lambda q, k, v: nystrom_attention_reference(q, k, v, num_landmarks=num_landmarks, conv_weight=weight),
        random_qkv(n), TOLERANCE,
    )


def test_one_landmark_per_position_is_softmax_attention():
    """m = n: every kernel is the softmax attention matrix S, and S pinv(S) S = S."""
    q, k, v = random_qkv(23)
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    assert relative_error(nystrom_attention_reference(q, k, v, num_landmarks=23), exact) < TOLERANCE
    assert relative_error(nystrom_attention(q, k, v, num_landmarks=23, pinv_iterations=CONVERGED), exact) < TOLERANCE


def test_iterative_pinv_converges_to_pinv():
    """A well-conditioned softmax matrix (diagonally dominant): the paper's 6 steps reach torch.linalg.pinv,
    each step at least squaring the error (the iteration is third order). An ill-conditioned one (random
    logits, condition in the hundreds) needs more steps, and gets there."""
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.eye(16, dtype=torch.float64) + 0.5 * torch.randn(3, 16, 16, dtype=torch.float64,
                                                                      generator=generator)
    a = torch.softmax(logits, dim=-1)
    errors = [relative_error(iterative_pinv(a, steps), torch.linalg.pinv(a)) for steps in range(1, 7)]
    assert errors[-1] < 1e-12
    assert all(later < max(earlier ** 2, 1e-13) for earlier, later in zip(errors, errors[1:]))
    ill = torch.softmax(torch.randn(16, 16, dtype=torch.float64, generator=generator), dim=-1)
    assert torch.linalg.cond(ill) > 50
    assert relative_error(iterative_pinv(ill, 6), torch.linalg.pinv(ill)) > 0.1
    assert relative_error(iterative_pinv(ill, CONVERGED), torch.linalg.pinv(ill)) < 1e-12


@pytest.mark.parametrize("pinv_iterations", [6, CONVERGED])
def test_empty_landmarks_drop_out(pinv_iterations):
    """8 landmarks on 5 positions (3 empty) give what 5 landmarks give, at the paper's 6 steps too: the
    empty ones add nothing to the kernels nor to the iteration."""
    q, k, v = random_qkv(5)
    out = nystrom_attention(q, k, v, num_landmarks=8, pinv_iterations=pinv_iterations)
    assert relative_error(out, nystrom_attention(q, k, v, num_landmarks=5, pinv_iterations=pinv_iterations)) < 1e-12


@pytest.mark.parametrize("n", [24, 37])
def test_trailing_padding_changes_nothing(n):
    """Real positions of a padded sequence get the output of the unpadded prefix (landmarks of real
    positions only, no weight on padded keys, the convolution sees zeros there); padded outputs are finite."""
    real = 19
    q, k, v = random_qkv(n)
    with torch.no_grad():
        v[:, :, real:] = 1e3  # garbage in the padded values: it must not reach a real output
    options = dict(num_landmarks=4, pinv_iterations=CONVERGED, conv_weight=conv_weight())
    out = nystrom_attention(q, k, v, padding_mask=padding(2, n, real), **options)
    prefix = nystrom_attention(*(x[:, :, :real] for x in (q, k, v)), **options)
    assert relative_error(out[:, :, :real], prefix) < TOLERANCE
    assert relative_error(prefix, nystrom_attention_reference(*(x[:, :, :real] for x in (q, k, v)), num_landmarks=4,
                                                              conv_weight=conv_weight())) < TOLERANCE
    assert torch.isfinite(out).all()


def test_scattered_padding_is_removed_positions():
    """Pads anywhere (no convolution): real positions get the output of the sequence without the pads;
    a row padded throughout stays finite."""
    q, k, v = random_qkv(30)
    padding_mask = torch.rand(2, 30, generator=torch.Generator().manual_seed(2)) < 0.3
    padding_mask[1] = True
    out = nystrom_attention(q, k, v, num_landmarks=5, pinv_iterations=CONVERGED, padding_mask=padding_mask)
    kept = ~padding_mask[0]
    expected = nystrom_attention_reference(*(x[:1, :, kept] for x in (q, k, v)), num_landmarks=5)
    assert relative_error(out[:1, :, kept], expected) < TOLERANCE
    assert torch.isfinite(out).all()


def test_bf16_matches_fp32():
    """bf16 inputs give a finite bf16 output close to the fp32 result. With 12 steps the iteration
    inverts most of A: a bf16 iteration would be up to 0.1 off (outputs up to 4), the fp32 one is 0.01 off."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 256, 16, generator=generator).bfloat16() for _ in range(3))
    weight = torch.randn(2, 33, generator=generator) / 33 ** 0.5
    options = dict(num_landmarks=16, pinv_iterations=12, conv_weight=weight)
    out = nystrom_attention(q, k, v, **options)
    expected = nystrom_attention(q.float(), k.float(), v.float(), **options)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_autocast_leaves_fp32():
    """Under bf16 autocast the landmark path still computes in fp32: the same result as without."""
    q, k, v = (x.float().detach() for x in random_qkv(64))
    options = dict(num_landmarks=8, pinv_iterations=6, conv_weight=conv_weight().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nystrom_attention(q, k, v, **options)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nystrom_attention(q, k, v, **options))


def test_each_matrix_scales_its_own_iteration():
    """Z0's scale comes from each [batch, head] matrix (the official code takes one maximum over the
    whole batch): a sample's output with the paper's 6 steps does not depend on its batch."""
    q, k, v = random_qkv(32, batch=3)
    with torch.no_grad():
        k[1:] *= 3  # sharper kernels, larger column sums in the rest of the batch
    options = dict(num_landmarks=8, pinv_iterations=6)
    alone = nystrom_attention(q[:1], k[:1], v[:1], **options)
    assert relative_error(nystrom_attention(q, k, v, **options)[:1], alone) < 1e-12


def test_causal_is_refused():
    assert not NystromAttention.has_causal_form
    with pytest.raises(ConfigurationError, match="objective=mlm"):
        build_attention("nystromformer", dim=16, num_heads=2, causal=True)


@pytest.mark.parametrize("setting, value", [("num_landmarks", 0), ("pinv_iterations", 0),
                                            ("conv_kernel_size", -1), ("conv_kernel_size", 4)])
def test_bad_settings_are_refused(setting, value):
    with pytest.raises(ConfigurationError, match=f"set model.attention.{setting}="):
        build_attention("nystromformer", dim=16, num_heads=2, causal=False, **{setting: value})


@pytest.mark.parametrize("conv_kernel_size", [7, 0, None])
def test_layer_matches_reference(conv_kernel_size):
    """The registered layer: forward equals the reference on its own projections and convolution kernel;
    backward reaches every parameter."""
    torch.manual_seed(0)
    layer = build_attention("nystromformer", dim=16, num_heads=2, causal=False, num_landmarks=4,
                            pinv_iterations=CONVERGED, conv_kernel_size=conv_kernel_size).double()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    out = layer(x)
    attended = nystrom_attention_reference(*layer.project(x), num_landmarks=4, conv_weight=layer.conv_weight)
    assert relative_error(out, layer.proj(attended.transpose(1, 2).reshape(2, 21, 16))) < TOLERANCE
    assert isinstance(layer, NystromAttention) and (layer.conv_weight is None) == (not conv_kernel_size)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in layer.parameters())
