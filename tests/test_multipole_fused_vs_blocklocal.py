"""FMA's fused Triton kernels (fma/multipole/fused.py) against its torch path (fma/multipole/blocklocal.py),
and on the GPU against float64 and the reference (fma/multipole/naive.py); which paths `backend` picks.

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1) in one subprocess, since
the variable must be set before the kernels are defined and the rest of the suite imports `fma`
normally; that subprocess also poisons every output buffer with NaN (FMA_TRITON_POISON=1).
GPU (skipped without CUDA): float64 torch path on upcast copies as the ground truth, bf16 and fp32.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from attention_testing import relative_error  # noqa: E402
from fma import FastMultipoleAttention, multipole_attention  # noqa: E402
from fma.downsample import Downsample  # noqa: E402
from fma.indexing import level_widths, padded_length  # noqa: E402
from fma.multipole.naive import reference_multipole_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def random_inputs(n, *, block_size, rank, head_dim, batch, heads, dtype, device, seed, interior_padding=False):
    """Leaf tensors at the valid length for n: q, k, v, coarse_k, coarse_v, key_padding_mask, coarse_counts.

    The summaries come from random grouped-conv filters over the real tokens, as the module builds
    them; positions >= n, and with `interior_padding` about a quarter of the others, are padding.
    """
    generator = torch.Generator().manual_seed(seed)
    valid = padded_length(n, block_size)
    q, k, v = (torch.randn(batch, heads, valid, head_dim, generator=generator) for _ in range(3))
    mask = None
    if valid != n or interior_padding:
        mask = torch.zeros(batch, valid, dtype=torch.bool)
        if interior_padding:
            mask = torch.rand(batch, valid, generator=generator) < 0.25
        mask[:, n:] = True
    coarse = []
    for _ in range(2):
        downsample = Downsample("groupedconv", head_dim=head_dim, block_size=block_size, rank=rank, max_seq_len=valid)
        with torch.no_grad():
            for parameter in downsample.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        coarse.append(downsample(k if not coarse else v, mask))
    (coarse_k, counts), (coarse_v, _) = coarse
    to = dict(device=device, dtype=dtype)
    leaves = [x.detach().to(**to).requires_grad_() for x in (q, k, v, *coarse_k, *coarse_v)]
    levels = len(coarse_k)
    mask = None if mask is None else mask.to(device)
    counts = None if counts is None else [c.to(device) for c in counts]
    return leaves[0], leaves[1], leaves[2], leaves[3 : 3 + levels], leaves[3 + levels :], mask, counts


def outputs_and_gradients(backend, inputs, *, block_size, causal, scale_coarse=True, upcast=False, seed=0):
    """[out, dq, dk, dv, dcoarse_k..., dcoarse_v...] for a random output gradient (fixed by seed)."""
    q, k, v, coarse_k, coarse_v, mask, counts = inputs
    leaves = [q, k, v, *coarse_k, *coarse_v]
    if upcast:
        leaves = [x.detach().double().requires_grad_() for x in leaves]
    levels = len(coarse_k)
    out = multipole_attention(
        leaves[0], leaves[1], leaves[2], leaves[3 : 3 + levels], leaves[3 + levels :], block_size=block_size,
        causal=causal, scale_coarse=scale_coarse, key_padding_mask=mask, coarse_counts=counts, backend=backend,
    )
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def gradient_names(levels):
    return ["out", "dq", "dk", "dv"] + [f"d{kv}~ level {l}" for kv in "kv" for l in range(1, levels + 1)]


# CPU, under the Triton interpreter -----------------------------------------------------------------

INTERPRETER_CASES = {
    f"{'causal' if causal else 'bidirectional'}-n{n}-{masks}": dict(causal=causal, n=n, masks=masks)
    for causal in (True, False)
    for n, masks in [(64, "none"), (128, "none"), (128, "random-counts"), (128, "random-counts-unscaled"),
                     (100, "module-padding")]
}
# Many summaries per cell (as H-Transformer-1D's p = 8 at longer lengths): 3pL = 144 coarse slots, in
# three 64-slot coarse tiles
INTERPRETER_CASES["bidirectional-n512-p12-none"] = dict(causal=False, n=512, masks="none", rank=12, batch=1)


def run_interpreter_case(causal, n, masks, rank=2, batch=2):
    """Triton (interpreted) vs the torch backend in float32: {name: relative error}, plus empty-row checks."""
    m, p, d = 16, rank, 16
    seed = n + 2 * causal + len(masks)
    if masks == "module-padding":  # the module pads 100 -> 128 and builds mask and counts itself
        generator = torch.Generator().manual_seed(seed)
        layers = {}
        for backend in ("torch", "triton"):
            layer = FastMultipoleAttention(dim=2 * d, num_heads=2, causal=causal, block_size=m, rank=p,
                                           backend=backend, max_seq_len=128)
            if not layers:
                with torch.no_grad():
                    for parameter in layer.parameters():
                        parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
            else:
                layer.load_state_dict(layers["torch"].state_dict())
            layers[backend] = layer
        qkv = [torch.randn(2, 2, n, d, generator=generator) for _ in range(3)]
        mask = torch.rand(2, n, generator=generator) < 0.25
        mask[1, :20] = True  # causal: queries 0..19 of sequence 1 see no real key
        grad_out = torch.randn(2, 2, n, d, generator=generator)
        results = {}
        for backend, layer in layers.items():
            inputs = [x.clone().requires_grad_() for x in qkv]
            out = layer.attend(*inputs, mask)
            wrt = inputs + list(layer.key_downsample.parameters()) + list(layer.value_downsample.parameters())
            results[backend] = [out, *torch.autograd.grad(out, wrt, grad_out, materialize_grads=True)]
        names = ["out", "dq", "dk", "dv"]
        for basis in ("key_downsample", "value_downsample"):
            names += [f"d {basis}.{name}" for name, _ in getattr(layers["torch"], basis).named_parameters()]
        errors = {name: relative_error(a, b) for name, a, b in zip(names, results["triton"], results["torch"])}
        out = results["triton"][0]
        if causal:
            errors["empty rows exactly 0"] = 0.0 if (out[1, :, :20] == 0).all() else 1.0
        errors["all finite"] = 0.0 if all(torch.isfinite(x).all() for x in results["triton"]) else 1.0
        return errors

    inputs = random_inputs(n, block_size=m, rank=p, head_dim=d, batch=batch, heads=2,
                           dtype=torch.float32, device="cpu", seed=seed)
    if masks.startswith("random-counts"):  # padded fine keys, and summaries of 0..2 real tokens (0: masked)
        generator = torch.Generator().manual_seed(seed + 1)
        mask = torch.rand(2, n, generator=generator) < 0.3
        mask[1, :40] = True  # block 0 of sequence 1 sees no key (causal: at all)
        counts = [torch.randint(0, 3, (2, n // w * p), generator=generator).float() for w in level_widths(n, m)]
        inputs = (*inputs[:5], mask, counts)
    options = dict(block_size=m, causal=causal, scale_coarse=not masks.endswith("unscaled"), seed=seed)
    triton_results = outputs_and_gradients("triton", inputs, **options)
    torch_results = outputs_and_gradients("torch", inputs, **options)
    names = gradient_names(len(inputs[3]))
    errors = {name: relative_error(a, b) for name, a, b in zip(names, triton_results, torch_results)}
    if masks.startswith("random-counts") and causal:
        errors["empty rows exactly 0"] = 0.0 if (triton_results[0][1, :, :m] == 0).all() else 1.0
    return errors


def backend_routes() -> dict[str, list[str]]:
    """Per backend choice, the fused parts a CPU layer's forward and backward call (interpreted)."""
    from fma.downsample import fused as fused_downsample
    from fma.multipole import fused as fused_attention

    called = set()

    def spy(module, name, part):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            called.add(part)
            return original(*args, **kwargs)

        setattr(module, name, wrapped)

    spy(fused_attention, "triton_block_local_attention", "attention")
    spy(fused_downsample, "fused_summaries", "downsampling")
    routes = {}
    for backend in ("torch", "triton", "auto"):
        called.clear()
        layer = FastMultipoleAttention(dim=32, num_heads=2, causal=True, block_size=16, rank=2, backend=backend,
                                       max_seq_len=64)
        layer(torch.randn(1, 64, 32)).sum().backward()
        routes[backend] = sorted(called)
    return routes


