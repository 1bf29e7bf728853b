"""Reformer's FlexAttention path (fma/reformer/flex.py) against its block-wise path
(fma/reformer/blockwise.py, CPU-tested against plain loops over the key sets) in float64, and its
causal guarantee; on the GPU (skipped without CUDA), in bf16 and fp32 against float64.

On the CPU FlexAttention runs forward only (no backward there; compiled, no log-sum-exp), so the
CPU tests run it eagerly for outputs, and run the same score_mod, block mask and round merge
through `dense_flex_attention` (FlexAttention's definition on dense n x n scores) for gradients.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxOutput, create_block_mask, flex_attention

from attention_testing import assert_same_outputs_and_gradients, make_layer, relative_error
from conftest import assert_prefix_unchanged
from fma import ConfigurationError, build_attention
from fma.reformer.blockwise import lsh_attention
from fma.reformer.flex import BLOCK, flex_lsh_attention, sorted_codes, window_block_mask

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dense_flex_attention(q, k, v, *, score_mod, block_mask, return_aux):
    """FlexAttention as its definition, differentiable on any device: score_mod on every pair,
    pairs outside the block mask's blocks hidden (the reformer mask has only full blocks)."""
    assert return_aux.lse and int(block_mask.kv_num_blocks.sum()) == 0
    batch, heads, n, head_dim = q.shape
    scores = score_mod(q @ k.transpose(-1, -2) * head_dim**-0.5, torch.arange(batch)[:, None, None, None],
                       torch.arange(heads)[None, :, None, None], torch.arange(n)[:, None], torch.arange(n)[None, :])
    in_blocks = block_mask.to_dense().repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1).bool()
    scores = scores.masked_fill(~in_blocks, -float("inf"))
    return torch.softmax(scores, -1) @ v, AuxOutput(lse=scores.logsumexp(-1))


