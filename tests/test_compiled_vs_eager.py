"""torch.compile against eager: outputs and gradients of compiled attention layers equal eager ones.

CPU: FMA's torch path, compiled whole (no graph break), both directions; FMA's Triton path under the
Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported): its
registered operators pass torch.library.opcheck and the layer compiles with fullgraph=True.
GPU (skipped without CUDA): every kind, both directions, bf16 autocast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention_testing import relative_error
from fma import ATTENTION_KINDS, build_attention
from train import EAGER_ON_AUTO

ROOT = Path(__file__).resolve().parents[1]
# Options giving each kind several blocks, chunks, buckets or levels at length 100.
SMALL = {"fma": dict(block_size=16, rank=2, max_seq_len=128), "full": {}, "local": dict(window=16),
         "linear": dict(chunk_size=16), "htransformer": dict(block_size=8), "reformer": dict(n_buckets=4, chunk_size=16),
         "fastmax": dict(chunk_size=16), "linformer": dict(k=16, max_seq_len=256),
         "nystromformer": dict(num_landmarks=8, conv_kernel_size=5)}
CAUSAL = [kind for kind in SMALL if ATTENTION_KINDS[kind].has_causal_form]


def compiled_and_eager(kind, causal, device="cpu", dtype=torch.float32, **options):
    """[output, input gradient, parameter gradients...] of one layer, eager then compiled (fullgraph)."""
    torch.manual_seed(0)
    layer = build_attention(kind, dim=32, num_heads=2, causal=causal, **{**SMALL[kind], **options}).to(device).eval()
    x = torch.randn(2, 100, 32, device=device, generator=torch.Generator(device).manual_seed(1))
    results = []
    for run in (layer, torch.compile(layer, fullgraph=True)):
        inputs = x.detach().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = run(inputs)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), [inputs, *layer.parameters()])])
    torch._dynamo.reset()  # each layer is a new module: do not pile up recompilations of shared code
    return results


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_compiled_fma_torch_path_matches_eager(causal):
    eager, compiled = compiled_and_eager("fma", causal, backend="torch")
    for a, e in zip(compiled, eager):
        assert relative_error(a, e) <= 1e-5


def interpreted_kernels_compile() -> dict[str, float]:
    """Under the interpreter: opcheck of FMA's two forward operators (schema, fake tensors, autograd
    registration, AOT dispatch), then the Triton layer compiled vs eager: {name: relative error}."""
    from torch.library import opcheck

    from fma.downsample.fused import summaries_forward, summary_tables
    from fma.multipole.fused import _coarse_index, multipole_forward

    generator = torch.Generator().manual_seed(2)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    n, m, p, d = 64, 16, 2, 16  # one coarse level of 64 / 16 * 2 = 8 summaries
    opcheck(multipole_forward, (leaf(1, 2, n, d), leaf(1, 2, n, d), leaf(1, 2, n, d), leaf(1, 2, 8, d),
                                leaf(1, 2, 8, d), None, torch.zeros(1, 8), _coarse_index(n, m, p, True, torch.device("cpu")),
                                m, True))
    tables = summary_tables(n, m, p, torch.device("cpu"))
    opcheck(summaries_forward, (leaf(1, 2, n, d), None, leaf(p * d * m), None, leaf(p * d), None, None,
                                *tables, m, p, False))
    opcheck(summaries_forward, (leaf(1, 2, n, d), leaf(1, 2, n, d), leaf(p * d * m), leaf(p * d * m), leaf(p * d),
                                leaf(p * d), None, *tables, m, p, False))  # keys and values in one launch
    eager, compiled = compiled_and_eager("fma", True, backend="triton")
    return {f"tensor {i}": relative_error(a, e) for i, (a, e) in enumerate(zip(compiled, eager))}


def test_compiled_fma_kernels_match_eager_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--interpreter"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors and all(error <= 1e-5 for error in errors.values()), errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind, causal", [(kind, causal) for kind in SMALL for causal in (True, False)
                                          if causal <= (kind in CAUSAL)])
def test_gpu_every_kind_compiles_and_matches_eager(kind, causal):
    """bf16 autocast as in training: compiled and eager may round differently, within bf16's 1e-2."""
    eager, compiled = compiled_and_eager(kind, causal, device="cuda", dtype=torch.bfloat16)
    for a, e in zip(compiled, eager):
        assert relative_error(a, e) <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind, objective", [(kind, "clm" if kind in CAUSAL else "mlm") for kind in SMALL
                                             if kind not in EAGER_ON_AUTO] + [("full", "mlm"), ("fma", "mlm")])
