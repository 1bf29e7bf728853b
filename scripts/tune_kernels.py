"""Time FMA's Triton kernels under alternative tile shapes and launch parameters, on CUDA.

    python scripts/tune_kernels.py [--shapes 4096x16 16384x4 65536x1] [--heads 8] [--head-dim 64]
        [--block-size 64] [--rank 2] [--bidirectional] [--out benchmarks/tune_kernels]

Per shape (sequence length x batch; bf16, the layout train.py's layers hand the kernels: q, k, v as
views of one qkv projection), each kernel is timed alone (triton.testing.do_bench, median) with its
current launch parameters and with every candidate below, the other kernels left as they are:
  attention (fma/multipole/fused.py `launch_config`): forward, backward_query, backward_key;
    BLOCK_N (fine key tile) x num_warps x num_stages;
  downsampling (fma/downsample/fused.py, one side: keys or values): forward, grad_input, grad_weight;
    E (pairs per tile) x BD (channels) x TOK (tokens per tile) x num_warps.
A candidate's outputs must equal the current parameters' to bf16 rounding (else it is reported as
wrong, never as fastest). A candidate that does not compile or run is reported with its error.
Writes tune_kernels.{md,json} under --out and prints the table of the best candidate per kernel
and shape: the evidence for the defaults those two modules fix.
"""

import argparse
import itertools
import json
from pathlib import Path
from unittest import mock

import torch

from benchlib import environment, markdown_table, require_cuda, write_reports


def relative_error(result, reference) -> float:
    pairs = zip(result, reference) if isinstance(reference, (tuple, list)) else [(result, reference)]
    return max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item() for a, b in pairs)


def timed(call, reference):
    """{"ms", "error"} of call() under the patch in force: its relative error against reference and time."""
    from triton.testing import do_bench

    try:
        result = call()
        error = relative_error(result, reference)
        if not error <= 2e-2:
            return {"ms": None, "error": f"wrong (relative error {error:.2e})"}
        return {"ms": do_bench(call, warmup=10, rep=40, return_mode="median"), "error": None}
    except Exception as failure:  # a candidate that cannot compile or run is a result
        return {"ms": None, "error": f"{type(failure).__name__}: {str(failure).splitlines()[0][:120]}"}