@pytest.fixture(scope="module")
def interpreter_results():
    """Runs every interpreter case in one subprocess (this file as a script) and returns its JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FMA_TRITON_POISON": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--interpreter-cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(INTERPRETER_CASES))
def test_interpreted_kernels_match_torch_backend(interpreter_results, case):
    errors = interpreter_results["cases"][case]
    assert errors and all(error <= 1e-5 for error in errors.values()), errors


def test_backend_governs_attention_and_downsampling(interpreter_results):
    """torch: no kernel; triton: the attention kernels and the downsampling kernels; auto on the CPU: none."""
    assert interpreter_results["backend routes"] == {
        "torch": [], "triton": ["attention", "downsampling"], "auto": []}


def test_unsupported_shapes_and_devices_raise_clear_errors():
    from fma.multipole.fused import triton_block_local_attention

    def call(n=64, m=16, d=16, dtype=torch.float32):
        inputs = random_inputs(n, block_size=m, rank=2, head_dim=d, batch=1, heads=1, dtype=dtype,
                               device="cpu", seed=0)
        q, k, v, coarse_k, coarse_v, _, _ = inputs
        return triton_block_local_attention(q, k, v, coarse_k, coarse_v, block_size=m, rank=2, causal=True,
                                            scale_coarse=True, key_padding_mask=None, coarse_counts=None)

    with pytest.raises(ValueError, match="block_size"):
        call(n=32, m=8)
    with pytest.raises(ValueError, match="head_dim"):
        call(d=24)
    with pytest.raises(ValueError, match="dtype"):
        call(dtype=torch.float64)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA"):
            call()


# GPU ------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


@pytest.fixture
def exact_fp32_and_poisoned_outputs(monkeypatch):
    """TF32 off (fp32 dots in IEEE), and every kernel output allocated full of NaN."""
    monkeypatch.setenv("FMA_TRITON_POISON", "1")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def gpu_numerics(lengths: list[int]):
    """A GPU test at every dtype, both directions and these lengths (n), TF32 off, outputs poisoned."""
    def mark(test):
        for decorator in [
            pytest.mark.parametrize("n", lengths),
            pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"]),
            pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"]),
            pytest.mark.usefixtures("exact_fp32_and_poisoned_outputs"),
            cuda,
        ]:
            test = decorator(test)
        return test
    return mark


@gpu_numerics(lengths=[256, 4096])
def test_gpu_kernels_match_float64(n, causal, dtype):
    inputs = random_inputs(n, block_size=64, rank=2, head_dim=64, batch=2, heads=4, dtype=dtype,
                           device="cuda", seed=n + causal)
    actual = outputs_and_gradients("triton", inputs, block_size=64, causal=causal)
    expected = outputs_and_gradients("torch", inputs, block_size=64, causal=causal, upcast=True)
    for name, a, e in zip(gradient_names(len(inputs[3])), actual, expected):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}: not finite (an element not written?)"
        assert relative_error(a, e) <= TOLERANCE[dtype], name


@gpu_numerics(lengths=[256, 1000])
def test_gpu_module_matches_float64(n, causal, dtype):
    """Through FastMultipoleAttention (n=1000 is padded to 1024 and masked); gradients of q, k, v and
    of the learned summaries' parameters; at n=256 also against fma/multipole/naive.py."""
    generator = torch.Generator().manual_seed(n + causal)
    layer = FastMultipoleAttention(dim=256, num_heads=4, causal=causal, block_size=64, rank=2, max_seq_len=n)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    fast = copy.deepcopy(layer).to(device="cuda", dtype=dtype)
    fast.backend = "triton"
    exact = layer.to(device="cuda", dtype=torch.float64)
    qkv = [torch.randn(2, 4, n, 64, generator=generator).to(device="cuda", dtype=dtype) for _ in range(3)]
    grad_out = torch.randn(2, 4, n, 64, generator=generator).to("cuda")

    def run(model, attend, inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        out = attend(model, *inputs)
        wrt = inputs + list(model.key_downsample.parameters()) + list(model.value_downsample.parameters())
        return [out, *torch.autograd.grad(out, wrt, grad_out.to(out.dtype), materialize_grads=True)]

    actual = run(fast, lambda model, q, k, v: model.attend(q, k, v, None), qkv)
    expected = run(exact, lambda model, q, k, v: model.attend(q, k, v, None), [x.double() for x in qkv])
    names = ["out", "dq", "dk", "dv"] + [f"d {name}" for name, _ in exact.key_downsample.named_parameters()] + [
        f"d {name}" for name, _ in exact.value_downsample.named_parameters()]
    for name, a, e in zip(names, actual, expected):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        assert relative_error(a, e) <= TOLERANCE[dtype], name
    if n == 256:
        def reference(model, q, k, v):
            return reference_multipole_attention(q, k, v, model.key_downsample, model.value_downsample,
                                                 block_size=64, causal=causal, scale_coarse=True)
        from_reference = run(exact, reference, [x.double() for x in qkv])
        for name, a, e in zip(names, actual, from_reference):
            assert relative_error(a, e) <= TOLERANCE[dtype], f"{name} vs fma/multipole/naive.py"


@cuda
@pytest.mark.usefixtures("exact_fp32_and_poisoned_outputs")
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_gpu_every_supported_shape(block_size, head_dim):
    """Each supported (m, d) compiles and matches, causal and bidirectional, with padding."""
    for causal in (True, False):
        inputs = random_inputs(8 * block_size - 5, block_size=block_size, rank=2, head_dim=head_dim, batch=2,
                               heads=2, dtype=torch.bfloat16, device="cuda", seed=block_size + head_dim,
                               interior_padding=True)
        actual = outputs_and_gradients("triton", inputs, block_size=block_size, causal=causal)
        expected = outputs_and_gradients("torch", inputs, block_size=block_size, causal=causal, upcast=True)
        for name, a, e in zip(gradient_names(len(inputs[3])), actual, expected):
            assert torch.isfinite(a).all(), f"{name}: not finite"
            assert relative_error(a, e) <= 1e-2, f"{name}, causal={causal}"


@cuda
@pytest.mark.usefixtures("exact_fp32_and_poisoned_outputs")
def test_gpu_query_with_no_key_outputs_zero():
    inputs = random_inputs(256, block_size=64, rank=2, head_dim=64, batch=2, heads=4,
                           dtype=torch.bfloat16, device="cuda", seed=3)
    q, k, v, coarse_k, coarse_v, _, _ = inputs
    mask = torch.zeros(2, 256, dtype=torch.bool, device="cuda")
    mask[0, :100] = True  # causal: queries 0..99 of sequence 0 see nothing
    results = outputs_and_gradients("triton", (q, k, v, coarse_k, coarse_v, mask, None), block_size=64, causal=True)
    assert all(torch.isfinite(x).all() for x in results)
    assert (results[0][0, :, :100] == 0).all() and (results[0][0, :, 100:].abs().sum(-1) > 0).all()


if __name__ == "__main__" and sys.argv[1:] == ["--interpreter-cases"]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps({"cases": {name: run_interpreter_case(**case) for name, case in INTERPRETER_CASES.items()},
                      "backend routes": backend_routes()}))