def inputs(n: int, n_buckets: int, rounds: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    buckets = torch.randint(n_buckets, (2, 2, rounds, n), generator=generator)
    buckets[0, 0, 0, n // 2:] = n_buckets  # one round where the second half is padding's bucket
    return [q.requires_grad_(), F.normalize(q.detach(), dim=-1).requires_grad_(), v.requires_grad_()], buckets


@pytest.mark.parametrize("n, window", [(300, 16), (128, 200)])
def test_sorted_codes_operator(n, window):
    """The codes are an operator (a fixed buffer under torch.compile): torch.library's checks of schema,
    fake tensors and dispatch, and its outputs by hand: order sorts the buckets (ties by position), rank
    inverts it, and a token's code in its own round is its place plus (window + 1) per bucket change
    before it; padded places hold codes below every real one by more than window."""
    buckets = inputs(n, 4, 2)[1]
    torch.library.opcheck(sorted_codes, (buckets, window))
    order, rank, their_code = sorted_codes(buckets, window)
    position = torch.arange(n)
    sorted_buckets = buckets.take_along_dim(order, -1)
    assert (sorted_buckets.diff(dim=-1) >= 0).all()
    assert (order.diff(dim=-1)[sorted_buckets.diff(dim=-1) == 0] > 0).all()  # ties by position
    assert torch.equal(rank.take_along_dim(order, -1), position.expand_as(order))
    own = their_code.unflatten(1, (2, 2)).diagonal(dim1=2, dim2=3).movedim(-1, 2)[..., :n]  # [b, h, R, n] by place
    changes = F.pad((sorted_buckets.diff(dim=-1) != 0).cumsum(-1), (1, 0))
    assert torch.equal(own.long(), position + changes * (window + 1))
    padded = their_code[..., n:]
    assert padded.shape[-1] == -(-n // BLOCK) * BLOCK - n
    if padded.numel():
        assert (padded.long().amax() + window < their_code[..., :n].long().amin())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n, window", [(300, 1), (300, 129), (700, 200), (64, 500)])
def test_block_mask_keeps_every_block_within_the_window(n, window, causal):
    """The key blocks kept per query block are those create_block_mask finds for "fewer than w
    places before (or after) the query", evaluating every pair; all marked full."""
    padded = -(-n // BLOCK) * BLOCK
    window = min(window, n)

    def near(batch, head, query, key):
        offset = query - key
        return (offset >= 0) & (offset < window) if causal else (offset < window) & (offset > -window)

    mask = window_block_mask(padded, window, causal, torch.device("cpu"))
    expected = create_block_mask(near, None, None, padded, padded, device="cpu", _compile=False)
    assert torch.equal(mask.to_dense(), expected.to_dense())
    assert int(mask.kv_num_blocks.sum()) == 0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n, n_buckets, window, rounds", [(29, 4, 5, 3), (300, 4, 40, 2), (17, 8, 30, 2),
                                                          (300, 2, 150, 2)])
def test_flex_path_matches_blockwise_outputs_and_gradients(causal, n, n_buckets, window, rounds):
    """The score_mod, block mask, padding to whole blocks and log-sum-exp merge of rounds, on
    FlexAttention's dense definition: the block-wise path's outputs and gradients (1e-10, float64)."""
    qkv, buckets = inputs(n, n_buckets, rounds)
    assert_same_outputs_and_gradients(
        lambda q, k, v: flex_lsh_attention(q, k, v, buckets, window=window, causal=causal,
                                           attention=dense_flex_attention),
        lambda q, k, v: lsh_attention(q, k, v, buckets, window=window, causal=causal),
        qkv,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flex_attention_itself_matches_blockwise(causal):
    """Eager FlexAttention (CPU, float64, forward) over the same mask: n = 300 pads to three blocks."""
    (q, k, v), buckets = inputs(300, 4, 3, seed=1)
    with torch.no_grad():
        out = flex_lsh_attention(q, k, v, buckets, window=40, causal=causal, attention=flex_attention)
        expected = lsh_attention(q, k, v, buckets, window=40, causal=causal)
    assert relative_error(out, expected) < 1e-12


def test_flex_path_is_causal_and_prefix_invariant():
    """As tests/test_baselines.py holds the layer to: output t has exactly zero gradient with respect
    to inputs after t (dense definition), and changing them leaves outputs up to t unchanged
    (FlexAttention itself) to rounding."""
    layer = make_layer("reformer", causal=True, n_hashes=3, n_buckets=4, chunk_size=4)
    n, t = 40, 23
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, n, 16, dtype=torch.float64, generator=generator, requires_grad=True)

    def attend(x, attention):
        q, k, v = layer.project(x)
        out = flex_lsh_attention(q, k, v, layer.buckets(k), window=4, causal=True, attention=attention)
        return out.transpose(1, 2).flatten(2)  # [batch, n, dim]

    attend(x, dense_flex_attention)[:, t].sum().backward()
    assert torch.all(x.grad[:, t + 1:] == 0)
    assert x.grad[:, : t + 1].abs().sum() > 0
    changed = x.detach().clone()
    changed[:, t + 1:] = torch.randn(3, n - t - 1, 16, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        out, out_changed = attend(x.detach(), flex_attention), attend(changed, flex_attention)
    assert_prefix_unchanged("reformer", out[:, : t + 1], out_changed[:, : t + 1])
    assert not torch.allclose(out[:, t + 1:], out_changed[:, t + 1:])


def test_backend_option():
    with pytest.raises(ConfigurationError, match="model.attention.backend="):
        build_attention("reformer", dim=16, num_heads=2, causal=True, backend="triton")
    layer = make_layer("reformer", causal=True, n_hashes=2, n_buckets=4, chunk_size=4, backend="flex")
    with pytest.raises(ConfigurationError, match="model.attention.backend="):
        layer(torch.randn(1, 8, 16, dtype=torch.float64))
    auto = make_layer("reformer", causal=True, n_hashes=2, n_buckets=4, chunk_size=4)  # the torch path on the CPU
    torch_path = make_layer("reformer", causal=True, n_hashes=2, n_buckets=4, chunk_size=4, backend="torch")
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    assert torch.equal(auto(x), torch_path(x))


# GPU (skipped without CUDA) ------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype, tolerance, n, n_buckets, window", [
    (torch.float32, 1e-4, 2000, 16, 64), (torch.float32, 1e-4, 3000, 8, 200),
    (torch.bfloat16, 1e-2, 2000, 16, 64), (torch.bfloat16, 1e-2, 3000, 8, 200), (torch.bfloat16, 1e-2, 8192, 32, 64),
])
def test_reformer_flex_on_the_gpu_matches_float64(monkeypatch, causal, dtype, tolerance, n, n_buckets, window):
    """The layer's path (FlexAttention compiled on its own) in low precision against the block-wise
    path in float64: outputs and gradients."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # restored after the test
    generator = torch.Generator("cuda").manual_seed(n + window)
    q, v, grad = (torch.randn(2, 4, n, 64, device="cuda", generator=generator) for _ in range(3))
    buckets = torch.randint(n_buckets, (2, 4, 4, n), device="cuda", generator=generator)
    qkv = (q, F.normalize(q, dim=-1), v)
    fast_inputs = [x.detach().to(dtype).requires_grad_() for x in qkv]
    out = flex_lsh_attention(*fast_inputs, buckets, window=window, causal=causal)
    out.backward(grad.to(dtype))
    exact_inputs = [x.detach().double().requires_grad_() for x in qkv]
    expected = lsh_attention(*exact_inputs, buckets, window=window, causal=causal)
    expected.backward(grad.double())
    assert out.dtype == dtype
    assert relative_error(out, expected) < tolerance
    for fast, exact in zip(fast_inputs, exact_inputs):
        assert relative_error(fast.grad, exact.grad) < tolerance


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_layer_auto_takes_flex_and_matches_torch(causal):
    """backend auto on CUDA runs FlexAttention; the layer with padding equals its torch backend."""
    torch.manual_seed(0)
    layer = build_attention("reformer", dim=256, num_heads=4, causal=causal).cuda().eval()
    reference = build_attention("reformer", dim=256, num_heads=4, causal=causal, backend="torch").cuda().eval()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 1500, 256, device="cuda")
    mask = torch.zeros(2, 1500, dtype=torch.bool, device="cuda")
    mask[1, 1200:] = True
    with torch.no_grad():
        out, expected = layer(x, mask), reference(x, mask)
    assert relative_error(out[0], expected[0]) < 1e-4
    assert relative_error(out[1, :1200], expected[1, :1200]) < 1e-4


@needs_cuda
def test_gpu_reformer_flex_memory_stays_linear():
    """Many lengths in one process, then 64K: O(n * rounds * w) memory, never an n x n path."""
    heads, dim, rounds = 4, 64, 4
    for n in [1000 + 97 * i for i in range(9)]:
        q = torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16)
        flex_lsh_attention(q, q, q, torch.randint(32, (1, heads, rounds, n), device="cuda"), window=64, causal=True)
    n = 65536
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    buckets = torch.randint(32, (1, heads, rounds, n), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flex_lsh_attention(q, k, v, buckets, window=64, causal=True).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # 8.6 GB; one head's n x n float32 scores alone would be 17 GB
    assert extra < 32 * rounds * n * heads * dim * 2, f"{extra / 2**30:.2f} GiB for one 64K layer: an n x n path"
