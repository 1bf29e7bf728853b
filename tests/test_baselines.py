"""The baseline kinds (local, linear, reformer, htransformer) against exact formulas and plain references.

Whole-model causality, padding and tiny-overfit tests for every kind live in tests/test_models.py.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_prefix_unchanged, compose_config
from fma import ATTENTION_KINDS, ConfigurationError, build_attention
from fma.htransformer import coverage, hierarchical_attention, hierarchical_attention_reference, num_levels
from fma.linear import linear_attention, linear_attention_reference
from fma.reformer import lsh_attention, lsh_attention_reference

BASELINES = ["htransformer", "linear", "local", "reformer"]
# Options that give each kind several blocks, chunks, buckets or levels at length 40.
SMALL_OPTIONS = {
    "htransformer": {"block_size": 4},
    "linear": {"chunk_size": 4},
    "local": {"window": 5},
    "reformer": {"n_hashes": 3, "n_buckets": 4, "chunk_size": 4},
}


def make_layer(kind: str, causal: bool, **options):
    """A float64 layer in eval mode (Reformer: the fixed rotations), with seeded weights."""
    torch.manual_seed(0)
    return build_attention(kind, dim=16, num_heads=2, causal=causal, **options).double().eval()


def random_qkv(n: int, batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, dtype=torch.float64, generator=generator).requires_grad_()
            for _ in range(3)]


def assert_same_outputs_and_gradients(fast, reference, inputs):
    """fast(*inputs) equals reference(*inputs) in float64, and so do the gradients of a random projection."""
    out, expected = fast(*inputs), reference(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    direction = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * direction).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * direction).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def padding(batch: int, n: int, real: int) -> torch.Tensor:
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask[:, real:] = True
    return mask


# Causality -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BASELINES)
def test_layer_is_causal_and_prefix_invariant(kind):
    """Output t has exactly zero gradient with respect to inputs after t, and changing the inputs after
    t leaves outputs up to t unchanged (bitwise; Reformer to rounding, see assert_prefix_unchanged)."""
    layer = make_layer(kind, causal=True, **SMALL_OPTIONS[kind])
    n, t = 40, 23
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, n, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    layer(x)[:, t].sum().backward()
    assert torch.all(x.grad[:, t + 1:] == 0)
    assert x.grad[:, : t + 1].abs().sum() > 0

    changed = x.detach().clone()
    changed[:, t + 1:] = torch.randn(3, n - t - 1, 16, dtype=torch.float64, generator=generator)
    out, out_changed = layer(x.detach()), layer(changed)
    assert_prefix_unchanged(kind, out[:, : t + 1], out_changed[:, : t + 1])
    assert not torch.allclose(out[:, t + 1:], out_changed[:, t + 1:])


def test_reformer_prefix_test_moves_the_sort():
    """The prefix test above bites for Reformer: the change after t moves tokens <= t in the sorted
    order, which is what breaks prefix invariance of chunking the sort."""
    layer = make_layer("reformer", causal=True, **SMALL_OPTIONS["reformer"])
    n, t = 40, 23
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, n, 16, dtype=torch.float64, generator=generator)
    changed = x.clone()
    changed[:, t + 1:] = torch.randn(3, n - t - 1, 16, dtype=torch.float64, generator=generator)

    def sorted_places(inputs):
        buckets = layer.buckets(layer.project(inputs)[1])
        return (buckets * n + torch.arange(n)).argsort(-1).argsort(-1)

    assert not torch.equal(sorted_places(x)[..., : t + 1], sorted_places(changed)[..., : t + 1])


# Local -----------------------------------------------------------------------------------------


def copy_projections(target, source):
    target.load_state_dict(source.state_dict())
    return target


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind, options", [("local", {"window": 23}), ("local", {"window": 64}),
                                           ("htransformer", {"block_size": 12}), ("htransformer", {"block_size": 24})])
def test_short_sequences_are_full_attention(causal, kind, options):
    """n = 23 within one window (local), or within two blocks (H-Transformer-1D: no coarse level):
    every key is seen exactly, padded keys hidden."""
    if kind == "htransformer":
        assert num_levels(23, options["block_size"]) == 0
    layer = make_layer(kind, causal, **options)
    full = copy_projections(make_layer("full", causal), layer)
    x = torch.randn(2, 23, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = padding(2, 23, real=19)
    torch.testing.assert_close(layer(x), full(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x, mask)[:, :19], full(x, mask)[:, :19], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 5, 8])
def test_local_matches_banded_softmax(causal, window):
    """The block-wise path equals softmax over an explicit n x n band mask (lengths not divisible by window)."""
    n = 23
    q, k, v = random_qkv(n)
    mask = padding(2, n, real=20)
    offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    band = (offset >= 0) & (offset < window) if causal else offset.abs() < window
    visible = band & (~mask[:, None, None, :] | (offset == 0))

    def banded_softmax(q, k, v):
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, float("-inf"))
        return torch.softmax(scores, -1) @ v

    layer = make_layer("local", causal, window=window)
    assert_same_outputs_and_gradients(lambda q, k, v: layer.attend(q, k, v, mask), banded_softmax, [q, k, v])


# Linear ----------------------------------------------------------------------------------------


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


# Reformer --------------------------------------------------------------------------------------


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


def test_reformer_rotations_fresh_in_training_fixed_in_eval():
    x = torch.randn(2, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    layer = make_layer("reformer", True, **SMALL_OPTIONS["reformer"])
    evaluated = layer(x)
    assert torch.equal(evaluated, layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    fixed = make_layer("reformer", True, **SMALL_OPTIONS["reformer"], fresh_rotations=False).train()
    assert torch.equal(fixed(x), evaluated)


# H-Transformer-1D ------------------------------------------------------------------------------


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


# Configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BASELINES)
def test_model_config_builds_kind_with_its_defaults(kind, tmp_path):
    """configs/model/<kind>.yaml selects the kind and writes out exactly the constructor's options and defaults."""
    config = compose_config(tmp_path, [f"model={kind}"])
    options = dict(config.model.attention)
    assert options.pop("name") == kind
    signature = inspect.signature(ATTENTION_KINDS[kind].__init__).parameters
    defaults = {name: p.default for name, p in signature.items() if name not in ("self", "dim", "num_heads", "causal")}
    assert options == defaults
    layer = build_attention(kind, dim=config.model.dim, num_heads=config.model.num_heads, causal=True, **options)
    x = torch.randn(1, 50, config.model.dim)
    assert layer(x).shape == x.shape


