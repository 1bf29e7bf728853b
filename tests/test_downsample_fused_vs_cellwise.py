"""The fused Triton downsampling (fma/downsample/fused.py) against its torch path (fma/downsample/cellwise.py).

CPU: the kernels run under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set
before the kernels are defined, and must not leak into the rest of the suite), outputs NaN-poisoned. GPU (skipped without
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
from fma.downsample import Downsample

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")

# Tile sizes that split d into several channel blocks and the (head, top cell) pairs into several
# groups with a masked tail (with 3 heads: 24 pairs in groups of 16).
SMALL_TILES = dict(FWD_E=16, FWD_BD=8, FWD_TOK=8, DX_E=16, DX_BD=8, DX_TOK=8, DW_E=16, DW_BD=8, DW_TOK=8)
# (kind, n, block_size m, rank p, padding, forward chunk or None for the automatic one, trainable, options)
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
]
BATCH, HEADS, HEAD_DIM = 2, 2, 16
CPU_TOLERANCE = 1e-5


def case_id(case) -> str:
    kind, n, m, p, padded, chunk, trainable, options = case
    return (f"{kind}-n{n}-m{m}-p{p}-{'pad' if padded else 'nopad'}-chunk{chunk}{'' if trainable else '-frozen'}"
            f"{'-h' + str(options['heads']) if 'heads' in options else ''}{'-small-tiles' if 'tiles' in options else ''}")


def qkv_view(generator, batch, heads, n, d, dtype=torch.float32, device="cpu"):
    """A non-contiguous [batch, heads, n, d] view, as the FMA layer gets keys from the projection."""
    qkv = torch.randn(batch, n, 3, heads, d, generator=generator, dtype=torch.float32).to(device, dtype)
    return qkv[:, :, 1].permute(0, 2, 1, 3)


def padding_mask(generator, batch, n, device="cpu"):
    """About a quarter of the positions, plus a padded tail (as padding to a valid length gives)."""
    mask = torch.rand(batch, n, generator=generator) < 0.25
    mask[:, -n // 8 :] = True
    mask[:, 0] = False
    return mask.to(device)


def outputs_and_gradients(module, x, mask, grads, backend):
    """Summaries per level, then gradients of x and of every parameter (None where not trainable)."""
    x = x.detach().requires_grad_()
    summaries, counts = module(x, mask, backend=backend)
    torch.autograd.backward(summaries, [g.to(s.dtype) for g, s in zip(grads, summaries)])
    named = dict(module.named_parameters())
    results = {f"level{level}": s.detach() for level, s in enumerate(summaries, 1)}
    results["dx"] = x.grad
    results.update({f"d {name}": p.grad for name, p in named.items() if p.grad is not None})
    for p in named.values():
        p.grad = None
    return results, summaries, counts


def randomise(module, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def check_cpu_case(case) -> dict[str, float]:
    """Fused (interpreter) vs torch path on one case: {tensor name: relative error}."""
    from fma.downsample import fused

    kind, n, m, p, padded, chunk, trainable, options = case
    generator = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    module = Downsample(kind, head_dim=HEAD_DIM, block_size=m, rank=p, max_seq_len=n)
    randomise(module, generator)
    module.requires_grad_(trainable)
    x = qkv_view(generator, BATCH, options.get("heads", HEADS), n, HEAD_DIM)
    mask = padding_mask(generator, BATCH, n) if padded else None
    fused.FORWARD_CHUNK = chunk
    defaults = {name: getattr(fused, name) for name in options.get("tiles", {})}
    for name, value in options.get("tiles", {}).items():
        setattr(fused, name, value)
    probe, _ = module(x, mask, backend="torch")
    grads = [torch.randn(s.shape, generator=generator) for s in probe]
    expected, _, counts_ref = outputs_and_gradients(module, x, mask, grads, backend="torch")
    actual, summaries, counts = outputs_and_gradients(module, x, mask, grads, backend="triton")
    assert set(actual) == set(expected), (set(actual), set(expected))
    assert all(s._base is summaries[0]._base for s in summaries), "levels are not views of one buffer"
    assert (counts is None) == (counts_ref is None)
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
    trainable = case[6]
    assert "dx" in errors and any(name.startswith("level") for name in errors)
    assert trainable == any(name.startswith("d weight") for name in errors) or case[0] == "avgpool"
    bad = {name: err for name, err in errors.items() if not err <= CPU_TOLERANCE}
    assert not bad, bad


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
@pytest.mark.parametrize("kind", ["groupedconv", "avgpool"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n, padded", [(1024, False), (1024, True), (65536, False)])
def test_gpu_fused_matches_float64(monkeypatch, kind, dtype, tolerance, n, padded):
    monkeypatch.setenv("FMA_TRITON_POISON", "1")  # unwritten elements stay NaN
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    generator = torch.Generator().manual_seed(n + (dtype == torch.float32))
    module = Downsample(kind, head_dim=GPU_DIM, block_size=GPU_BLOCK, rank=GPU_RANK, max_seq_len=n)
    randomise(module, generator)
    module = module.cuda()
    x = qkv_view(generator, GPU_BATCH, GPU_HEADS, n, GPU_DIM, dtype, "cuda")
    mask = padding_mask(generator, GPU_BATCH, n, "cuda") if padded else None
    probe, _ = module(x.double(), mask, backend="torch")
    grads = [torch.randn(s.shape, generator=generator).to("cuda", dtype) for s in probe]
    del probe

    actual, summaries, _ = outputs_and_gradients(module, x, mask, grads, backend="auto")  # CUDA: fused
    assert summaries[0].dtype == dtype and summaries[0]._base is not None
    for name, value in actual.items():
        assert not value.isnan().any(), f"{name}: unwritten (NaN) elements"
    reference = Downsample(kind, head_dim=GPU_DIM, block_size=GPU_BLOCK, rank=GPU_RANK, max_seq_len=n)
    reference.load_state_dict(module.state_dict())
    reference = reference.cuda().double()
    expected, _, _ = outputs_and_gradients(reference, x.double(), mask, [g.double() for g in grads], backend="torch")
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
