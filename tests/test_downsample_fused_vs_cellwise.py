"""The fused Triton downsampling (fma/downsample/fused.py; multilevel through fma/downsample/multilevel.py)
against its torch path (fma/downsample/cellwise.py): one side, and keys and values together in one
launch (`summarise_sides`, as the FMA layer runs them), each side with its own parameters.

CPU: the kernels run under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set
before the kernels are defined, and must not leak into the rest of the suite), outputs NaN-poisoned; and,
without Triton, multilevel's effective filters and biases against `upward` in float64. GPU (skipped without
CUDA): the lead's shapes against a float64 run of the torch path, with NaN-poisoned outputs.
"""

import importlib.util
import json
import zlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention_testing import relative_error
from fma import ConfigurationError, FastMultipoleAttention
from fma.downsample import Downsample, summarise_sides
from fma.downsample.cellwise import summarise
from fma.downsample.multilevel import effective_filters, padded_biases
from fma.indexing import level_widths

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")

# Tile sizes that split d into several channel blocks and the (head, top cell) pairs into several
# groups with a masked tail (with 3 heads: 24 pairs in groups of 16).
SMALL_TILES = dict(FWD_E=16, FWD_BD=8, FWD_TOK=8, DX_E=16, DX_BD=8, DX_TOK=8, DW_E=16, DW_BD=8, DW_TOK=8)
# (kind, n, block_size m, rank p, padding, forward chunk or None for the automatic one, trainable, options);
# options: heads, tiles, maps (multilevel_maps), max_seq_len (default n).
CPU_CASES = [
    ("groupedconv", 64, 16, 1, False, None, True, {}),
    ("groupedconv", 64, 8, 2, True, None, True, {}),
    ("groupedconv", 128, 16, 3, False, None, True, {}),
    ("groupedconv", 128, 8, 2, True, 32, True, {}),
    ("groupedconv", 256, 8, 3, False, 8, True, {}),
    ("groupedconv", 256, 16, 2, True, 64, True, {}),
    ("groupedconv", 128, 8, 2, False, None, False, {}),  # frozen basis: only the input gradient
    ("groupedconv", 128, 16, 2, True, None, True, {"heads": 3, "tiles": SMALL_TILES}),
    ("groupedconv", 192, 48, 2, False, None, True, {}),  # m not a power of two: 16-token tiles
    ("avgpool", 64, 8, 2, True, None, True, {}),
    ("avgpool", 128, 16, 1, False, 16, True, {}),
    ("avgpool", 256, 8, 4, True, None, True, {"heads": 3, "tiles": SMALL_TILES}),
    ("multilevel", 64, 8, 2, False, None, True, {}),
    ("multilevel", 128, 8, 3, True, 32, True, {}),
    ("multilevel", 128, 16, 1, False, None, True, {"maps": "per_level", "max_seq_len": 256}),  # one map unused
    ("multilevel", 256, 16, 2, True, None, True, {"maps": "per_level"}),
    ("multilevel", 128, 8, 2, True, None, False, {"maps": "per_level"}),  # frozen basis: only the input gradient
    ("multilevel", 128, 8, 2, True, None, True, {"heads": 3, "tiles": SMALL_TILES}),
    ("multilevel", 384, 48, 2, True, None, True, {"maps": "per_level"}),  # m not a power of two
    # keys and values in one launch
    ("groupedconv", 128, 8, 2, True, 32, True, {"sides": 2}),
    ("groupedconv", 128, 16, 2, False, None, True, {"sides": 2, "heads": 3, "tiles": SMALL_TILES}),
    ("avgpool", 128, 8, 2, True, None, True, {"sides": 2}),
    ("multilevel", 128, 8, 2, True, None, True, {"sides": 2, "maps": "per_level"}),
]
BATCH, HEADS, HEAD_DIM = 2, 2, 16
CPU_TOLERANCE = 1e-5