def test_gpu_train_py_with_cuda_graphs_trains_like_eager(tmp_path, kind, objective):
    """compile=auto on one GPU (CUDA graphs) through train.py, every kind auto compiles (EAGER_ON_AUTO's
    crash the process, which no test can catch), where graphs are made (graph trees refuse, e.g.,
    tensors cached inside an operator that outlive a replay): the losses of eager, to bf16 rounding.
    Reformer hashes with its fixed rotations, as both runs must draw the same."""
    from conftest import compose_config, logged, read_metrics
    from train import train

    options = [f"model.attention.{key}={value}" for key, value in SMALL[kind].items() if key != "max_seq_len"]
    run = ["trainer=gpu", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"model={kind}", *options,
           *(["model.attention.fresh_rotations=false"] if kind == "reformer" else []), f"objective={objective}",
           "model.dim=64", "model.depth=1", "model.num_heads=2", "model.dropout=0.0", "data.seq_len=256",
           "data.batch_size=4", "optim.warmup_steps=2", "test=false"]
    train(compose_config(tmp_path / "eager", [*run, "compile=false"], tiny=False))
    train(compose_config(tmp_path / "graphs", [*run, "compile=auto"], tiny=False))
    torch._dynamo.reset()
    expected, got = (logged(read_metrics(tmp_path / name / "run"), "train/loss") for name in ("eager", "graphs"))
    assert sorted(got) == sorted(expected)
    assert all(got[step] == pytest.approx(expected[step], rel=2e-2) for step in expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_train_py_steps_never_wait_for_the_gpu(tmp_path):
    """Steps 4-6 of train.py on one GPU (CUDA graphs, fused AdamW, clipping, the callbacks, logging off
    those steps) run under torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises (a
    copy from pageable memory, .item(), a number logged to the GPU)."""
    from conftest import compose_config
    from train import train

    cfg = compose_config(tmp_path, ["trainer=gpu", "trainer.max_steps=8", "trainer.log_every_n_steps=50",
                                    "trainer.val_check_interval=50", "trainer.enable_progress_bar=false",
                                    "model=fma", "model.dim=64", "model.depth=1", "model.num_heads=2",
                                    "data.seq_len=256", "data.batch_size=4", "test=false",
                                    "+callbacks.no_sync._target_=test_compiled_vs_eager.no_sync_window"], tiny=False)
    try:
        train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch._dynamo.reset()


def no_sync_window():
    import lightning as L

    class Window(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            torch.cuda.set_sync_debug_mode("error" if 3 <= trainer.global_step < 6 else "default")

    return Window()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_profile_of_a_train_py_run(tmp_path):
    """models.KernelProfile through train.py under CUDA graphs: the steps it names, kernels that ran,
    busy time within kernel time (their union), at least one launch per step."""
    from conftest import compose_config
    from train import train

    path = tmp_path / "profile.json"
    train(compose_config(tmp_path, ["trainer=gpu", "trainer.max_steps=8", "trainer.enable_progress_bar=false",
                                    "model=fma", "model.dim=64", "model.depth=1", "model.num_heads=2",
                                    "data.seq_len=256", "data.batch_size=4", "test=false",
                                    "+callbacks.kernel_profile._target_=models.KernelProfile",
                                    f"+callbacks.kernel_profile.path={path}", "+callbacks.kernel_profile.start_step=3",
                                    "+callbacks.kernel_profile.steps=4"], tiny=False))
    torch._dynamo.reset()
    profile = json.loads(path.read_text())
    summary = profile["summary"]
    assert summary["steps"] == [4, 7] and summary["kernels"] > 0 and summary["launches"] >= 1
    assert 0 < summary["gpu_busy_ms"] <= summary["kernel_ms"] + 1e-9 < summary["profiled_wall_ms"] * 4
    assert sum(k["ms"] for k in profile["kernels"]) == pytest.approx(summary["kernel_ms"])
    assert path.with_suffix(".md").read_text().startswith("Steps 4-7:")


if __name__ == "__main__" and sys.argv[1:] == ["--interpreter"]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(interpreted_kernels_compile()))
