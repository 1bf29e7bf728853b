"""Context-parallel FMA (fma/context_parallel/): with the sequence split over 2, 4 and 8 gloo processes, every
rank's outputs and input gradients equal its rows of the single-process layer's and model's, and the
parameter gradients summed over ranks equal the single-process ones (float64, 1e-12), causal and
bidirectional, for every downsampling kind; at 8 ranks the coarsest cells span two chunks. Without processes:
the chunks' shares of wide cells add up to the summaries, the exchange's size, the refusals."""

import pytest
import torch
import torch.distributed as dist

from distributed_testing import spawn
from fma import ConfigurationError
from fma.context_parallel import (check_chunks, context_parallel, context_parallel_multipole_attention,
                                  exchanged_numel, make_plan)
from fma.context_parallel.multipole import chunk_summaries
from fma.downsample import Downsample
from fma.indexing import level_widths
from fma.multipole import FastMultipoleAttention
from models.transformer import TransformerLM

DIM, HEADS, TOLERANCE = 8, 2, dict(rtol=0, atol=1e-12)
KINDS = ("groupedconv", "avgpool", "multilevel", "conv")


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """module in float64 with every downsampling parameter moved off its averaging start (levels differ)."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, Downsample):
                for parameter in sub.parameters():
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def summed_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient summed over the ranks (None as zeros)."""
    grads = {}
    for name, parameter in module.named_parameters():
        grad = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone()
        dist.all_reduce(grad)
        grads[name] = grad
    return grads


def compare_with_one_process(module, forward, forward_chunk, inputs, weights, chunk_of):
    """forward(inputs) on the whole sequence, forward_chunk(this rank's chunk) here: outputs, the input's
    gradient (float inputs) and the parameter gradients summed over ranks must agree."""
    module.zero_grad()
    full = inputs.clone().requires_grad_(inputs.is_floating_point())
    expected = forward(full)
    (expected * weights).sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    part = chunk_of(inputs).clone().requires_grad_(inputs.is_floating_point())
    out = forward_chunk(part)
    (out * chunk_of(weights)).sum().backward()
    torch.testing.assert_close(out, chunk_of(expected), **TOLERANCE)
    if inputs.is_floating_point():
        torch.testing.assert_close(part.grad, chunk_of(full.grad), **TOLERANCE)
    for name, grad in summed_grads(module).items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=name)


def check_layer(rank, world, *, causal, kind, n, block_size, p, scale_coarse=True):
    torch.manual_seed(0)
    layer = perturbed(FastMultipoleAttention(dim=DIM, num_heads=HEADS, causal=causal, block_size=block_size, rank=p,
                                             downsample=kind, scale_coarse=scale_coarse, backend="torch",
                                             max_seq_len=n), seed=1)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, n, DIM, dtype=torch.float64, generator=generator)
    weights = torch.randn(2, n, DIM, dtype=torch.float64, generator=generator)
    chunk = n // world

    def forward_chunk(part):
        return layer.merge_heads(context_parallel_multipole_attention(*layer.project(part), layer=layer))

    compare_with_one_process(layer, layer, forward_chunk, x, weights,
                             lambda t: t[:, rank * chunk:(rank + 1) * chunk])


def check_model(rank, world, *, causal, kind, n):
    torch.manual_seed(0)
    attention = dict(name="fma", block_size=4, rank=2, downsample=kind, backend="torch", max_seq_len=n)
    model = perturbed(TransformerLM(vocab_size=16, causal=causal, attention=attention, dim=16, depth=2,
                                    num_heads=2, dropout=0.0), seed=3)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(16, (2, n), generator=generator)
    weights = torch.randn(2, n, 16, dtype=torch.float64, generator=generator)
    chunk = n // world

    def forward_chunk(part):
        with context_parallel(model):
            return model(part)

    compare_with_one_process(model, model, forward_chunk, tokens, weights,
                             lambda t: t[:, rank * chunk:(rank + 1) * chunk])
    assert "attend" not in model.blocks[0].attention.__dict__ and "embed" not in model.__dict__  # restored


