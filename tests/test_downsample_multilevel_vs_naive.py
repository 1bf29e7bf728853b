"""The multilevel learned basis (fma/downsample/cellwise.py `upward`, through the module and the FMA
layer) against its per-cell reference (fma/downsample/naive.py): summaries, counts and gradients,
length independence, causality, padding, its averaging initialisation, and which backend runs it (the fused
path itself: tests/test_downsample_fused_vs_cellwise.py); with
multilevel_maps=per_level (one child-to-parent map per level of max_seq_len) the same against the reference,
its parameter count, its refusal past max_seq_len, and the chunk shares context parallelism sums."""

import pytest
import torch
from omegaconf import OmegaConf

from attention_testing import relative_error
from conftest import ROOT
from fma import ConfigurationError, FastMultipoleAttention
from fma.downsample import FUSED_KINDS, Downsample
from fma.downsample.naive import summarise_cell
from fma.full.naive import softmax_attention
from fma.indexing import level_widths, padded_length
from fma.multipole.naive import reference_multipole_attention
from models.transformer import TransformerLM

BLOCK, RANK, HEAD_DIM = 4, 2, 8
MAPS = ("shared", "per_level")


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def randomise(module, seed):
    """Random float64 parameters (not the averaging initialisation), so every filter and map matters."""
    generator = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * randn(generator, *parameter.shape))
    return module


