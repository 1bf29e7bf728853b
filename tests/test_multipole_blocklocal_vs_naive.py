"""Fast Multipole Attention's torch path (fma/multipole/blocklocal.py, through the layer) against its
reference (fma/multipole/naive.py) and exact attention (fma/full/naive.py): interaction lists,
exactness, outputs and gradients, causality, padding."""

import copy

import pytest
import torch

from attention_testing import relative_error
from fma import ConfigurationError, FastMultipoleAttention, build_attention, multipole_attention
from fma.downsample import Downsample
from fma.full.naive import softmax_attention
from fma.indexing import block_local_layout, level_widths, padded_length
from fma.multipole.naive import interaction_lists, reference_multipole_attention

BLOCK, RANK, HEAD_DIM = 4, 2, 8


def randn(generator, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def make_layer(kind, causal, seed, *, block_size=BLOCK, rank=RANK, max_seq_len=128):
    """A float64 layer whose downsampling weights are random (not their averaging initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    layer = FastMultipoleAttention(
        dim=2 * HEAD_DIM, num_heads=2, causal=causal, block_size=block_size, rank=rank,
        downsample=kind, max_seq_len=max_seq_len,
    ).double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(0.3 * randn(generator, *parameter.shape))
    return layer


def reference(layer, q, k, v, padding_mask=None):
    return reference_multipole_attention(
        q, k, v, layer.key_downsample, layer.value_downsample, block_size=layer.block_size,
        causal=layer.causal, scale_coarse=layer.scale_coarse, padding_mask=padding_mask,
    )


def interior_padding(generator, batch, n):
    """[batch, n] bool with about a quarter of the positions padded, never position 0."""
    mask = torch.rand(batch, n, generator=generator) < 0.25
    mask[:, 0] = False
    return mask


# Interaction lists --------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("num_blocks", [4, 8, 16, 32])
def test_interaction_lists_cover_allowed_range_exactly_once(causal, block_size, num_blocks):
    n = block_size * num_blocks
    for i, (fine, coarse) in enumerate(interaction_lists(n, block_size, causal)):
        covered = list(fine)
        for level, cell in coarse:
            width = block_size << (level - 1)
            covered += range(cell * width, (cell + 1) * width)
        assert sorted(covered) == list(range(i + 1 if causal else n)), f"query {i}"


@pytest.mark.parametrize("causal", [True, False])
def test_block_local_key_set_has_the_documented_size(causal):
    n, m, p = 256, 8, 2
    num_levels = len(level_widths(n, m))  # log2(256 / 8) - 1 = 4
    key_index, allowed = block_local_layout(n, m, p, causal, torch.device("cpu"))
    per_query = (2 * m + 2 * p * num_levels) if causal else (3 * m + 3 * p * num_levels)
    assert num_levels == 4 and key_index.shape == (n // m, per_query) and allowed.shape == (n // m, m, per_query)


# Exactness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, with_padding_mask", [(64, False), (45, False), (7, False), (64, True)])
def test_equals_full_attention_when_keys_and_values_are_constant_within_coarsest_cells(causal, n, with_padding_mask):
    """avgpool with the scale on summarises such inputs exactly, so FMA must equal full attention."""
    generator = torch.Generator().manual_seed(1)
    coarsest = padded_length(n, BLOCK) // 4
    q = randn(generator, 2, 2, n, HEAD_DIM)
    k, v = (randn(generator, 2, 2, 4, HEAD_DIM).repeat_interleave(coarsest, dim=2)[:, :, :n] for _ in range(2))
    padding_mask = interior_padding(generator, 2, n) if with_padding_mask else None
    layer = make_layer("avgpool", causal, seed=0)
    expected = softmax_attention(q, k, v, causal=causal, padding_mask=padding_mask)
    assert relative_error(layer.attend(q, k, v, padding_mask), expected) < 1e-10
    assert relative_error(reference(layer, q, k, v, padding_mask), expected) < 1e-10


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [5, 8])
def test_sequences_of_at_most_two_blocks_get_exact_full_attention(causal, n):
    """The documented short-length behaviour: every real key is in the near field (any inputs)."""
    generator = torch.Generator().manual_seed(10)
    q, k, v = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(3))
    out = make_layer("groupedconv", causal, seed=11).attend(q, k, v, None)
    assert relative_error(out, softmax_attention(q, k, v, causal=causal)) < 1e-10


# Fast path against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["groupedconv", "conv", "avgpool"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n, with_padding_mask", [(7, False), (16, False), (45, False), (64, False), (45, True)])
def test_fast_path_matches_reference_outputs_and_gradients(kind, causal, dtype, tolerance, n, with_padding_mask):
    generator = torch.Generator().manual_seed(n)
    q, k, v, grad_out = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(4))
    padding_mask = interior_padding(generator, 2, n) if with_padding_mask else None
    layer = make_layer(kind, causal, seed=n + 1, max_seq_len=n)  # every level's parameters in use
    fast_layer = copy.deepcopy(layer).to(dtype)

    def outputs_and_gradients(model, attention, inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        out = attention(model, *inputs, padding_mask)
        wrt = inputs + list(model.key_downsample.parameters()) + list(model.value_downsample.parameters())
        # For n <= 2m causal no query reaches a coarse cell: the reference leaves the weights unused.
        return [out] + list(torch.autograd.grad(out, wrt, grad_out.to(out.dtype), materialize_grads=True))

    fast = outputs_and_gradients(fast_layer, FastMultipoleAttention.attend, [x.to(dtype) for x in (q, k, v)])
    expected = outputs_and_gradients(layer, reference, [q, k, v])
    basis_names = [name for name, _ in layer.named_parameters() if "downsample" in name]
    names = ["output", "dq", "dk", "dv"] + [f"d {name}" for name in basis_names]
    assert len(fast) == len(expected) == len(names) == 4 + (0 if kind == "avgpool" else 4)  # K, V: weight, bias
    for name, actual, wanted in zip(names, fast, expected):
        assert actual.dtype == dtype
        assert relative_error(actual.double(), wanted) < tolerance, name


# Causality ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["groupedconv", "conv", "avgpool"])
@pytest.mark.parametrize("n", [32, 37])
def test_layer_output_depends_on_every_past_position_and_no_future_one(kind, n):
    generator = torch.Generator().manual_seed(2)
    layer = FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=BLOCK, rank=RANK, downsample=kind)
    layer = layer.double()
    x = randn(generator, 1, n, 16).requires_grad_()
    out = layer(x)
    for i in range(n):
        (grad,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        assert (grad[0, i + 1 :] == 0).all(), f"output {i} depends on a later position"
        assert (grad[0, : i + 1].abs().sum(-1) > 0).all(), f"output {i} ignores an earlier position"


# Padding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_padding_gets_no_weight(causal):
    """Garbage in padded slots changes nothing; giving pads logit 0 (the authors' release) would."""
    generator = torch.Generator().manual_seed(3)
    n, valid = 45, 64
    q, k, v = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(3))
    interior = interior_padding(generator, 2, n)
    layer = make_layer("groupedconv", causal, seed=4)
    expected = reference(layer, q, k, v, interior)
    real = ~interior

    # The same tokens at the valid length, with large garbage in every padded key and value.
    padding_mask = torch.cat([interior, torch.ones(2, valid - n, dtype=torch.bool)], dim=1)
    garbage = 100 * randn(generator, 2, 2, valid, HEAD_DIM)
    k_garbage, v_garbage = (
        torch.cat([x, x.new_zeros(2, 2, valid - n, HEAD_DIM)], dim=2).where(~padding_mask[:, None, :, None], garbage)
        for x in (k, v)
    )
    q_long = torch.cat([q, randn(generator, 2, 2, valid - n, HEAD_DIM)], dim=2)
    out = layer.attend(q_long, k_garbage, v_garbage, padding_mask)[:, :, :n]
    assert relative_error(out.transpose(1, 2)[real], expected.transpose(1, 2)[real]) < 1e-10

    # The defect: pads as zero keys and values with logit 0, summaries over the zero-padded cells.
    k_zero, v_zero = (x.masked_fill(padding_mask[:, None, :, None], 0) for x in (k_garbage, v_garbage))
    leaky = multipole_attention(
        q_long, k_zero, v_zero, layer.key_downsample(k_zero)[0], layer.value_downsample(v_zero)[0],
        block_size=BLOCK, causal=causal, scale_coarse=True,
    )[:, :, :n]
    assert relative_error(leaky.transpose(1, 2)[real], expected.transpose(1, 2)[real]) > 1e-2


def test_fully_padded_causal_prefix_gives_zero_output_not_nan():
    generator = torch.Generator().manual_seed(5)
    q, k, v = (randn(generator, 1, 2, 20, HEAD_DIM) for _ in range(3))
    padding_mask = torch.arange(20)[None] < 6  # left padding: queries 0..5 see no real key
    out = make_layer("groupedconv", True, seed=6).attend(q, k, v, padding_mask)
    assert (out[:, :, :6] == 0).all() and out[:, :, 6:].abs().sum(-1).gt(0).all()


# Module -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["groupedconv", "conv", "avgpool"])
def test_parameters_are_per_level_and_separate_for_keys_and_values(kind):
    layer = build_attention(
        "fma", dim=32, num_heads=4, causal=True, block_size=4, rank=2, downsample=kind, max_seq_len=50
    )
    assert isinstance(layer, FastMultipoleAttention)
    expected = {"qkv.weight": (96, 32), "proj.weight": (32, 32)}
    widths = [4, 8, 16]  # max_seq_len 50 -> padded 64 -> n/4 = 16
    if kind != "avgpool":
        for basis in ("key_downsample", "value_downsample"):  # every level's filters in one tensor
            expected[f"{basis}.weight"] = (2 * sum(widths) * (1 if kind == "groupedconv" else 8), 8)
            expected[f"{basis}.bias"] = (2 * len(widths), 8)
            downsample = getattr(layer, basis)
            for level, width in enumerate(widths, 1):
                weight, bias = downsample.level_parameters(level)
                assert weight.shape == ((2, width, 8) if kind == "groupedconv" else (2, width, 8, 8))
                assert bias.shape == (2, 8) and weight._base is downsample.weight
    assert {name: tuple(p.shape) for name, p in layer.named_parameters()} == expected


@pytest.mark.parametrize("kind", ["groupedconv", "conv"])
def test_learned_summaries_start_as_segment_means(kind):
    """At initialisation the learned kinds summarise exactly as avgpool does."""
    generator = torch.Generator().manual_seed(7)
    x = randn(generator, 2, 2, 64, HEAD_DIM, dtype=torch.float32)
    options = dict(head_dim=HEAD_DIM, block_size=BLOCK, rank=RANK, max_seq_len=64)
    learned, _ = Downsample(kind, **options)(x)
    averaged, _ = Downsample("avgpool", **options)(x)
    assert len(learned) == 3 and all(relative_error(a, b) < 1e-6 for a, b in zip(learned, averaged))


@pytest.mark.parametrize(
    "options, key",
    [
        (dict(block_size=0), "model.attention.block_size="),
        (dict(rank=0), "model.attention.rank="),
        (dict(block_size=4, rank=8), "model.attention.rank="),
        (dict(block_size=4, rank=3, downsample="avgpool"), "model.attention.rank="),
        (dict(downsample="wavelet"), "model.attention.downsample="),
        (dict(backend="tvm"), "model.attention.backend="),
        (dict(max_seq_len=0), "model.attention.max_seq_len="),
    ],
)
def test_bad_options_name_the_config_key(options, key):
    with pytest.raises(ConfigurationError, match=key):
        FastMultipoleAttention(dim=16, num_heads=2, causal=True, **options)


def test_input_longer_than_max_seq_len_names_the_config_keys():
    layer = FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=4, max_seq_len=32)
    layer(torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(8)))
    with pytest.raises(ConfigurationError, match=r"data\.seq_len=.*model\.attention\.max_seq_len="):
        layer(torch.randn(1, 33, 16, generator=torch.Generator().manual_seed(8)))


def test_bfloat16_runs_close_to_float32():
    generator = torch.Generator().manual_seed(9)
    layer = FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=BLOCK, rank=RANK)
    x = torch.randn(2, 45, 16, generator=generator)
    expected = layer(x)
    out = copy.deepcopy(layer).bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and relative_error(out.float(), expected) < 3e-2
