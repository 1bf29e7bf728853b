"""FMA's O(n) variant, downsampled queries (fma/multipole/coarse_queries.py, through the layer), against
its reference (fma/multipole/naive.py, downsample_queries=True, query by query) and exact attention:
outputs and gradients, identities, padding, the O(n) work and memory as counts, the refused causal
form (and why it must be refused) and the refused triton backend."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fma.multipole.blocklocal as blocklocal
import fma.multipole.coarse_queries as coarse_queries
from attention_testing import relative_error
from fma import ConfigurationError, FastMultipoleAttention, build_attention
from fma.full.naive import softmax_attention
from fma.indexing import padded_length
from fma.multipole.naive import reference_multipole_attention

BLOCK, RANK, HEAD_DIM = 4, 2, 8


def randn(generator, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def make_layer(kind, *, seed=None, block_size=BLOCK, rank=RANK, max_seq_len=128, downsample_queries=True):
    """A bidirectional float64 layer; seed: random downsampling weights (not the averaging start)."""
    layer = FastMultipoleAttention(dim=2 * HEAD_DIM, num_heads=2, causal=False, block_size=block_size, rank=rank,
                                   downsample=kind, max_seq_len=max_seq_len,
                                   downsample_queries=downsample_queries).double()
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.copy_(0.3 * randn(generator, *parameter.shape))
    return layer


def reference(layer, q, k, v, padding_mask=None, causal=False):
    return reference_multipole_attention(q, k, v, layer.key_downsample, layer.value_downsample,
                                         block_size=layer.block_size, causal=causal, scale_coarse=layer.scale_coarse,
                                         padding_mask=padding_mask, downsample_queries=True)


def interior_padding(generator, batch, n):
    """[batch, n] bool: about a quarter of the positions and the last eighth padded, never position 0."""
    mask = torch.rand(batch, n, generator=generator) < 0.25
    mask[:, -n // 8:] = True
    mask[:, 0] = False
    return mask


def real_rows(x, padding_mask):
    """x [batch, heads, n, d] -> the rows of real positions, [real, heads, d]."""
    return x.transpose(1, 2) if padding_mask is None else x.transpose(1, 2)[~padding_mask]


# Fast path against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["groupedconv", "avgpool", "multilevel"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n, with_padding_mask", [(45, False), (64, False), (128, True)])
def test_fast_path_matches_reference_outputs_and_gradients(kind, dtype, tolerance, n, with_padding_mask):
    generator = torch.Generator().manual_seed(n)
    q, k, v, grad_out = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(4))
    padding_mask = interior_padding(generator, 2, n) if with_padding_mask else None
    if padding_mask is not None:  # pads' rows of the output are unspecified: no gradient flows from them
        grad_out = grad_out.masked_fill(padding_mask[:, None, :, None], 0)
    layer = make_layer(kind, seed=n + 1, max_seq_len=n)
    fast_layer = copy.deepcopy(layer).to(dtype)

    def outputs_and_gradients(model, attention, inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        out = attention(model, *inputs, padding_mask)
        wrt = inputs + list(model.key_downsample.parameters()) + list(model.value_downsample.parameters())
        grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype), materialize_grads=True)
        return [real_rows(out, padding_mask)] + list(grads)

    fast = outputs_and_gradients(fast_layer, FastMultipoleAttention.attend, [x.to(dtype) for x in (q, k, v)])
    expected = outputs_and_gradients(layer, reference, [q, k, v])
    names = ["output", "dq", "dk", "dv"] + [f"d {name}" for name, _ in layer.named_parameters() if "downsample" in name]
    assert len(fast) == len(expected) == len(names) == 4 + (0 if kind == "avgpool" else 4)
    for name, actual, wanted in zip(names, fast, expected):
        assert actual.dtype == dtype
        assert relative_error(actual.double(), wanted) < tolerance, name


@pytest.mark.parametrize("block_size, rank", [(8, 1), (8, 4), (2, 2)])
def test_fast_path_matches_reference_at_other_block_sizes_and_ranks(block_size, rank):
    generator = torch.Generator().manual_seed(block_size + rank)
    n = 16 * block_size
    q, k, v = (randn(generator, 1, 2, n, HEAD_DIM) for _ in range(3))
    layer = make_layer("groupedconv", seed=3, block_size=block_size, rank=rank, max_seq_len=n)
    assert relative_error(layer.attend(q, k, v, None), reference(layer, q, k, v)) < 1e-9


# Identities ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, with_padding_mask", [(64, False), (45, False), (64, True)])
def test_equals_full_attention_when_queries_keys_and_values_are_constant_within_coarsest_cells(n, with_padding_mask):
    """Then every segment's mean query is each of its queries, and avgpool with the scale on
    summarises keys and values exactly: the variant is FMA, which is full attention here."""
    generator = torch.Generator().manual_seed(1)
    coarsest = padded_length(n, BLOCK) // 4
    q, k, v = (randn(generator, 2, 2, 4, HEAD_DIM).repeat_interleave(coarsest, dim=2)[:, :, :n] for _ in range(3))
    padding_mask = interior_padding(generator, 2, n) if with_padding_mask else None
    out = make_layer("avgpool").attend(q, k, v, padding_mask)
    expected = softmax_attention(q, k, v, causal=False, padding_mask=padding_mask)
    assert relative_error(real_rows(out, padding_mask), real_rows(expected, padding_mask)) < 1e-10


@pytest.mark.parametrize("kind", ["groupedconv", "multilevel"])
def test_equals_fma_when_queries_are_constant_within_coarsest_cells_and_differs_otherwise(kind):
    """Any keys, values and learned basis: only the queries are summarised, so with queries constant
    over every coarse cell the variant equals FMA (downsample_queries=false) exactly; with random
    queries it is a different attention."""
    generator = torch.Generator().manual_seed(2)
    n = 128
    fma = make_layer(kind, seed=4, downsample_queries=False)
    variant = make_layer(kind, downsample_queries=True)
    variant.load_state_dict(fma.state_dict())
    k, v = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(2))
    q = randn(generator, 2, 2, 4, HEAD_DIM).repeat_interleave(n // 4, dim=2)
    assert relative_error(variant.attend(q, k, v, None), fma.attend(q, k, v, None)) < 1e-12
    q = randn(generator, 2, 2, n, HEAD_DIM)
    assert relative_error(variant.attend(q, k, v, None), fma.attend(q, k, v, None)) > 1e-3


def test_sequences_of_at_most_two_blocks_get_exact_full_attention():
    """For n <= 2m every real key is in the near field and every coarse cell is padding."""
    generator = torch.Generator().manual_seed(10)
    q, k, v = (randn(generator, 2, 2, 7, HEAD_DIM) for _ in range(3))
    out = make_layer("groupedconv", seed=11).attend(q, k, v, None)
    assert relative_error(out, softmax_attention(q, k, v, causal=False)) < 1e-10


# Padding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["groupedconv", "avgpool", "multilevel"])
def test_padded_positions_change_nothing(kind):
    """Garbage in the pads' queries, keys and values (interior and tail) leaves every real output
    bitwise unchanged, no gradient reaches a pad from a real output, and pads' outputs are finite."""
    generator = torch.Generator().manual_seed(5)
    n = 128
    q, k, v = (randn(generator, 2, 2, n, HEAD_DIM).requires_grad_() for _ in range(3))
    padding_mask = interior_padding(generator, 2, n)
    pads = padding_mask[:, None, :, None]
    garbage = [x.detach().where(~pads, 1e3 * randn(generator, *x.shape)) for x in (q, k, v)]
    layer = make_layer(kind, seed=6)
    out = layer.attend(q, k, v, padding_mask)
    garbage_out = layer.attend(*garbage, padding_mask)
    assert torch.equal(real_rows(garbage_out, padding_mask), real_rows(out, padding_mask))
    assert out.isfinite().all() and garbage_out.isfinite().all()
    grads = torch.autograd.grad(out.masked_fill(pads, 0).sum(), (q, k, v))
    assert all((grad.masked_select(pads) == 0).all() for grad in grads)
    assert all(grad.masked_select(~pads).abs().sum() > 0 for grad in grads)


