"""Decoding speed and memory of each attention kind against context length, on one GPU.

    python scripts/bench_decode.py --lengths 1024 16384 131072 1048576 --batch 1 16 --out benchmarks/decode
    python scripts/bench_decode.py --series model=full "fma avgpool: model=fma model.attention.downsample=avgpool"

Per series, context length n and batch size: the series' TransformerLM as train.py composes it (the
paper's 6 layers, d_model 512, 8 heads by default; vocabulary 256; random weights, which decoding speed
does not depend on), in bf16 and eval mode. `net.prefill` runs a random prompt of n tokens (timed
once, after one untimed call at the same length), then `net.step` decodes --steps more tokens, after
--warmup untimed ones. Reported: prefill ms, ms per decoded token (median over the steps, each timed
between CUDA events), tokens/s (batch / step time), the decoding state's size after the prompt (its
tensors summed, GiB) and peak memory. A point that runs out of memory is recorded as OOM and the
next one runs. FMA's learned basis is built for n + warmup + steps tokens (its max_seq_len). The
default full row runs backend auto: cuDNN for the prompt, flash for the one-query steps (a pinned
`model.attention.backend=cudnn` would build a cuDNN plan for every new key length).
"""

import dataclasses
import statistics

import torch

from benchlib import (CudaTimer, WallTimer, benchmark_parser, environment, length_table, model_config, parse_args,
                      plot_against_length, require_cuda, write_reports)
from models.transformer import TransformerLM

SERIES = ["full: model=full", "local w=128: model=local model.attention.window=128",
          "model=linear", "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2"]
VOCAB = 256


def state_bytes(state) -> int:
    """Bytes held by the tensors of a decoding state (nested tuples, lists and dataclasses)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if dataclasses.is_dataclass(state):
        state = [getattr(state, field.name) for field in dataclasses.fields(state)]
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(part) for part in state)
    return 0


def decode_point(series, seq_len: int, batch: int, size: dict, steps: int, warmup: int, device: str,
                 dtype=torch.bfloat16) -> dict:
    """One point's measurements: prefill_ms, step_ms, tokens_per_s, state_gib, peak_gib."""
    config = model_config(series, seq_len + warmup + steps, **size)
    config.pop("_target_")
    net = TransformerLM(vocab_size=VOCAB, causal=True, **config).to(device=device, dtype=dtype).eval()
    generator = torch.Generator(device).manual_seed(seq_len)
    prompt = torch.randint(0, VOCAB, (batch, seq_len), device=device, generator=generator)
    timer = CudaTimer() if device == "cuda" else WallTimer()
    with torch.no_grad():
        net.prefill(prompt)  # warm-up: kernels compiled and memory pools grown at this length
        with timer:
            logits, state = net.prefill(prompt)
        prefill_ms = timer.ms
        state_gib = state_bytes(state) / 2**30
        token, times = logits[:, -1].argmax(-1), []
        for step in range(warmup + steps):
            with timer:
                logits, state = net.step(token, state)
            token = logits.argmax(-1)
            if step >= warmup:
                times.append(timer.ms)
    step_ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"prefill_ms": prefill_ms, "step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3,
            "state_gib": state_gib, "peak_gib": peak}


def main():
    parser = benchmark_parser(__doc__, lengths=[1024, 16384, 131072, 1048576], tokens=None,
                              out="benchmarks/decode", repeats=False, series=SERIES)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="batch sizes (default 1 16)")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--steps", type=int, default=32, help="decoded tokens timed per point (default 32)")
    parser.add_argument("--warmup", type=int, default=4, help="decoded tokens before timing (default 4)")
    args = parse_args(parser)
    require_cuda("bench_decode.py")
    size = {"depth": args.depth, "dim": args.dim, "num_heads": args.heads}
    env = environment()
    env["setting"] = (f"TransformerLM {args.depth} layers, d_model {args.dim}, {args.heads} heads, vocabulary {VOCAB}, "
                      f"bf16, eval; prefill timed once after a warm-up, then the median of {args.steps} steps after "
                      f"{args.warmup}")
    rows = []
    for batch in args.batch:
        for seq_len in args.lengths:
            for series in args.series:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                row = {"variant": f"{series.label}, batch {batch}", "kind": series.kind, "batch": batch,
                       "seq_len": seq_len, "error": ""}
                try:
                    row.update(decode_point(series, seq_len, batch, size, args.steps, args.warmup, "cuda"))
                except torch.OutOfMemoryError:
                    row.update(prefill_ms=None, step_ms=None, tokens_per_s=None, state_gib=None, peak_gib=None,
                               error="OOM")
                rows.append(row)
                shown = (f"prefill {row['prefill_ms']:.1f} ms, {row['step_ms']:.2f} ms/token, state "
                         f"{row['state_gib']:.3f} GiB, peak {row['peak_gib']:.2f} GiB" if not row["error"] else "OOM")
                print(f"{seq_len:>8} x{batch:<3} {series.label:<16} {shown}", flush=True)
    labels = list(dict.fromkeys(row["variant"] for row in rows))
    table = "### ms per decoded token\n\n" + length_table(rows, labels, "step_ms", "{:.2f}")
    table += "\n\n### decoded tokens/s\n\n" + length_table(rows, labels, "tokens_per_s", "{:,.0f}")
    table += "\n\n### prefill (ms)\n\n" + length_table(rows, labels, "prefill_ms", "{:,.1f}")
    table += "\n\n### decoding state after the prompt (GiB)\n\n" + length_table(rows, labels, "state_gib", "{:.4f}")
    table += "\n\n### peak memory (GiB)\n\n" + length_table(rows, labels, "peak_gib", "{:.2f}")
    write_reports(args.out, "decode", rows, env, table)
    plot_against_length(args.out / "decode.png", rows, "variant",
                        [("step_ms", "ms per decoded token"), ("state_gib", "decoding state (GiB)")])
    print(table)


if __name__ == "__main__":
    main()