def attention_rows(n, batch, heads, d, m, p, causal, device="cuda", dtype=torch.bfloat16):
    """Every attention kernel under every candidate at one shape."""
    from fma.multipole import fused

    qkv = torch.randn(batch, n, 3, heads, d, device=device, dtype=dtype)
    q, k, v = (x.permute(0, 2, 1, 3) for x in qkv.unbind(2))
    total = p * (2 * n // m - 4)
    coarse_k, coarse_v = (torch.randn(batch, heads, total, d, device=device, dtype=dtype) for _ in range(2))
    coarse_bias = fused._unmasked_coarse_bias(n, m, p, True, q.device)
    coarse_index = fused._coarse_index(n, m, p, causal, q.device)
    inputs = (q, k, v, coarse_k, coarse_v, None, coarse_bias, coarse_index, m, causal)
    out, lse = fused.multipole_forward(*inputs)
    grad_out = torch.randn_like(out)
    backward_inputs = (grad_out, q, k, v, coarse_k, coarse_v, out, lse, None, coarse_bias, coarse_index, m, causal)
    def backward():
        return fused.multipole_backward(*backward_inputs)

    # The backward operator runs both kernels; each is timed as the operator with its parameters changed.
    calls = {"forward": lambda: fused.multipole_forward(*inputs),
             "backward_query": lambda: backward()[0::3],  # dq and the summaries' gradients
             "backward_key": lambda: backward()[1:3]}  # dk, dv
    current = fused.launch_config
    fine_keys = (2 if causal else 3) * m
    rows = []
    for kernel, call in calls.items():
        reference = call()
        tiles = [b for b in (16, 32, 64, 128) if (b <= m and m % b == 0) or (kernel != "backward_key" and fine_keys % b == 0 and b <= fine_keys)]
        candidates = [dict(BLOCK_N=b, num_warps=w, num_stages=s) for b, w, s in itertools.product(sorted(set(tiles)), (4, 8), (1, 2, 3))]

        def patched(name, block_size, head_dim, candidate=None):
            return dict(candidate) if name == kernel and candidate else current(name, block_size, head_dim)

        default = current(kernel, m, d)
        for candidate in [default] + [c for c in candidates if c != default]:
            with mock.patch.object(fused, "launch_config", lambda *a, c=candidate: patched(*a, candidate=c)):
                rows.append({"part": "attention", "kernel": kernel, "config": candidate, "default": candidate == default,
                             **timed(call, reference)})
    return rows


def downsample_rows(n, batch, heads, d, m, p, device="cuda", dtype=torch.bfloat16):
    """Every downsampling kernel under every candidate at one shape (groupedconv, one side)."""
    from fma.downsample import Downsample
    from fma.downsample import fused

    module = Downsample("groupedconv", head_dim=d, block_size=m, rank=p, max_seq_len=n).to(device)
    qkv = torch.randn(batch, n, 3, heads, d, device=device, dtype=dtype)
    x = qkv[:, :, 1].permute(0, 2, 1, 3)
    layout = fused.Layout.of(n, m, p)
    rows_table, per_summary = fused.summary_tables(n, m, p, x.device)
    w_cat = module.weight[:p * m * (2 ** layout.num_levels - 1)].reshape(-1).detach()
    grad = torch.randn(batch * heads, layout.total, d, device=device, dtype=dtype)
    calls = {"forward": lambda: fused.fused_summaries(x, "groupedconv", m, p, module.weight.detach(), module.bias.detach()),
             "grad_input": lambda: fused.summaries_grad_input(grad, w_cat, None, per_summary, list(x.shape), m, p, False),
             "grad_weight": lambda: fused.summaries_grad_weight(x, grad, m, p)}
    prefix = {"forward": "FWD", "grad_input": "DX", "grad_weight": "DW"}
    rows = []
    for kernel, call in calls.items():
        names = [f"{prefix[kernel]}_{key}" for key in ("E", "BD", "TOK", "WARPS")]
        default = dict(zip(names, (getattr(fused, name) for name in names)))
        reference = call()
        candidates = [dict(zip(names, values)) for values in itertools.product((32, 64, 128), (8, 16), (16, 32), (4, 8))]
        for candidate in [default] + [c for c in candidates if c != default]:
            with mock.patch.multiple(fused, **candidate):
                rows.append({"part": "downsample", "kernel": kernel, "config": candidate, "default": candidate == default,
                             **timed(call, reference)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x16", "16384x4", "65536x1"],
                        help="sequence length x batch, e.g. 4096x16")
    for name, default in [("heads", 8), ("head-dim", 64), ("block-size", 64), ("rank", 2)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--bidirectional", action="store_true", help="the masked LM's kernels (default: causal)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tune_kernels"))
    args = parser.parse_args()
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes length x batch, e.g. 4096x16; got {args.shapes}")
    require_cuda("tune_kernels.py")
    torch.manual_seed(0)
    rows = []
    for n, batch in shapes:
        shape = dict(seq_len=n, batch=batch)
        for row in attention_rows(n, batch, args.heads, args.head_dim, args.block_size, args.rank, not args.bidirectional):
            rows.append({**shape, **row})
        for row in downsample_rows(n, batch, args.heads, args.head_dim, args.block_size, args.rank):
            rows.append({**shape, **row})
        print(f"{n} x {batch}: {sum(r['ms'] is not None for r in rows)} candidates timed", flush=True)
        table = report(rows, args)  # after every shape: a run cut short keeps what it measured
    print(table)


def report(rows: list[dict], args) -> str:
    """Write tune_kernels.{md,csv,json}; return the markdown table of the best candidate per kernel and shape."""
    body = []
    for (n, batch, part, kernel), group in itertools.groupby(rows, key=lambda r: (r["seq_len"], r["batch"], r["part"], r["kernel"])):
        group = list(group)
        default = next(r for r in group if r["default"])
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