def check_refusals(rank, world):
    layer = FastMultipoleAttention(dim=DIM, num_heads=HEADS, causal=True, block_size=4, backend="torch",
                                   downsample="avgpool").double()
    q = torch.zeros(1, HEADS, 6, DIM // HEADS, dtype=torch.float64)  # chunks of 6 tokens: not whole blocks
    with pytest.raises(ConfigurationError, match="padded_length"):
        context_parallel_multipole_attention(q, q, q, layer=layer)


LAYER_CASES = [dict(causal=causal, kind=kind) for causal in (True, False) for kind in KINDS]


def test_two_ranks_equal_one_process(tmp_path):
    """n = 32, m = 4: chunks of 16, levels of width 4 and 8 inside them; one sequence of 4 blocks (chunks of
    2 blocks: every query's fine neighbour is on the other rank); the whole model, both objectives."""
    checks = [(check_layer, dict(case, n=32, block_size=4, p=2)) for case in LAYER_CASES]
    checks += [(check_layer, dict(causal=True, kind="groupedconv", n=16, block_size=4, p=1, scale_coarse=False)),
               (check_layer, dict(causal=False, kind="avgpool", n=16, block_size=4, p=4, scale_coarse=False)),
               (check_model, dict(causal=True, kind="groupedconv", n=32)),
               (check_model, dict(causal=False, kind="multilevel", n=32)),
               (check_refusals, {})]
    spawn(2, checks, tmp_path)


def test_four_ranks_equal_one_process(tmp_path):
    """n = 64, m = 4: chunks of 16, the coarsest cell (16) is exactly one chunk."""
    checks = [(check_layer, dict(case, n=64, block_size=4, p=2)) for case in LAYER_CASES]
    checks += [(check_model, dict(causal=True, kind="avgpool", n=64))]
    spawn(4, checks, tmp_path)


def test_eight_ranks_with_cells_wider_than_a_chunk(tmp_path):
    """n = 64, m = 2: chunks of 8, cells of width 16 span two chunks (their summaries are shares summed)."""
    checks = [(check_layer, dict(case, n=64, block_size=2, p=2)) for case in LAYER_CASES]
    checks += [(check_model, dict(causal=True, kind="multilevel", n=64))]
    spawn(8, checks, tmp_path)


@pytest.mark.parametrize("kind, options", [*((kind, {}) for kind in KINDS),
                                           ("multilevel", {"multilevel_maps": "per_level"})])
def test_shares_of_wide_cells_add_up_to_the_summaries(kind, options):
    """16 simulated chunks of 8 tokens, n = 128, m = 2: the shares of every level's cells of width 16 and 32
    (2 and 4 chunks each), summed over their chunks, equal the summaries of the whole sequence (per_level
    multilevel: each level's own map)."""
    torch.manual_seed(0)
    n, m, world = 128, 2, 16
    downsample = perturbed(Downsample(kind, head_dim=4, block_size=m, rank=2, max_seq_len=n, **options), seed=5)
    x = torch.randn(2, 3, n, 4, dtype=torch.float64)
    expected, _ = downsample(x, backend="torch")
    chunk = n // world
    shares = [chunk_summaries(downsample, x[:, :, r * chunk:(r + 1) * chunk], r * chunk, n) for r in range(world)]
    for level, width in enumerate(level_widths(n, m)):
        if width <= chunk:
            got = torch.cat([share[level] for share in shares], dim=2)
        else:
            per_cell = width // chunk
            got = torch.cat([sum(shares[r][level] for r in range(cell * per_cell, (cell + 1) * per_cell))
                             for cell in range(n // width)], dim=2)
        torch.testing.assert_close(got, expected[level], **TOLERANCE, msg=f"width {width}")


@pytest.mark.parametrize("causal", [True, False])
def test_exchange_is_m_plus_p_per_level_not_n(causal):
    """What a rank receives per layer (keys, per channel): the previous block (bidirectional: and the next),
    at most 2 cells (bidirectional 6) per level inside a chunk and the shares of the wider levels' cells, far
    below what ring attention passes (n - c); at a fixed number of ranks it grows with log n only."""
    m, p, world = 64, 2, 8
    sizes = []
    for n in (2**14, 2**16, 2**18):
        chunk = n // world
        plan = make_plan(n, chunk, world, m, p, causal)
        inside = sum(w <= chunk for w in plan.widths)
        wide = [w // chunk for w in plan.widths if w > chunk]
        bound = (m if causal else 2 * m) + p * ((2 if causal else 6) * inside + (2 if causal else 6) * sum(wide))
        received = [exchanged_numel(plan, r) for r in range(world)]
        assert max(received) <= bound, (n, received, bound)
        assert max(received) * 50 < n - chunk
        sizes.append(max(received))
    assert sizes[1] - sizes[0] == sizes[2] - sizes[1] <= 2 * (6 if not causal else 2) * p  # + O(p) per doubling


def test_chunks_must_be_whole_blocks_of_a_valid_length():
    assert check_chunks(16, 4, 4) == 64
    for chunk, world in ((6, 2), (12, 2), (4, 2)):  # 6: not whole blocks; 24: not m 2^k; 8: fewer than 4 blocks
        with pytest.raises(ConfigurationError, match="padded_length"):
            check_chunks(chunk, world, 4)

