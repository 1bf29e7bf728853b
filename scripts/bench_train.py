"""Training throughput and peak memory of the whole model per attention kind, across lengths.

A 6-layer, d_model 512, 8-head byte-level model (the paper's size), bf16 autocast with fp32
weights and fused AdamW, tokens per optimizer step fixed (batch = tokens / seq_len). Times whole
steps (forward, backward, optimizer) with CUDA events; reports tokens/s, peak memory, and the
model FLOPs utilisation of `full` (6 N per token for the weights + 6 L n d per token for causal
attention scores and values, over the H200's dense bf16 peak of 989 TFLOP/s).

    python scripts/bench_train.py --out benchmarks/train
    python scripts/bench_train.py --series model=full "fma m=32: model=fma model.attention.block_size=32"

Rows are series (scripts/series.py): each model is train.py's `model` config for that series.

--compile none default reduce-overhead times each row eager and/or through torch.compile in those
modes (reduce-overhead: CUDA graphs, no launch overhead), as rows labelled "<series> [<mode>]".

--profile also records each point's GPU kernel time and kernel launches per step (torch.profiler),
with the kernels that take the most time in train_profile.md: when a step's wall time far exceeds
its kernel time, the host (Python, kernel launches) bounds it, not the GPU.
"""

import hydra
import torch
import torch.nn.functional as F

from benchlib import (benchmark_parser, environment, kernel_profile, length_table, markdown_table, measure,
                      model_config, parse_args, plot_against_length, require_cuda, write_reports)
from series import Series

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, vendor datasheet


def train_model(series: Series, seq_len: int, depth: int, dim: int, heads: int, vocab_size: int = 256):
    """The series' causal language model as train.py builds it, at this size, without dropout."""
    config = model_config(series, seq_len, depth=depth, dim=dim, num_heads=heads, dropout=0.0)
    return hydra.utils.instantiate(config, vocab_size=vocab_size, causal=True, _convert_="all")


def train_step(series: Series, seq_len, batch, depth, dim, heads, vocab_size=256, compile_mode="none"):
    """A closure running one optimizer step of a fresh model on fresh random tokens (the model
    through torch.compile unless compile_mode is "none"); and the model's non-embedding parameter count."""
    model = train_model(series, seq_len, depth, dim, heads, vocab_size).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(vocab_size, (batch, seq_len + 1), device="cuda")
    torch._dynamo.reset()  # a fresh model per point: no pile-up of recompilations
    forward = model if compile_mode == "none" else torch.compile(model, mode=compile_mode)

    def step():
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    non_embedding = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embedding"))
    return step, non_embedding


def main():
    parser = benchmark_parser(__doc__, lengths=[1024, 4096, 16384, 65536], tokens=65536,
                              tokens_help="tokens per optimizer step", out="benchmarks/train")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--compile", nargs="+", default=["none"], choices=["none", "default", "reduce-overhead"],
                        help="eager (none) and/or torch.compile modes, one row each (default: none)")
    parser.add_argument("--profile", action="store_true", help="also profile GPU kernel time and launches per step")
    args = parse_args(parser)
    require_cuda("bench_train.py")
    env = environment()
    env["setting"] = (f"{args.depth} layers, d_model {args.dim}, {args.heads} heads, vocab 256, bf16 autocast, "
                      f"fused AdamW, {args.tokens} tokens per step, median of {args.repeats} steps")
    rows, profiles = [], []
    for seq_len in args.lengths:
        batch = max(1, args.tokens // seq_len)
        for series, compile_mode in [(series, mode) for series in args.series for mode in args.compile]:
            label = series.label if args.compile == ["none"] else f"{series.label} [{compile_mode}]"
            try:
                step, params = train_step(series, seq_len, batch, args.depth, args.dim, args.heads,
                                          compile_mode=compile_mode)
                result = measure(step, repeats=args.repeats)
            except torch.OutOfMemoryError:
                result, params = {"error": "OOM"}, None
            tokens = batch * seq_len
            row = {"variant": label, "kind": series.kind, "compile": compile_mode, "seq_len": seq_len, "batch": batch, "ms": result.get("ms"),
                   "tokens_per_s": tokens / result["ms"] * 1e3 if result.get("ms") else None,
                   "peak_gib": result.get("peak_gib"), "error": result.get("error", ""), "mfu": None}
            if args.profile and row["ms"]:
                summary, kernels = kernel_profile(step)
                row.update(summary)
                profiles.append(f"### {label}, length {seq_len}, batch {batch}: {row['ms']:.2f} ms per step, "
                                f"{summary['gpu_busy_ms']:.2f} ms of kernels, {summary['kernels_per_step']:,.0f} "
                                f"launches\n\n{kernels}")
            if series.kind == "full" and row["ms"]:
                flops = 6 * params * tokens + 6 * args.depth * seq_len * args.dim * tokens
                row["mfu"] = flops / (row["ms"] / 1e3) / (PEAK_BF16_TFLOPS * 1e12)
            rows.append(row)
            shown = f"{row['tokens_per_s']:,.0f} tok/s, {row['peak_gib']:.2f} GiB" if row["ms"] else row["error"]
            print(f"{seq_len:>7} x{batch:<4} {label:<16} {shown}", flush=True)

    labels = list(dict.fromkeys(row["variant"] for row in rows))
    table = "### tokens/s\n\n" + length_table(rows, labels, "tokens_per_s", "{:,.0f}")
    table += "\n\n### peak memory (GiB)\n\n" + length_table(rows, labels, "peak_gib", "{:.2f}")
    full = [r for r in rows if r["mfu"] is not None]
    if full:
        table += "\n\n### model FLOPs utilisation of full attention\n\n" + markdown_table(
            ["seq_len", "MFU"], [[r["seq_len"], f"{100 * r['mfu']:.1f}%"] for r in full])
    if profiles:
        table += "\n\n### wall time and GPU kernel time per step (ms)\n\n" + markdown_table(
            ["variant", "length", "step", "kernels", "launches"],
            [[r["variant"], r["seq_len"], f"{r['ms']:.2f}", f"{r['gpu_busy_ms']:.2f}", f"{r['kernels_per_step']:,.0f}"]
             for r in rows if "gpu_busy_ms" in r])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_profile.md").write_text("\n\n".join(profiles) + "\n")
    write_reports(args.out, "train_throughput", rows, env, table)
    plot_against_length(args.out / "train_throughput.png", rows, "variant",
                        [("tokens_per_s", "training tokens/s"), ("peak_gib", "peak memory (GiB)")])
    print(table)


if __name__ == "__main__":
    main()
