"""Linformer's projected path (fma/linformer/projected.py) against its formula summed position by
position (fma/linformer/naive.py) and against exact attention where they coincide; the layer's
slicing of E and F, padding, sharing, bf16 inputs, refusals and config."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from attention_testing import assert_same_outputs_and_gradients, padding, random_qkv, relative_error
from conftest import ROOT, compose_config
from fma import ConfigurationError
from fma.full.naive import softmax_attention
from fma.linformer import LinformerAttention
from fma.linformer.naive import linformer_attention_reference
from fma.linformer.projected import linformer_attention
from fma.registry import build_attention


def random_projections(k: int, max_seq_len: int, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, max_seq_len, dtype=torch.float64, generator=generator) / max_seq_len ** 0.5)
            .requires_grad_() for _ in range(2)]


def make_linformer(**options) -> LinformerAttention:
    torch.manual_seed(0)
    return build_attention("linformer", dim=16, num_heads=2, causal=False, **options).double()


@pytest.mark.parametrize("n, max_seq_len, k", [(23, 23, 7), (23, 40, 7), (23, 40, 40), (1, 8, 3)])
@pytest.mark.parametrize("padded", [False, True])
def test_projected_matches_formula(n, max_seq_len, k, padded):
    """Outputs and gradients (q, k, v, E, F) equal the position-by-position sums, for n = max_seq_len,
    n < max_seq_len (first columns), k = max_seq_len, a single position, and padded keys."""
    mask = padding(2, n, real=max(1, n - 5)) if padded else None
    assert_same_outputs_and_gradients(
        lambda q, k, v, e, f: linformer_attention(q, k, v, e, f, padding_mask=mask),
        lambda q, k, v, e, f: linformer_attention_reference(q, k, v, e, f, padding_mask=mask),
        [*random_qkv(n), *random_projections(k, max_seq_len)],
    )


def test_key_value_sharing_matches_formula():
    """E = F: one tensor for both, and its gradient gathers both uses."""
    key_projection, _ = random_projections(5, 23)
    assert_same_outputs_and_gradients(
        lambda q, k, v, e: linformer_attention(q, k, v, e, e),
        lambda q, k, v, e: linformer_attention_reference(q, k, v, e, e),
        [*random_qkv(23), key_projection],
    )


def test_identity_projections_give_exact_attention():
    """k = n and E = F = I: the projected keys are the keys, so the output is exact softmax attention."""
    q, k, v = random_qkv(19)
    identity = torch.eye(19, dtype=torch.float64)
    out = linformer_attention(q, k, v, identity, identity)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=False), rtol=1e-10, atol=1e-10)


def test_padded_keys_change_nothing():
    """Real queries of a padded sequence get the outputs of the unpadded prefix (the same first columns
    of E and F), whatever the padded positions hold."""
    layer = make_linformer(k=6, max_seq_len=30)
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    out = layer(x, padding(2, 30, real=20))
    torch.testing.assert_close(out[:, :20], layer(x[:, :20]), rtol=1e-12, atol=1e-12)
    x_changed = x.clone()
    x_changed[:, 20:] = 100 * torch.randn(2, 10, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x_changed, padding(2, 30, real=20))[:, :20], out[:, :20], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()


def test_shorter_input_uses_the_first_columns():
    """At n = 23 a layer with max_seq_len = 40 equals one with max_seq_len = 23 given E[:, :23], F[:, :23];
    columns from 23 on are never read."""
    long, short = make_linformer(k=5, max_seq_len=40), make_linformer(k=5, max_seq_len=23)
    with torch.no_grad():
        short.key_projection.copy_(long.key_projection[:, :23])
        short.value_projection.copy_(long.value_projection[:, :23])
        long.key_projection[:, 23:] = float("nan")
        long.value_projection[:, 23:] = float("nan")
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    torch.testing.assert_close(long(x), short(x), rtol=0, atol=0)


def test_longer_input_is_refused():
    layer = make_linformer(k=4, max_seq_len=16)
    with pytest.raises(ConfigurationError, match="model.attention.max_seq_len="):
        layer(torch.randn(1, 17, 16, dtype=torch.float64))


@pytest.mark.parametrize("sharing, parameters", [
    ("headwise", 4 * 16 * 16 + 2 * 8 * 40),   # qkv (3 dim^2) and proj (dim^2), then E and F, each k x max_seq_len
    ("key-value", 4 * 16 * 16 + 8 * 40),      # E = F: one k x max_seq_len matrix
])
def test_sharing_parameter_counts(sharing, parameters):
    layer = make_linformer(k=8, max_seq_len=40, sharing=sharing)
    assert sum(p.numel() for p in layer.parameters()) == parameters


def test_key_value_sharing_projects_values_with_e():
    """The key-value layer's output is the formula's with F = E."""
    layer = make_linformer(k=6, max_seq_len=20, sharing="key-value")
    q, k, v = random_qkv(20)
    expected = linformer_attention_reference(q, k, v, layer.key_projection, layer.key_projection)
    torch.testing.assert_close(layer.attend(q, k, v, None), expected, rtol=1e-10, atol=1e-10)


def test_initialisation_is_xavier_uniform_with_gain_one_over_sqrt2():
    """E and F lie within +-gain sqrt(6 / (k + max_seq_len)) and fill it (uniform: std = bound / sqrt 3)."""
    layer = make_linformer(k=64, max_seq_len=448)
    bound = 2 ** -0.5 * (6 / (64 + 448)) ** 0.5
    for projection in (layer.key_projection, layer.value_projection):
        assert projection.abs().max() <= bound
        assert projection.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.02)
    assert not torch.equal(layer.key_projection, layer.value_projection)


def test_bf16_matches_fp32():
    """bf16 inputs (a bf16 layer's E and F too) give a finite bf16 output close to the fp32 result."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 200, 16, generator=generator) for _ in range(3))
    e, f = (torch.randn(32, 256, generator=generator) / 16 for _ in range(2))
    q, k, v, e, f = (x.bfloat16() for x in (3 * q, k, v, e, f))
    mask = padding(2, 200, real=170)
    out = linformer_attention(q, k, v, e, f, padding_mask=mask)
    expected = linformer_attention(q.float(), k.float(), v.float(), e.float(), f.float(), padding_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    assert relative_error(out, expected) < 1e-2


def test_causal_is_refused():
    with pytest.raises(ConfigurationError, match="objective=mlm") as raised:
        build_attention("linformer", dim=16, num_heads=2, causal=True, k=4, max_seq_len=16)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("options, key", [
    ({"k": 0}, "model.attention.k="),
    ({"max_seq_len": 0}, "model.attention.max_seq_len="),
    ({"sharing": "layerwise"}, "model.attention.sharing="),
    ({"sharing": "none"}, "model.attention.sharing="),
])
def test_bad_options_name_the_setting(options, key):
    with pytest.raises(ConfigurationError, match=key):
        build_attention("linformer", dim=16, num_heads=2, causal=False, **{"k": 4, "max_seq_len": 16, **options})


def test_layer_forward_and_backward_through_registry():
    """Every parameter, E and F included, gets a finite, nonzero gradient; padded inputs get none."""
    layer = build_attention("linformer", dim=16, num_heads=2, causal=False, k=8, max_seq_len=32)
    x = torch.randn(2, 32, 16, requires_grad=True)
    out = layer(x, padding(2, 32, real=25))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out[:, :25].square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name
    assert torch.equal(x.grad[:, 25:], torch.zeros_like(x.grad[:, 25:]))


def test_model_config_writes_out_the_defaults(tmp_path):
    """configs/model/linformer.yaml: the constructor's defaults for k and sharing, max_seq_len from
    data.seq_len, and the options build the layer."""
    signature = inspect.signature(LinformerAttention.__init__).parameters
    written = OmegaConf.load(ROOT / "configs" / "model" / "linformer.yaml").attention
    assert (written.k, written.sharing) == (signature["k"].default, signature["sharing"].default)
    options = dict(compose_config(tmp_path, ["model=linformer", "objective=mlm", "model.attention.k=8"]).model.attention)
    assert options == {"name": "linformer", "k": 8, "max_seq_len": 32, "sharing": "headwise"}
    layer = build_attention(options.pop("name"), dim=16, num_heads=2, causal=False, **options)
    assert layer(torch.randn(1, 32, 16)).shape == (1, 32, 16)
