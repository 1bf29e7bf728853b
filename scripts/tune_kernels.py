"""Time FMA's Triton kernels under alternative tile shapes and launch parameters, on CUDA.

    python scripts/tune_kernels.py [--shapes 4096x16 16384x4 65536x1] [--heads 8] [--head-dim 64]
        [--block-size 64] [--rank 2] [--bidirectional] [--out benchmarks/tune_kernels]

Per shape (sequence length x batch; bf16, the layout train.py's layers hand the kernels: q, k, v as
views of one qkv projection), each kernel is timed alone (triton.testing.do_bench, median) with its
current launch parameters and with every candidate below, the other kernels left as they are:
  attention (fma/multipole/fused.py `launch_config`): forward, backward_query, backward_key;
    BLOCK_N (fine key tile) x num_warps x num_stages;
  downsampling (fma/downsample/fused.py, keys and values in one launch): forward, grad_input, grad_weight;
    E (pairs per tile) x BD (channels) x TOK (tokens per tile) x num_warps.
A candidate's outputs must equal the current parameters' to bf16 rounding (else it is reported as
wrong, never as fastest). A candidate that does not compile or run is reported with its error; one
that faults on the GPU (which ends the process's CUDA context) is reported as such: the candidates
run in a worker process, restarted after the faulting one.
Writes tune_kernels.{md,json} under --out and prints the table of the best candidate per kernel
and shape: the evidence for the defaults those two modules fix.
"""

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

from benchlib import environment, markdown_table, require_cuda, write_reports


def relative_error(result, reference) -> float:
    pairs = zip(result, reference) if isinstance(reference, (tuple, list)) else [(result, reference)]
    return max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item() for a, b in pairs)


def timed(call, reference):
    """{"ms", "error"} of call() under the patch in force: its relative error against reference and time.
    A GPU fault (torch.AcceleratorError) is raised: the process cannot go on after it."""
    from triton.testing import do_bench

    try:
        result = call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a fault shows here, at its own candidate
        error = relative_error(result, reference)
        if not error <= 2e-2:
            return {"ms": None, "error": f"wrong (relative error {error:.2e})"}
        return {"ms": do_bench(call, warmup=10, rep=40, return_mode="median"), "error": None}
    except torch.AcceleratorError:
        raise
    except Exception as failure:  # a candidate that cannot compile or run is a result
        return {"ms": None, "error": f"{type(failure).__name__}: {str(failure).splitlines()[0][:120]}"}