def interior_padding(generator, batch, n):
    """[batch, n] bool: about a quarter of the positions, plus a padded tail, never position 0."""
    mask = torch.rand(batch, n, generator=generator) < 0.25
    mask[:, -n // 4:] = True
    mask[:, 0] = False
    return mask


def reference_summaries(x, padding_mask, downsample):
    """Per level, the summaries [batch, heads, cells * p, d] and counts [batch, cells * p], cell by cell."""
    n = x.shape[2]
    real = torch.ones(x.shape[0], n, dtype=torch.bool) if padding_mask is None else ~padding_mask
    summaries, counts = [], []
    for level, width in enumerate(level_widths(n, downsample.block_size), 1):
        parts = [slice(c * width, (c + 1) * width) for c in range(n // width)]
        cells = [summarise_cell(x[:, :, part], real[:, part], downsample, level) for part in parts]
        summaries.append(torch.cat([s for s, _ in cells], 2))
        counts.append(torch.cat([c for _, c in cells], 1))
    return summaries, counts


def fma_layer(kind, causal, *, seed=None, block_size=BLOCK, max_seq_len=128, maps="shared"):
    layer = FastMultipoleAttention(dim=2 * HEAD_DIM, num_heads=2, causal=causal, block_size=block_size, rank=RANK,
                                   downsample=kind, max_seq_len=max_seq_len, multilevel_maps=maps).double()
    return layer if seed is None else randomise(layer, seed)


# Against the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("block_size, rank", [(4, 2), (4, 3), (2, 1)])
@pytest.mark.parametrize("n", [16, 32, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_summaries_counts_and_gradients_match_reference(block_size, rank, n, padded, maps):
    """per_level: maps for the levels of 2n, so the last map is unused here (its gradient must be zero)."""
    generator = torch.Generator().manual_seed(n + rank)
    downsample = randomise(Downsample("multilevel", head_dim=HEAD_DIM, block_size=block_size, rank=rank,
                                      max_seq_len=block_size if maps == "shared" else 2 * n,
                                      multilevel_maps=maps), seed=n)
    x = randn(generator, 2, 2, n, HEAD_DIM)
    mask = interior_padding(generator, 2, n) if padded else None

    def summaries_and_gradients(summarise):
        inputs = x.detach().requires_grad_()
        summaries, counts = summarise(inputs, mask, downsample)
        grads = [randn(torch.Generator().manual_seed(level), *s.shape) for level, s in enumerate(summaries)]
        wrt = [inputs, downsample.weight, downsample.bias]
        return summaries, counts, torch.autograd.grad(summaries, wrt, grads)

    fast, fast_counts, fast_grads = summaries_and_gradients(lambda x, m, d: d(x, m, backend="torch"))
    expected, expected_counts, expected_grads = summaries_and_gradients(reference_summaries)
    assert len(fast) == len(level_widths(n, block_size)) == len(expected)
    for level, (actual, wanted) in enumerate(zip(fast, expected), 1):
        assert relative_error(actual, wanted) < 1e-12, f"level {level}"
    if padded:
        assert all(torch.equal(a, b) for a, b in zip(fast_counts, expected_counts))
        assert any((c == 0).any() for c in fast_counts)  # some child is empty: its parent drops it
    else:
        assert fast_counts is None
    for name, actual, wanted in zip(["dx", "d weight", "d bias"], fast_grads, expected_grads):
        assert relative_error(actual, wanted) < 1e-12, name


@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, with_padding_mask", [(7, False), (45, False), (64, False), (45, True)])
def test_layer_matches_reference_outputs_and_gradients(causal, n, with_padding_mask, maps):
    generator = torch.Generator().manual_seed(n)
    q, k, v, grad_out = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(4))
    padding_mask = interior_padding(generator, 2, n) if with_padding_mask else None
    layer = fma_layer("multilevel", causal, seed=n + 1, max_seq_len=64, maps=maps)

    def reference(layer, q, k, v, padding_mask):
        return reference_multipole_attention(q, k, v, layer.key_downsample, layer.value_downsample,
                                             block_size=BLOCK, causal=causal, scale_coarse=True,
                                             padding_mask=padding_mask)

    def outputs_and_gradients(attention):
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = attention(layer, *inputs, padding_mask)
        wrt = inputs + list(layer.key_downsample.parameters()) + list(layer.value_downsample.parameters())
        return [out] + list(torch.autograd.grad(out, wrt, grad_out, materialize_grads=True))

    fast, expected = outputs_and_gradients(FastMultipoleAttention.attend), outputs_and_gradients(reference)
    names = ["output", "dq", "dk", "dv", "d key weight", "d key bias", "d value weight", "d value bias"]
    assert len(fast) == len(expected) == len(names)
    for name, actual, wanted in zip(names, fast, expected):
        assert relative_error(actual, wanted) < 1e-10, name


# Any length ---------------------------------------------------------------------------------------


def test_parameters_do_not_depend_on_max_seq_len():
    """W1 [p, m, d] and A [p, 2p, d] in one weight, b1 and b in one bias, per basis, at every max_seq_len."""
    shapes = {}
    for max_seq_len in (16, 256, 65536):
        layer = fma_layer("multilevel", True, max_seq_len=max_seq_len)
        shapes[max_seq_len] = {name: tuple(p.shape) for name, p in layer.named_parameters()}
        downsample = layer.key_downsample
        assert [tuple(w.shape) for w in (downsample.level_parameters(1)[0], downsample.level_parameters(5)[0])] == [
            (RANK, BLOCK, HEAD_DIM), (RANK, 2 * RANK, HEAD_DIM)]
        assert downsample.level_parameters(2)[0]._base is downsample.weight
    expected_basis = {"weight": (RANK * BLOCK + 2 * RANK * RANK, HEAD_DIM), "bias": (2 * RANK, HEAD_DIM)}
    assert all(shapes[16][f"{basis}_downsample.{name}"] == shape
               for basis in ("key", "value") for name, shape in expected_basis.items())
    assert shapes[16] == shapes[256] == shapes[65536]


def test_per_level_maps_grow_with_the_number_of_levels_only():
    """per_level: W1 and one map A_l [p, 2p, d], b_l [p, d] per level l = 2..L of max_seq_len's valid length,
    so shared's parameters plus L - 2 maps; separate views of one weight, each starting as the averaging map."""
    map_numel = RANK * 2 * RANK * HEAD_DIM + RANK * HEAD_DIM  # A_l and b_l: 2 * 4 * 8 + 2 * 8 = 80
    shared_numel = (RANK * BLOCK + 2 * RANK * RANK) * HEAD_DIM + 2 * RANK * HEAD_DIM  # (8 + 8) * 8 + 4 * 8 = 160
    # max_seq_len -> L = log2(padded / m) - 1 levels: 16 -> 4 blocks, L = 1 (W1 only); 200 and 256 -> 64 blocks,
    # L = 5; 257 -> 512 tokens, 128 blocks, L = 6
    for max_seq_len, levels in [(16, 1), (200, 5), (256, 5), (257, 6)]:
        downsample = Downsample("multilevel", head_dim=HEAD_DIM, block_size=BLOCK, rank=RANK, max_seq_len=max_seq_len,
                                multilevel_maps="per_level")
        assert len(level_widths(padded_length(max_seq_len, BLOCK), BLOCK)) == levels == downsample.num_levels
        assert sum(p.numel() for p in downsample.parameters()) == shared_numel + (levels - 2) * map_numel, max_seq_len
        assert tuple(downsample.weight.shape) == (RANK * BLOCK + (levels - 1) * 2 * RANK * RANK, HEAD_DIM)
        assert tuple(downsample.bias.shape) == (levels * RANK, HEAD_DIM)
    assert sum(p.numel() for p in downsample.parameters()) == 160 + 4 * 80 == 480
    maps = [downsample.level_parameters(level) for level in range(2, levels + 1)]
    assert all(w.shape == (RANK, 2 * RANK, HEAD_DIM) and b.shape == (RANK, HEAD_DIM) and w._base is downsample.weight
               for w, b in maps)
    assert len({w.data_ptr() for w, _ in maps}) == levels - 1  # distinct maps, not one reused
    shared = Downsample("multilevel", head_dim=HEAD_DIM, block_size=BLOCK, rank=RANK, max_seq_len=257)
    assert shared.num_levels is None and shared.any_length and not downsample.any_length
    assert all(torch.equal(w, shared.level_parameters(2)[0]) and not b.any() for w, b in maps)


def test_per_level_refuses_inputs_past_max_seq_len():
    """As groupedconv: the layer names the fix; so does the module asked for a level it has no map for."""
    layer = fma_layer("multilevel", True, max_seq_len=64, maps="per_level")
    layer(torch.randn(1, 64, 2 * HEAD_DIM, dtype=torch.float64))
    with pytest.raises(ConfigurationError, match=r"max_seq_len=64.*model\.attention\.max_seq_len="):
        layer(torch.randn(1, 65, 2 * HEAD_DIM, dtype=torch.float64))
    with pytest.raises(ConfigurationError, match=r"model\.attention\.max_seq_len="):
        layer.key_downsample(torch.randn(1, 2, 128, HEAD_DIM, dtype=torch.float64), backend="torch")


def test_multilevel_maps_option_is_checked_and_threaded_from_the_model():
    """configs/model/fma.yaml sets multilevel_maps (default shared); the model's attention options reach both
    bases; an unknown value, or per_level with another downsampling, is refused naming the override."""
    assert OmegaConf.load(ROOT / "configs" / "model" / "fma.yaml").attention.multilevel_maps == "shared"
    attention = dict(name="fma", block_size=4, rank=2, downsample="multilevel", multilevel_maps="per_level",
                     max_seq_len=64)
    layer = TransformerLM(vocab_size=11, causal=True, attention=attention, dim=16, depth=1, num_heads=2).blocks[0]
    bases = (layer.attention.key_downsample, layer.attention.value_downsample)
    assert [(basis.multilevel_maps, basis.num_levels) for basis in bases] == [("per_level", 3)] * 2
    with pytest.raises(ConfigurationError, match=r"model\.attention\.multilevel_maps= one of shared, per_level"):
        fma_layer("multilevel", True, maps="per_layer")
    with pytest.raises(ConfigurationError, match=r"multilevel_maps=shared or model\.attention\.downsample=multilevel"):
        fma_layer("groupedconv", True, maps="per_level")


@pytest.mark.parametrize("kind", ["multilevel", "avgpool"])
def test_layer_built_for_256_tokens_runs_at_1024(kind):
    layer = FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=16, rank=RANK, downsample=kind,
                                   max_seq_len=256)
    out = layer(torch.randn(1, 1024, 16, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 1024, 16) and out.isfinite().all()


def test_groupedconv_still_refuses_inputs_past_max_seq_len():
    layer = FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=16, rank=RANK, max_seq_len=256)
    with pytest.raises(ConfigurationError, match=r"model\.attention\.max_seq_len="):
        layer(torch.randn(1, 1024, 16))


# Causality and padding ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [32, 37])
def test_layer_output_depends_on_every_past_position_and_no_future_one(n):
    generator = torch.Generator().manual_seed(2)
    layer = randomise(FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=BLOCK, rank=RANK,
                                             downsample="multilevel"), seed=3)
    x = randn(generator, 1, n, 16).requires_grad_()
    out = layer(x)
    for i in range(n):
        (grad,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        assert (grad[0, i + 1:] == 0).all(), f"output {i} depends on a later position"
        assert (grad[0, : i + 1].abs().sum(-1) > 0).all(), f"output {i} ignores an earlier position"


@pytest.mark.parametrize("n, prefix", [(64, 21), (64, 48), (45, 33)])
def test_changing_a_suffix_leaves_the_prefix_outputs_unchanged(n, prefix):
    generator = torch.Generator().manual_seed(n + prefix)
    layer = fma_layer("multilevel", True, seed=4)
    x = randn(generator, 2, n, 2 * HEAD_DIM)
    changed = torch.cat([x[:, :prefix], 100 * randn(generator, 2, n - prefix, 2 * HEAD_DIM)], 1)
    out, out_changed = layer(x), layer(changed)
    assert torch.equal(out[:, :prefix], out_changed[:, :prefix])
    assert relative_error(out_changed[:, prefix:], out[:, prefix:]) > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_padded_slots_change_nothing(causal):
    """Garbage at padded positions (interior and tail) leaves the real positions' outputs unchanged,
    and they equal the reference, which never reads a padded token."""
    generator = torch.Generator().manual_seed(5)
    n = 64
    q, k, v = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(3))
    padding_mask = interior_padding(generator, 2, n)
    layer = fma_layer("multilevel", causal, seed=6)
    garbage_k, garbage_v = (x.where(~padding_mask[:, None, :, None], 100 * randn(generator, *x.shape)) for x in (k, v))
    real = ~padding_mask
    out = layer.attend(q, k, v, padding_mask).transpose(1, 2)[real]
    garbage_out = layer.attend(q, garbage_k, garbage_v, padding_mask).transpose(1, 2)[real]
    expected = reference_multipole_attention(q, k, v, layer.key_downsample, layer.value_downsample, block_size=BLOCK,
                                             causal=causal, scale_coarse=True, padding_mask=padding_mask)
    assert relative_error(garbage_out, out) < 1e-12
    assert relative_error(out, expected.transpose(1, 2)[real]) < 1e-10


# Initialisation and the backend -------------------------------------------------------------------


@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [64, 128])
def test_initialisation_equals_avgpool(causal, n, maps):
    """W1 starts as segment means and A (each A_l) as the mean of children's summaries 2r and 2r+1, so
    every level's summaries are avgpool's: the layers agree, and on inputs constant within the coarsest
    cells both equal full attention. per_level therefore starts equal to shared."""
    generator = torch.Generator().manual_seed(n)
    averaged = fma_layer("avgpool", causal)
    multilevel = fma_layer("multilevel", causal, maps=maps)
    multilevel.load_state_dict(averaged.state_dict(), strict=False)  # the same projections
    q = randn(generator, 2, 2, n, HEAD_DIM)
    k, v = (randn(generator, 2, 2, n, HEAD_DIM) for _ in range(2))
    assert relative_error(multilevel.attend(q, k, v, None), averaged.attend(q, k, v, None)) < 1e-12
    x = randn(generator, 2, n, 2 * HEAD_DIM)
    assert relative_error(multilevel(x), averaged(x)) < 1e-12
    k, v = (randn(generator, 2, 2, 4, HEAD_DIM).repeat_interleave(n // 4, dim=2) for _ in range(2))
    expected = softmax_attention(q, k, v, causal=causal)
    assert relative_error(multilevel.attend(q, k, v, None), expected) < 1e-10


def test_initialisation_with_padding_equals_groupedconv_initialisation():
    """With padding, both start as the same linear map of the zero-filled cell (multilevel's factored
    across levels; a dropped empty child had only a zero bias to give), with the same counts."""
    generator = torch.Generator().manual_seed(8)
    n = 128
    x, mask = randn(generator, 2, 2, n, HEAD_DIM), interior_padding(generator, 2, n)
    options = dict(head_dim=HEAD_DIM, block_size=BLOCK, rank=RANK, max_seq_len=n)
    multilevel, multilevel_counts = Downsample("multilevel", **options).double()(x, mask)
    grouped, grouped_counts = Downsample("groupedconv", **options).double()(x, mask)
    assert len(multilevel) == len(grouped) == len(level_widths(padded_length(n, BLOCK), BLOCK))
    assert all(relative_error(a, b) < 1e-12 for a, b in zip(multilevel, grouped))
    assert all(torch.equal(a, b) for a, b in zip(multilevel_counts, grouped_counts))


@pytest.mark.parametrize("maps", MAPS)
def test_fused_like_groupedconv_and_auto_takes_the_torch_path_on_the_cpu(maps):
    """multilevel runs on the groupedconv kernel (both maps): backend=triton is accepted by the layer; auto
    takes the torch path for CPU inputs, and so must a float64 input (no kernel for it), which triton refuses."""
    assert "multilevel" in FUSED_KINDS
    FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=BLOCK, downsample="multilevel",
                           multilevel_maps=maps, max_seq_len=64, backend="triton")
    downsample = Downsample("multilevel", head_dim=HEAD_DIM, block_size=BLOCK, rank=RANK, max_seq_len=64,
                            multilevel_maps=maps)
    x = torch.randn(1, 2, 64, HEAD_DIM)
    assert downsample.resolved_backend(x, "auto") == downsample.resolved_backend(x.double(), "auto") == "torch"
    with pytest.raises(ConfigurationError, match=r"no kernel for downsample=multilevel in torch\.float64"):
        downsample.resolved_backend(x.double(), "triton")


@pytest.mark.parametrize("bf16_parameters", [False, True])
def test_fused_multilevel_builds_float32_filters_under_autocast(monkeypatch, bf16_parameters):
    """The kernel takes float32 filters (it splits them hi + lo for bf16 inputs), also when the model runs
    under bf16 autocast or in bf16: the effective filters are built in float32 from upcast parameters,
    equal to the float32 construction (the kernel itself is stubbed: no Triton run)."""
    pytest.importorskip("triton")
    from fma.downsample import fused, multilevel

    n, m, p, d = 64, 8, 2, 8
    summaries = sum(n // w * p for w in level_widths(n, m))
    seen = {}

    def kernel_stub(xs, kind, block_size, rank, weights, biases, counts=None):
        seen.update(kind=kind, weight=weights[0], bias=biases[0])
        return torch.zeros(len(xs), *xs[0].shape[:2], summaries, d, dtype=xs[0].dtype)

    monkeypatch.setattr(fused, "fused_summaries", kernel_stub)
    down = Downsample("multilevel", head_dim=d, block_size=m, rank=p, max_seq_len=n)
    with torch.no_grad():
        for parameter in down.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    levels = len(level_widths(n, m))
    if bf16_parameters:
        down = down.to(torch.bfloat16)
    expected = multilevel.effective_filters([(w.double(), b.double()) for w, b in down.parameters_of_levels(levels)])
    x = torch.randn(1, 2, n, d, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        multilevel.fused_upward([x], m, p, [down.parameters_of_levels(levels)], None)
    assert seen["kind"] == "groupedconv"
    assert seen["weight"].dtype == seen["bias"].dtype == torch.float32
    assert relative_error(seen["weight"], expected[0]) <= 1e-6
    assert relative_error(seen["bias"], expected[1]) <= 1e-6