def test_every_output_depends_on_every_real_position():
    """Bidirectional: the fine blocks and the coarse cells of all levels cover the whole sequence."""
    generator = torch.Generator().manual_seed(7)
    layer = make_layer("groupedconv", seed=8)
    x = randn(generator, 1, 64, 2 * HEAD_DIM).requires_grad_()
    out = layer(x)
    for i in range(0, 64, 7):
        (grad,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        assert (grad[0].abs().sum(-1) > 0).all(), f"output {i} ignores a position"


# O(n): work and memory as counts ------------------------------------------------------------------


def test_score_entries_are_linear_in_the_length(monkeypatch):
    """Scores that reach the softmax, counted at `exp_scores`: n 3m fine plus (n/w_l) p 3p per level,
    below n (3m + 6p^2/m) per batch row and head at every length; FMA's n (3m + 3pL) grows with L."""
    counted = {"variant": 0, "fma": 0}

    def counting(name, exp_scores):
        def wrapper(scores, visible):
            counted[name] += scores.numel()
            return exp_scores(scores, visible)
        return wrapper

    monkeypatch.setattr(coarse_queries, "exp_scores", counting("variant", coarse_queries.exp_scores))
    monkeypatch.setattr(blocklocal, "exp_scores", counting("fma", blocklocal.exp_scores))
    m, p = 8, 2
    # n = 512, m = 8: widths 8, 16, 32, 64, 128 (L = 5); fine 512 * 24 = 12288; coarse 12 * (64 + 32 + 16 + 8 + 4)
    assert coarse_queries.score_entries(512, m, p) == 12288 + 1488
    per_token = {}
    for n in (512, 1024, 2048, 4096):
        q, k, v = (torch.randn(1, 1, n, HEAD_DIM) for _ in range(3))
        for name, downsample_queries in (("variant", True), ("fma", False)):
            counted[name] = 0
            make_layer("avgpool", block_size=m, rank=p, downsample_queries=downsample_queries).float().attend(
                q, k, v, None)
        levels = (n // m).bit_length() - 2
        assert counted["variant"] == coarse_queries.score_entries(n, m, p) < n * (3 * m + 6 * p * p / m)
        assert counted["fma"] == n * (3 * m + 3 * p * levels)
        per_token[n] = counted["variant"] / n
    assert per_token[4096] - per_token[512] < 0.2


class AllocatedElements(TorchDispatchMode):
    """Counts the elements of every tensor an operator returns in fresh memory (views are free)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.elements += sum(t.numel() for t in tree_leaves(out)
                             if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


@pytest.mark.parametrize("kind", ["avgpool", "multilevel"])
def test_memory_per_token_does_not_grow_with_the_length(kind):
    """Everything the forward allocates, per token, from n = 512 to 4096 (8x): within 2% for the
    variant (its per-level terms shrink geometrically), at least 20% more for FMA (3p scores and
    weights per query and level). With an O(n) basis; groupedconv's own downsampling is O(n log n)."""
    per_token = {True: [], False: []}
    for n in (512, 4096):
        q, k, v = (torch.randn(1, 1, n, HEAD_DIM) for _ in range(3))
        for downsample_queries in (True, False):
            layer = make_layer(kind, block_size=8, downsample_queries=downsample_queries).float()
            with torch.no_grad(), AllocatedElements() as counter:
                layer.attend(q, k, v, None)
            per_token[downsample_queries].append(counter.elements / n)
    (variant_short, variant_long), (fma_short, fma_long) = per_token[True], per_token[False]
    assert variant_long < 1.02 * variant_short
    assert fma_long > 1.2 * fma_short


# Refusals -----------------------------------------------------------------------------------------


def test_causal_is_refused_with_the_fix():
    for build in (lambda: FastMultipoleAttention(dim=16, num_heads=2, causal=True, downsample_queries=True),
                  lambda: build_attention("fma", dim=16, num_heads=2, causal=True, block_size=4,
                                          downsample_queries=True)):
        with pytest.raises(ConfigurationError, match=r"objective=mlm.*model\.attention\.downsample_queries=false"):
            build()
    FastMultipoleAttention(dim=16, num_heads=2, causal=True, downsample_queries=False)


def test_the_causal_definition_would_see_the_future():
    """Why causal is refused: in the definition with causal lists, a coarse query averages its
    segment, so output i moves when a later query of its segment changes, and its gradient reaches
    that query. (Keys and values of later positions stay out of reach: the leak is the queries.)"""
    generator = torch.Generator().manual_seed(12)
    n = 32  # level 2 (width 8, p = 2) has segments of 4: query 17 shares one with 16, 18, 19
    layer = make_layer("groupedconv", seed=13)
    q, k, v = (randn(generator, 1, 2, n, HEAD_DIM).requires_grad_() for _ in range(3))
    out = reference(layer, q, k, v, causal=True)
    grad_q, grad_k, grad_v = torch.autograd.grad(out[:, :, 17].sum(), (q, k, v))
    assert grad_q[:, :, 18:20].abs().sum() > 0  # later queries of its segment
    assert (grad_q[:, :, 20:] == 0).all() and (grad_k[:, :, 18:] == 0).all() and (grad_v[:, :, 18:] == 0).all()
    changed = q.detach().clone()
    changed[:, :, 19] += 1
    assert relative_error(reference(layer, changed, k, v, causal=True)[:, :, 17], out[:, :, 17]) > 1e-6


def test_triton_backend_is_refused_auto_takes_the_torch_path_and_rank_must_divide_block_size():
    with pytest.raises(ConfigurationError, match=r"model\.attention\.backend=auto.*downsample_queries=false"):
        FastMultipoleAttention(dim=16, num_heads=2, causal=False, downsample="avgpool", backend="triton",
                               downsample_queries=True)
    with pytest.raises(ConfigurationError, match=r"model\.attention\.rank="):
        FastMultipoleAttention(dim=16, num_heads=2, causal=False, block_size=4, rank=3, downsample_queries=True)
    layer = make_layer("groupedconv", seed=14)
    torch_layer = copy.deepcopy(layer)
    torch_layer.backend = "torch"
    x = torch.randn(1, 40, 2 * HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    assert layer.backend == "auto" and torch.equal(layer(x), torch_layer(x))
