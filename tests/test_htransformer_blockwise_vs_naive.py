"""H-Transformer-1D's block-wise path (fma/htransformer/blockwise.py) against the per-query loop over
explicit coverage lists (fma/htransformer/naive.py), and against exact attention where averaging is exact;
its causal layer, which runs FMA's path with an averaging basis, against the block-wise path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attention_testing import assert_same_outputs_and_gradients, padding, random_qkv, relative_error
from fma import build_attention
from fma.kernels import TRITON_INSTALLED
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


@pytest.mark.parametrize("n, block_size, real", [(37, 4, 37), (29, 2, 24), (40, 6, 33), (100, 8, 91), (256, 16, 256),
                                                 (9, 4, 9), (16, 8, 12)])
def test_causal_htransformer_is_fma_with_an_averaging_basis(n, block_size, real):
    """The causal layer (FMA's path: m = Nr, p = Nr/2 means of 2^l tokens, count-weighted) equals the
    block-wise H-Transformer-1D on the same projections, outputs and input gradients, padding included;
    short sequences (no coarse level) too."""
    torch.manual_seed(0)
    layer = build_attention("htransformer", dim=16, num_heads=2, causal=True, block_size=block_size).double()
    mask = padding(2, n, real)

    def blockwise(x):
        q, k, v = layer.project(x)
        out = hierarchical_attention(q, k, v, block_size=block_size, causal=True, padding_mask=mask)
        return layer.proj(out.transpose(1, 2).reshape(x.shape))

    x = torch.randn(2, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out, expected = layer(x, mask), blockwise(x)
    torch.testing.assert_close(out[:, :real], expected[:, :real], rtol=1e-10, atol=1e-10)
    direction = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    direction[:, real:] = 0
    grad, = torch.autograd.grad((out * direction).sum(), x)
    expected_grad, = torch.autograd.grad((expected * direction).sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("n, real", [(1000, 950), (16384, 16300)])
def test_gpu_causal_htransformer_runs_fma_kernels_like_the_float64_blockwise_path(monkeypatch, dtype, tolerance, n, real):
    """On CUDA the causal layer takes FMA's fused kernels (block_size 16: p = 8) and matches the float64
    block-wise path, outputs and input gradients (fp32 without TF32). At 16K its 9 levels x 8 summaries
    make the downsampling kernels' default tiles too large for shared memory: they must shrink to fit."""
    import fma.multipole.layer as multipole_layer

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    calls, supports = [], multipole_layer.triton_supports
    monkeypatch.setattr(multipole_layer, "triton_supports", lambda q, m: calls.append(supports(q, m)) or calls[-1])
    torch.manual_seed(0)
    layer = build_attention("htransformer", dim=128, num_heads=2, causal=True, block_size=16).cuda()
    x = torch.randn(2, n, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    mask = padding(2, n, real).cuda()

    def run(module, inputs, blockwise):
        inputs = inputs.detach().requires_grad_()
        if blockwise:
            q, k, v = module.project(inputs)
            out = hierarchical_attention(q, k, v, block_size=16, causal=True, padding_mask=mask)
            out = module.proj(out.transpose(1, 2).reshape(inputs.shape))
        else:
            out = module(inputs, mask)
        out = out[:, :real]
        return out, torch.autograd.grad(out.float().square().sum(), inputs)[0]

    got = run(layer.to(dtype), x.to(dtype), blockwise=False)
    assert calls and all(calls)   # the fused kernels ran
    expected = run(layer.double(), x.double(), blockwise=True)
    for a, e in zip(got, expected):
        assert relative_error(a, e) <= tolerance


def interpreted_kernel_errors() -> dict:
    """Relative errors, in float32, of the causal layer's route on FMA's Triton kernels (backend triton,
    run by the interpreter on the CPU) against the block-wise path: outputs and input gradients, at a
    valid length and at one the layer pads (with padded keys)."""
    from fma.multipole.layer import summarised_attention

    errors = {}
    for n, real in [(128, 128), (100, 90)]:
        torch.manual_seed(n)
        layer = build_attention("htransformer", dim=32, num_heads=2, causal=True, block_size=16)
        x = torch.randn(2, n, 32, requires_grad=True)
        mask = padding(2, n, real)
        q, k, v = layer.project(x)
        out = summarised_attention(q, k, v, mask, key_downsample=layer.average, value_downsample=layer.average,
                                   block_size=16, causal=True, scale_coarse=True, backend="triton")[:, :, :real]
        expected = hierarchical_attention(q, k, v, block_size=16, causal=True, padding_mask=mask)[:, :, :real]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grad = torch.autograd.grad(out, x, grad_out, retain_graph=True)[0]
        expected_grad = torch.autograd.grad(expected, x, grad_out)[0]
        errors[f"n={n} out"] = relative_error(out, expected)
        errors[f"n={n} dx"] = relative_error(grad, expected_grad)
    return errors


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_fma_kernels_run_causal_htransformer_under_the_interpreter():
    """FMA's fused attention and avgpool kernels with H-Transformer-1D's shape (m = 16, p = 8), NaN-poisoned
    outputs, match the block-wise path (a subprocess: TRITON_INTERPRET must be set before triton loads)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "FMA_TRITON_POISON": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--interpreter"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    assert all(error <= 1e-5 for error in errors.values()), errors


if __name__ == "__main__" and sys.argv[1:] == ["--interpreter"]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(interpreted_kernel_errors()))
