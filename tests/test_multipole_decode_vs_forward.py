"""FMA's own decoding state (fma/multipole/decode.py): prefill then step gives `layer(x)` at every position,
in float64, and the state stays within its stated size, which grows with log n and not with n."""

import math

import pytest
import torch

from fma.multipole import FastMultipoleAttention
from fma.multipole.decode import max_numel

M, DIM, HEADS = 4, 8, 2
PROMPT_LENGTHS = (1, 3, 4, 9, 16, 17, 20)
TOTAL = 41


def layer(downsample: str, rank: int, scale_coarse: bool, max_seq_len: int = 256) -> FastMultipoleAttention:
    """downsample: a kind, or "multilevel per_level" (multilevel_maps=per_level: one map per level)."""
    torch.manual_seed(0)
    kind, _, maps = downsample.partition(" ")
    attention = FastMultipoleAttention(dim=DIM, num_heads=HEADS, causal=True, block_size=M, rank=rank,
                                       downsample=kind, scale_coarse=scale_coarse, backend="torch",
                                       max_seq_len=max_seq_len, multilevel_maps=maps or "shared").double()
    with torch.no_grad():  # filters away from their averaging start, so that every level's weights differ
        for downsample_module in (attention.key_downsample, attention.value_downsample):
            for parameter in downsample_module.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    return attention


def decoded(attention, x: torch.Tensor, prompt_length: int):
    """Outputs of prefill(x[:, :prompt_length]) and one step per further position [batch, n, dim]; the last state."""
    out, state = attention.prefill(x[:, :prompt_length])
    rows = [out]
    for position in range(prompt_length, x.shape[1]):
        out, state = attention.step(x[:, position:position + 1], state)
        rows.append(out)
    return torch.cat(rows, dim=1), state


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("scale_coarse", [True, False])
@pytest.mark.parametrize("downsample", ["groupedconv", "avgpool", "multilevel", "multilevel per_level"])
def test_prefill_then_step_equals_one_forward(downsample, scale_coarse, rank):
    attention = layer(downsample, rank, scale_coarse)
    x = torch.randn(2, TOTAL, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = attention(x)
        for prompt_length in PROMPT_LENGTHS:
            out, _ = decoded(attention, x, prompt_length)
            torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12, msg=f"prompt {prompt_length}")


def levels_bound(downsample: str, n: int, attention) -> int:
    """The levels a state after n positions may hold: groupedconv's filter levels; else log2(n/m) + 2."""
    if downsample == "groupedconv":
        return len(attention.key_downsample.filter_shapes)
    return int(math.log2(max(n, M) / M)) + 2


@pytest.mark.parametrize("downsample", ["groupedconv", "avgpool", "multilevel"])
def test_state_size_grows_with_log_n_only(downsample):
    attention = layer(downsample, 2, True)
    head_dim = DIM // HEADS
    x = torch.randn(1, 200, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sizes = {n: sum(t.numel() for t in decoded(attention, x[:, :n], min(n, 20))[1]) // HEADS for n in (40, 200)}
    for n, size in sizes.items():
        assert size <= max_numel(M, 2, head_dim, levels_bound(downsample, n, attention)), (n, size)
    assert sizes[200] * 4 < 2 * 200 * head_dim, sizes  # far below a KV cache's 2 n d
    assert sizes[200] - sizes[40] <= 2 * head_dim * 4 * 2 * math.ceil(math.log2(200 / 40)), sizes


@pytest.mark.parametrize("prompt_length", [1, 17, 33])
def test_per_level_decodes_up_to_max_seq_len_and_refuses_the_next_step(prompt_length):
    """max_seq_len = 40 pads to 64: maps for 3 levels (widths 4, 8, 16), while a state after 32 positions would
    start a fourth (width 32) under shared maps. Every output up to 40 equals the forward's; step 41 is refused."""
    attention = layer("multilevel per_level", 2, True, max_seq_len=40)
    assert attention.key_downsample.num_levels == 3
    x = torch.randn(1, 41, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, state = decoded(attention, x[:, :40], prompt_length)
        torch.testing.assert_close(out, attention(x[:, :40]), rtol=1e-9, atol=1e-12)
        assert [level.width for level in state.levels] == [4, 8, 16]
        with pytest.raises(Exception, match=r"max_seq_len=40.*model\.attention\.max_seq_len="):
            attention.step(x[:, 40:], state)


def test_groupedconv_refuses_a_step_past_max_seq_len():
    attention = layer("groupedconv", 2, True, max_seq_len=16)
    x = torch.randn(1, 17, DIM, dtype=torch.float64)
    with torch.no_grad():
        _, state = attention.prefill(x[:, :16])
        with pytest.raises(Exception, match="max_seq_len=16"):
            attention.step(x[:, 16:], state)
