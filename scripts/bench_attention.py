"""Forward+backward time and peak memory of one attention layer per kind, across sequence lengths.

One layer = the kind's module from `fma.build_attention` with the options train.py would give it
(configs/model/<kind>.yaml and the row's overrides), projections and FMA's downsampling included,
bf16, tokens per batch fixed (batch = tokens / seq_len), so every row does the same amount of token
work and differs only in how attention scales with length. Rows are series (scripts/series.py).

    python scripts/bench_attention.py --out benchmarks/attention
    python scripts/bench_attention.py --lengths 1024 65536 \\
        --series "full (flash): model=full model.attention.backend=flash" \\
        "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2"

The default rows are every kind (with --bidirectional also those without a causal form: Nyströmformer,
Linformer). --compile times every layer through torch.compile (compiled against compiled; FMA's kernels are
registered operators). --profile also counts each layer's GPU kernels and host launches per
forward+backward (torch.profiler): what CUDA graphs save where the host bounds a step.
"""

import torch

import fma
from models.profiling import profile_calls
from benchlib import (benchmark_parser, environment, length_table, measure, model_config, parse_args,
                      plot_against_length, require_cuda, rows_to_run, write_reports)
from series import Series


def attention_layer(series: Series, seq_len: int, dim: int, heads: int, causal: bool) -> fma.AttentionLayer:
    """The series' attention layer, with the options of its composed model config at this length."""
    options = model_config(series, seq_len)["attention"]
    return fma.build_attention(options.pop("name"), dim=dim, num_heads=heads, causal=causal, **options)


def layer_step(series: Series, seq_len: int, batch: int, dim: int, heads: int, causal: bool, compile: bool = False):
    """A closure running one forward+backward of a fresh layer (through torch.compile if `compile`) on
    fresh random bf16 input."""
    layer = attention_layer(series, seq_len, dim, heads, causal).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, seq_len, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    torch._dynamo.reset()  # a fresh layer per point: no pile-up of recompilations
    forward = torch.compile(layer) if compile else layer

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        forward(x).backward(grad)

    return step


def main():
    parser = benchmark_parser(__doc__, lengths=[2**k for k in range(10, 18)], tokens=131072,
                              tokens_help="tokens per batch (batch = tokens / length)", out="benchmarks/attention")
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--compile", action="store_true", help="time every layer through torch.compile")
    parser.add_argument("--profile", action="store_true", help="also count kernels and launches per fwd+bwd")
    args = parse_args(parser)
    args.series = rows_to_run(args.series, args.bidirectional)
    require_cuda("bench_attention.py")
    env = environment()
    rows = []
    for seq_len in args.lengths:
        batch = max(1, args.tokens // seq_len)
        for series in args.series:
            try:
                step = layer_step(series, seq_len, batch, args.dim, args.heads, not args.bidirectional, args.compile)
                result = measure(step, repeats=args.repeats)
            except torch.OutOfMemoryError:
                result = {"error": "OOM"}
            row = {"variant": series.label, "kind": series.kind, "overrides": " ".join(series.overrides),
                   "seq_len": seq_len, "batch": batch, "ms": result.get("ms"), "peak_gib": result.get("peak_gib"),
                   "error": result.get("error", "")}
            if args.profile and row["ms"]:
                summary, _ = profile_calls(step)
                row.update(kernel_ms=summary["kernel_ms"], kernels=summary["kernels"], launches=summary["launches"])
            rows.append(row)
            shown = f"{row['ms']:.2f} ms, {row['peak_gib']:.2f} GiB" if row["ms"] else row["error"]
            print(f"{seq_len:>7} x{batch:<4} {series.label:<16} {shown}", flush=True)

    name = "causal" if not args.bidirectional else "bidirectional"
    env["setting"] = (f"{name}, bf16, {args.heads} heads, head dim {args.dim // args.heads}, {args.tokens} tokens "
                      f"per batch, fwd+bwd of one layer incl. projections{', torch.compile' if args.compile else ''}, "
                      f"median of {args.repeats} CUDA-event timings")
    labels = [series.label for series in args.series]
    table = "### time (ms, fwd+bwd)\n\n" + length_table(rows, labels, "ms", "{:.2f}")
    table += "\n\n### peak memory (GiB)\n\n" + length_table(rows, labels, "peak_gib", "{:.2f}")
    if args.profile:
        table += "\n\n### host launches per fwd+bwd\n\n" + length_table(
            [{"launches": None, **row} for row in rows], labels, "launches", "{:,.0f}")
    full = next((series.label for series in args.series if series.kind == "full"), None)
    if full:
        full_ms = {row["seq_len"]: row["ms"] for row in rows if row["variant"] == full}
        speedups = [{**row, "speedup": full_ms[row["seq_len"]] / row["ms"] if full_ms[row["seq_len"]] and row["ms"]
                     else None, "error": "-"} for row in rows]
        others = [label for label in labels if label != full]
        table += f"\n\n### speed-up over {full}\n\n" + length_table(speedups, others, "speedup", "{:.1f}x")
    write_reports(args.out, f"attention_{name}", rows, env, table)
    plot_against_length(args.out / f"attention_{name}.png", rows, "variant",
                        [("ms", "fwd+bwd time (ms)"), ("peak_gib", "peak memory (GiB)")])
    print(table)


if __name__ == "__main__":
    main()