@cuda
@pytest.mark.parametrize("n", [2**21, 2**22])
def test_gpu_millions_of_tokens_strided_equals_contiguous(n):
    """At 2M and 4M tokens a position times the stride of the qkv projection's view (3 * 8 * 64)
    passes 2^31: the kernels' offsets must be 64-bit. The same inputs as contiguous copies (small
    offsets) give the same outputs and fine gradients bitwise; the coarse gradients are summed by
    atomics, so only to rounding."""
    heads, d, m, p = 8, 64, 64, 2
    generator = torch.Generator("cuda").manual_seed(n)
    qkv = torch.randn(1, n, 3, heads, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    strided = [qkv[:, :, part].permute(0, 2, 1, 3) for part in range(3)]
    assert strided[0].stride(2) * n > 2**31
    levels = level_widths(n, m)
    coarse = [torch.randn(1, heads, n // w * p, d, device="cuda", dtype=torch.bfloat16, generator=generator)
              for w in levels * 2]
    grad_out = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=generator)

    def run(q, k, v):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, *coarse)]
        out = multipole_attention(*leaves[:3], leaves[3 : 3 + len(levels)], leaves[3 + len(levels) :], block_size=m,
                                  causal=True, scale_coarse=True, backend="triton")
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    actual = run(*strided)
    expected = run(*(x.contiguous() for x in strided))
    for name, a, e in zip(gradient_names(len(levels)), actual, expected):
        if name in ("out", "dq", "dk", "dv"):
            assert torch.equal(a, e), name
        else:
            assert relative_error(a, e) <= 1e-2, name
