"""Properties every baseline kind must have as a layer: causality (where it has a causal form),
exactness on short sequences, its config file, clear errors, half precision.

Each kind's fast path against its plain reference: tests/test_<kind>_<path>_vs_naive.py. Whole-model
causality, padding and tiny-overfit tests for every kind live in tests/test_models.py.
"""

import inspect

import pytest
import torch

from attention_testing import SMALL_OPTIONS, make_layer, padding
from conftest import assert_prefix_unchanged, compose_config
from fma import ATTENTION_KINDS, ConfigurationError, build_attention
from fma.htransformer.blockwise import num_levels

BASELINES = ["fastmax", "htransformer", "linear", "linformer", "local", "nystromformer", "reformer"]
CAUSAL_BASELINES = [kind for kind in BASELINES if ATTENTION_KINDS[kind].has_causal_form]

# Causality -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CAUSAL_BASELINES)
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


# Exactness and state ---------------------------------------------------------------------------


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


def test_reformer_rotations_fresh_in_training_fixed_in_eval():
    x = torch.randn(2, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    layer = make_layer("reformer", True, **SMALL_OPTIONS["reformer"])
    evaluated = layer(x)
    assert torch.equal(evaluated, layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    fixed = make_layer("reformer", True, **SMALL_OPTIONS["reformer"], fresh_rotations=False).train()
    assert torch.equal(fixed(x), evaluated)


# Configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BASELINES)
def test_model_config_builds_kind_with_its_defaults(kind, tmp_path):
    """configs/model/<kind>.yaml selects the kind and writes out exactly the constructor's options and defaults."""
    config = compose_config(tmp_path, [f"model={kind}"])
    options = dict(config.model.attention)
    assert options.pop("name") == kind
    signature = inspect.signature(ATTENTION_KINDS[kind].__init__).parameters
    defaults = {name: p.default for name, p in signature.items() if name not in ("self", "dim", "num_heads", "causal")}
    if "max_seq_len" in options:  # the longest input is the data's length, not the constructor's default
        assert options["max_seq_len"] == config.data.seq_len
        defaults["max_seq_len"] = config.data.seq_len
    assert options == defaults
    layer = build_attention(kind, dim=config.model.dim, num_heads=config.model.num_heads,
                            causal=ATTENTION_KINDS[kind].has_causal_form, **options)
    x = torch.randn(1, config.data.seq_len, config.model.dim)
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
    layer = build_attention(kind, dim=16, num_heads=2, causal=ATTENTION_KINDS[kind].has_causal_form, **options).eval()
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(8))
    expected = layer(x)
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["full", "fma", *BASELINES])
@pytest.mark.parametrize("dim, num_heads", [(65, 4), (64, 0), (0, 4)])
def test_heads_that_do_not_split_the_width_are_refused(kind, dim, num_heads):
    with pytest.raises(ConfigurationError, match="model.num_heads="):
        build_attention(kind, dim=dim, num_heads=num_heads, causal=ATTENTION_KINDS[kind].has_causal_form)