def attention_kernels(n, batch, heads, d, m, p, causal, device="cuda", dtype=torch.bfloat16):
    """Per attention kernel at one shape: (name, call, default config, candidates, patch(config))."""
    from fma.multipole import fused

    qkv = torch.randn(batch, n, 3, heads, d, device=device, dtype=dtype)
    q, k, v = (x.permute(0, 2, 1, 3) for x in qkv.unbind(2))
    total = p * (2 * n // m - 4)
    coarse_k, coarse_v = (torch.randn(batch, heads, total, d, device=device, dtype=dtype) for _ in range(2))
    coarse_bias = fused._unmasked_coarse_bias(n, m, p, True, q.device)
    coarse_index = fused._coarse_index(n, m, p, causal, q.device)
    inputs = (q, k, v, coarse_k, coarse_v, None, coarse_bias, coarse_index, m, causal)
    out, lse = fused.multipole_forward(*inputs)
    backward_inputs = (torch.randn_like(out), q, k, v, coarse_k, coarse_v, out, lse, None, coarse_bias, coarse_index,
                       m, causal)

    def backward():
        return fused.multipole_backward(*backward_inputs)

    # The backward operator runs both kernels; each is timed as the operator with its parameters changed.
    calls = {"forward": lambda: fused.multipole_forward(*inputs),
             "backward_query": lambda: backward()[0::3],  # dq and the summaries' gradients
             "backward_key": lambda: backward()[1:3]}  # dk, dv
    current = fused.launch_config
    fine_keys = (2 if causal else 3) * m
    for kernel, call in calls.items():
        tiles = [b for b in (16, 32, 64, 128) if (b <= m and m % b == 0)
                 or (kernel != "backward_key" and b <= fine_keys and fine_keys % b == 0)]
        candidates = [dict(BLOCK_N=b, num_warps=w, num_stages=s) for b, w, s in itertools.product(tiles, (4, 8), (1, 2, 3))]

        def patch(config, kernel=kernel):
            return mock.patch.object(fused, "launch_config", lambda name, *shape: (
                dict(config) if name == kernel else current(name, *shape)))

        yield kernel, call, current(kernel, m, d, causal), candidates, patch


def downsample_kernels(n, batch, heads, d, m, p, device="cuda", dtype=torch.bfloat16):
    """Per downsampling kernel at one shape (groupedconv, keys and values in one launch, as the FMA layer
    runs them): as `attention_kernels`."""
    from fma.downsample import Downsample
    from fma.downsample import fused

    module = Downsample("groupedconv", head_dim=d, block_size=m, rank=p, max_seq_len=n).to(device)
    qkv = torch.randn(batch, n, 3, heads, d, device=device, dtype=dtype)
    k, v = (qkv[:, :, side].permute(0, 2, 1, 3) for side in (1, 2))
    layout = fused.Layout.of(n, m, p)
    _, per_summary = fused.summary_tables(n, m, p, k.device)
    weight, bias = module.weight.detach(), module.bias.detach()
    w_cat = weight[:p * sum(layout.widths)].reshape(-1)
    grad = torch.randn(2, batch * heads, layout.total, d, device=device, dtype=dtype)
    calls = {"forward": lambda: fused.fused_summaries([k, v], "groupedconv", m, p, [weight] * 2, [bias] * 2),
             "grad_input": lambda: fused.summaries_grad_input(grad, w_cat, w_cat, None, per_summary, list(k.shape), m, p,
                                                              False),
             "grad_weight": lambda: fused.summaries_grad_weight(k, v, grad, m, p)}
    prefix = {"forward": "FWD", "grad_input": "DX", "grad_weight": "DW"}
    for kernel, call in calls.items():
        names = [f"{prefix[kernel]}_{key}" for key in ("E", "BD", "TOK", "WARPS")]
        candidates = [dict(zip(names, values)) for values in itertools.product((32, 64, 128), (8, 16), (16, 32), (4, 8))]
        yield kernel, call, {name: getattr(fused, name) for name in names}, candidates, (
            lambda config: mock.patch.multiple(fused, **config))


def key(row: dict) -> tuple:
    return row["seq_len"], row["batch"], row["part"], row["kernel"], json.dumps(row["config"])


def work(args, shapes, results: Path) -> None:
    """The worker: every candidate not yet in `results` (jsonl), appended as it is measured; the one in
    flight is in results.running, so that the driver can name it if the process dies."""
    done = {key(row) for row in map(json.loads, results.read_text().splitlines())} if results.exists() else set()
    running = results.with_suffix(".running")
    torch.manual_seed(0)
    for n, batch in shapes:
        parts = [("attention", attention_kernels(n, batch, args.heads, args.head_dim, args.block_size, args.rank,
                                                 not args.bidirectional)),
                 ("downsample", downsample_kernels(n, batch, args.heads, args.head_dim, args.block_size, args.rank))]
        for part, kernels in parts:
            for kernel, call, default, candidates, patch in kernels:
                rows = [dict(seq_len=n, batch=batch, part=part, kernel=kernel, config=config, default=config == default)
                        for config in [default] + [c for c in candidates if c != default]]
                if all(key(row) in done for row in rows):
                    continue
                running.write_text(json.dumps(rows[0]))  # the reference: the current parameters
                reference = call()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                for row in rows:
                    if key(row) in done:
                        continue
                    running.write_text(json.dumps(row))
                    with patch(row["config"]):
                        row.update(timed(call, reference))
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        print(f"{n} x {batch}: done", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x16", "16384x4", "65536x1"],
                        help="sequence length x batch, e.g. 4096x16")
    for name, default in [("heads", 8), ("head-dim", 64), ("block-size", 64), ("rank", 2)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--bidirectional", action="store_true", help="the masked LM's kernels (default: causal)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tune_kernels"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes length x batch, e.g. 4096x16; got {args.shapes}")
    require_cuda("tune_kernels.py")
    results = args.out / "candidates.jsonl"
    if args.worker:
        return work(args, shapes, results)
    args.out.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    while subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker"]).returncode != 0:
        faulted = json.loads(results.with_suffix(".running").read_text())
        if faulted["default"]:  # no reference for this kernel: its candidates are not measured
            print(f"the current parameters fault at {faulted}; stopping", flush=True)
            break
        print(f"GPU fault at {faulted}; restarting the worker after it", flush=True)
        with results.open("a") as f:
            f.write(json.dumps({**faulted, "ms": None, "error": "GPU fault (illegal memory access or similar)"}) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    print(report(rows, args))


def report(rows: list[dict], args) -> str:
    """Write tune_kernels.{md,csv,json}; return the markdown table of the best candidate per kernel and shape."""
    body = []
    for (n, batch, part, kernel), group in itertools.groupby(rows, key=lambda r: (r["seq_len"], r["batch"], r["part"], r["kernel"])):
        group = list(group)
        default = next((r for r in group if r["default"]), {"ms": None, "error": "not measured"})
        best = min((r for r in group if r["ms"] is not None), key=lambda r: r["ms"], default=None)
        if default["ms"] is None or best is None:
            body.append([f"{n} x {batch}", part, kernel, default["error"], "", "", ""])
            continue
        body.append([f"{n} x {batch}", part, kernel, f"{default['ms']:.4f}", f"{best['ms']:.4f}",
                     f"{default['ms'] / best['ms']:.2f}x", json.dumps(best["config"])])
    table = markdown_table(["shape", "part", "kernel", "current ms", "best ms", "gain", "best config"], body)
    env = environment()
    env["shape"] = f"heads {args.heads}, head_dim {args.head_dim}, block_size {args.block_size}, rank {args.rank}, " \
                   f"{'bidirectional' if args.bidirectional else 'causal'}, bf16"
    write_reports(args.out, "tune_kernels", [{**row, "config": json.dumps(row["config"])} for row in rows], env, table)
    return table


if __name__ == "__main__":
    main()