@pytest.mark.parametrize("kind, options, key", [
    ("local", {"window": 0}, "window"),
    ("linear", {"chunk_size": 0}, "chunk_size"),
    ("linear", {"eps": -1.0}, "eps"),
    ("reformer", {"n_buckets": 3}, "n_buckets"),
    ("reformer", {"n_hashes": 0}, "n_hashes"),
    ("reformer", {"chunk_size": 0}, "chunk_size"),
    ("htransformer", {"block_size": 5}, "block_size"),
])
def test_bad_options_name_their_key(kind, options, key):
    with pytest.raises(ConfigurationError, match=f"model.attention.{key}="):
        build_attention(kind, dim=16, num_heads=2, causal=True, **options)


@pytest.mark.parametrize("kind", BASELINES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_are_finite_and_close_to_fp32(kind, dtype):
    """bf16 and fp16 run without overflow (Reformer's -1e5 self logit is out of fp16's range unless
    scores are upcast). Reformer uses one bucket here: near-ties in the hash flip between precisions."""
    options = {**SMALL_OPTIONS[kind], "n_buckets": 1} if kind == "reformer" else SMALL_OPTIONS[kind]
    torch.manual_seed(0)
    layer = build_attention(kind, dim=16, num_heads=2, causal=True, **options).eval()
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(8))
    expected = layer(x)
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