def case_id(case) -> str:
    kind, n, m, p, padded, chunk, trainable, options = case
    return (f"{kind}-n{n}-m{m}-p{p}-{'pad' if padded else 'nopad'}-chunk{chunk}{'' if trainable else '-frozen'}"
            f"{'-h' + str(options['heads']) if 'heads' in options else ''}{'-small-tiles' if 'tiles' in options else ''}"
            f"{'-' + options['maps'] if 'maps' in options else ''}"
            f"{'-max' + str(options['max_seq_len']) if 'max_seq_len' in options else ''}"
            f"{'-sides' + str(options['sides']) if 'sides' in options else ''}")


def qkv_views(generator, sides, batch, heads, n, d, dtype=torch.float32, device="cpu"):
    """Non-contiguous [batch, heads, n, d] views, as the FMA layer gets keys (and values) from the projection."""
    qkv = torch.randn(batch, n, 3, heads, d, generator=generator, dtype=torch.float32).to(device, dtype)
    return [qkv[:, :, side].permute(0, 2, 1, 3) for side in (1, 2)[:sides]]


def padding_mask(generator, batch, n, device="cpu"):
    """About a quarter of the positions, plus a padded tail (as padding to a valid length gives)."""
    mask = torch.rand(batch, n, generator=generator) < 0.25
    mask[:, -n // 8 :] = True
    mask[:, 0] = False
    return mask.to(device)


def outputs_and_gradients(modules, xs, mask, grads, backend):
    """Per side (k, then v): summaries per level, then gradients of x and of every parameter (None
    where not trainable); grads: per side, per level."""
    xs = [x.detach().requires_grad_() for x in xs]
    sides, counts = summarise_sides(modules, xs, mask, backend=backend)
    torch.autograd.backward([s for side in sides for s in side],
                            [g.to(s.dtype) for side, side_grads in zip(sides, grads) for g, s in zip(side_grads, side)])
    results = {}
    for name, module, x, summaries in zip("kv", modules, xs, sides):
        named = dict(module.named_parameters())
        results.update({f"{name} level{level}": s.detach() for level, s in enumerate(summaries, 1)})
        results[f"{name} dx"] = x.grad
        results.update({f"{name} d {parameter}": p.grad for parameter, p in named.items() if p.grad is not None})
        for p in named.values():
            p.grad = None
    return results, sides, counts


def randomise(module, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def check_cpu_case(case) -> dict[str, float]:
    """Fused (interpreter) vs torch path on one case: {tensor name: relative error}."""
    from fma.downsample import fused

    kind, n, m, p, padded, chunk, trainable, options = case
    generator = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    sides = options.get("sides", 1)
    modules = [Downsample(kind, head_dim=HEAD_DIM, block_size=m, rank=p, max_seq_len=options.get("max_seq_len", n),
                          multilevel_maps=options.get("maps", "shared")) for _ in range(sides)]
    for module in modules:
        randomise(module, generator)
        module.requires_grad_(trainable)
    xs = qkv_views(generator, sides, BATCH, options.get("heads", HEADS), n, HEAD_DIM)
    mask = padding_mask(generator, BATCH, n) if padded else None
    fused.FORWARD_CHUNK = chunk
    defaults = {name: getattr(fused, name) for name in options.get("tiles", {})}
    for name, value in options.get("tiles", {}).items():
        setattr(fused, name, value)
    grads = [[torch.randn(s.shape, generator=generator) for s in module(x, mask, backend="torch")[0]]
             for module, x in zip(modules, xs)]
    expected, _, counts_ref = outputs_and_gradients(modules, xs, mask, grads, backend="torch")
    actual, sides_out, counts = outputs_and_gradients(modules, xs, mask, grads, backend="triton")
    assert set(actual) == set(expected), (set(actual), set(expected))
    assert all(s._base is sides_out[0][0]._base for side in sides_out for s in side), "levels are not views of one buffer"
    assert (counts is None) == (counts_ref is None)
    if kind == "multilevel" and padded:  # some parent drops an empty child: the bias correction matters
        assert any((c == 0).any() for c in counts[:-1]), "no empty child cell"
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    if counts is not None:
        errors["counts"] = max(relative_error(a, b) for a, b in zip(counts, counts_ref))
    for name, value in defaults.items():
        setattr(fused, name, value)
    return errors


@pytest.fixture(scope="module")
def interpreter_results():
    """Runs every CPU case in one subprocess under TRITON_INTERPRET=1 (one interpreter start)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FMA_TRITON_POISON": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--interpreter-cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_fused_matches_torch_path_under_interpreter(interpreter_results, case):
    errors = interpreter_results[case_id(case)]
    assert "error" not in errors, errors.get("error")
    trainable, sides = case[6], case[7].get("sides", 1)
    for side in "kv"[:sides]:
        assert f"{side} dx" in errors and f"{side} level1" in errors
        assert trainable == (f"{side} d weight" in errors) or case[0] == "avgpool"
    bad = {name: err for name, err in errors.items() if not err <= CPU_TOLERANCE}
    assert not bad, bad


@pytest.mark.parametrize("maps", ["shared", "per_level"])
@pytest.mark.parametrize("n, m, p", [(32, 4, 2), (64, 8, 3), (128, 4, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_multilevel_effective_filters_reproduce_upward(maps, n, m, p, padded):
    """No Triton: multilevel as the fused path runs it (groupedconv of every level with the effective
    filters W_l^eff and biases beta_l; padded: zero biases plus `padded_biases`) equals the torch path's
    `upward` in float64, summaries and the gradients of x, weight and bias."""
    generator = torch.Generator().manual_seed(n + 10 * p + padded)
    module = Downsample("multilevel", head_dim=4, block_size=m, rank=p, max_seq_len=n, multilevel_maps=maps).double()
    randomise(module, generator)
    x = torch.randn(2, 3, n, 4, generator=generator, dtype=torch.float64).requires_grad_()
    mask = padding_mask(generator, 2, n) if padded else None
    expected, counts = module(x, mask, backend="torch")
    widths = level_widths(n, m)
    parameters = module.parameters_of_levels(len(widths))
    filters, biases = effective_filters(parameters)
    assert filters.shape == (p * sum(widths), 4) and biases.shape == (len(widths) * p, 4)
    zero_filled = x if mask is None else x.masked_fill(mask[:, None, :, None], 0)
    starts = [p * sum(widths[:level]) for level in range(len(widths) + 1)]
    levels = [summarise("groupedconv", zero_filled, width, p, filters[start:end].view(p, width, 4),
                        biases[level * p:(level + 1) * p] * (mask is None), None)
              for level, (width, start, end) in enumerate(zip(widths, starts, starts[1:]))]
    actual = torch.cat(levels, 2)
    if mask is not None:
        assert any((c == 0).any() for c in counts[:-1]), "no empty child cell"
        actual = actual + padded_biases(parameters, counts, n, m)
    grad = torch.randn(actual.shape, generator=generator, dtype=torch.float64)
    wrt = [x, module.weight, module.bias]
    expected_grads = torch.autograd.grad(torch.cat(expected, 2), wrt, grad)
    actual_grads = torch.autograd.grad(actual, wrt, grad)
    assert relative_error(actual, torch.cat(expected, 2)) < 1e-12
    for name, a, e in zip(["dx", "d weight", "d bias"], actual_grads, expected_grads):
        assert relative_error(a, e) < 1e-12, name


def test_cpu_inputs_take_the_torch_path_and_import_no_triton():
    code = (
        "import sys, torch; from fma.downsample import Downsample\n"
        "m = Downsample('groupedconv', head_dim=8, block_size=4, rank=2, max_seq_len=64)\n"
        "x = torch.randn(1, 2, 64, 8)\n"
        "assert m.resolved_backend(x, 'auto') == 'torch'\n"
        "m(x); import fma\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_triton_backend_without_a_kernel_is_refused():
    """conv has no fused kernel, and the CPU runs none outside the interpreter: backend=triton says so
    (it does not quietly run the torch path, nor fail inside a kernel launch)."""
    x = torch.randn(1, 2, 64, 8)
    with pytest.raises(ConfigurationError, match="model.attention.backend="):
        Downsample("conv", head_dim=8, block_size=4, rank=2, max_seq_len=64).resolved_backend(x, "triton")
    with pytest.raises(ConfigurationError, match="model.attention.backend="):
        FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=4, downsample="conv", backend="triton")
    assert Downsample("conv", head_dim=8, block_size=4, rank=2, max_seq_len=64).resolved_backend(x, "auto") == "torch"
    if not os.environ.get("TRITON_INTERPRET"):  # on the CPU, outside the interpreter, the kernels cannot run
        layer = FastMultipoleAttention(dim=16, num_heads=2, causal=True, block_size=4, backend="triton")
        with pytest.raises(ConfigurationError, match="model.attention.backend=auto"):
            layer(torch.randn(1, 64, 16))


# GPU ----------------------------------------------------------------------------------------------

GPU_BATCH, GPU_HEADS, GPU_DIM, GPU_BLOCK, GPU_RANK = 2, 8, 64, 64, 2


@needs_cuda
@pytest.mark.parametrize("kind", ["groupedconv", "avgpool", "multilevel", "multilevel per_level"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n, padded", [(1024, False), (1024, True), (65536, False)])
def test_gpu_fused_matches_float64(monkeypatch, kind, dtype, tolerance, n, padded):
    """kind: a kind, or "multilevel per_level" (multilevel_maps=per_level)."""
    monkeypatch.setenv("FMA_TRITON_POISON", "1")  # unwritten elements stay NaN
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    kind, *maps = kind.split()
    options = dict(head_dim=GPU_DIM, block_size=GPU_BLOCK, rank=GPU_RANK, max_seq_len=n,
                   multilevel_maps=maps[0] if maps else "shared")
    generator = torch.Generator().manual_seed(n + (dtype == torch.float32))
    modules = [Downsample(kind, **options) for _ in "kv"]  # keys and values, in one launch as the layer runs them
    for module in modules:
        randomise(module, generator)
    modules = [module.cuda() for module in modules]
    xs = qkv_views(generator, 2, GPU_BATCH, GPU_HEADS, n, GPU_DIM, dtype, "cuda")
    mask = padding_mask(generator, GPU_BATCH, n, "cuda") if padded else None
    grads = [[torch.randn(s.shape, generator=generator).to("cuda", dtype) for s in module(x.double(), mask,
                                                                                         backend="torch")[0]]
             for module, x in zip(modules, xs)]

    actual, sides, _ = outputs_and_gradients(modules, xs, mask, grads, backend="auto")  # CUDA: fused
    assert sides[0][0].dtype == dtype and sides[0][0]._base is not None
    for name, value in actual.items():
        assert not value.isnan().any(), f"{name}: unwritten (NaN) elements"
    references = []
    for module in modules:
        reference = Downsample(kind, **options)
        reference.load_state_dict(module.state_dict())
        references.append(reference.cuda().double())
    expected, _, _ = outputs_and_gradients(references, [x.double() for x in xs], mask,
                                           [[g.double() for g in side] for side in grads], backend="torch")
    assert set(actual) == set(expected)
    bad = {name: relative_error(actual[name], expected[name]) for name in expected}
    bad = {name: err for name, err in bad.items() if not err <= tolerance}
    assert not bad, bad


# Interpreter subprocess entry -----------------------------------------------------------------------

if __name__ == "__main__" and sys.argv[1:] == ["--interpreter-cases"]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    report = {}
    for case in CPU_CASES:
        try:
            report[case_id(case)] = check_cpu_case(case)
        except Exception as error:  # report it against its case rather than losing the others
            report[case_id(case)] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(report))
