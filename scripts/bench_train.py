"""Training throughput of train.py itself, per attention kind, across lengths, on one GPU.

Each point is one `python train.py` run in its own process, as a user runs it: trainer=gpu, the
series' overrides (scripts/series.py), the model size (--depth, --dim, --heads: by default the
paper's 6 layers, d_model 512, 8 heads; train.py's own is 4, 256, 4), a fixed number of tokens per
step (batch = tokens / length), bf16-mixed, fused AdamW, compile=<mode> for each --compile (auto:
CUDA graphs on one GPU). The data are --data's text as bytes (a stand-in corpus: say so where the
numbers are reported), or the synthetic copy task over 256 symbols. --objective mlm trains every row
as a masked LM (and the default rows gain the kinds without a causal form). Validation, checkpoints
and the test are off: the run only trains.

    python scripts/bench_train.py --depth 4 --dim 256 --heads 4 --data wikitext-2/test.txt --out benchmarks/train_py
    python scripts/bench_train.py --series model=full "fma m=32: model=fma model.attention.block_size=32"

Reported per point, from the run's result.json: tokens/s (median of the logged steps after warm-up,
each step timed on the GPU), peak memory; the model FLOPs utilisation over the H200's dense bf16
peak of 989 TFLOP/s, `dense_mfu` for every kind (6 N FLOPs per token, N the weights every token
multiplies: projections, MLP, head, the head counted at the selected 15% only for the masked LM; the
work outside attention, which bounds every kind) and `mfu` for full attention (6 N + 6 L n d causal,
6 N + 12 L n d bidirectional: attention's scores and values added). With --profile
(models.KernelProfile over 5 steps): GPU kernel time, kernels and host launches per step, and the
fraction of the step's time the GPU is busy; --profile host adds the host's time per Python function
(kernel_profile.md in each point's folder).
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from benchlib import benchmark_parser, environment, length_table, markdown_table, parse_args, plot_against_length, \
    require_cuda, rows_to_run, write_reports
from series import ROOT, Series

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, vendor datasheet


def point_overrides(series: Series, seq_len: int, batch: int, size: list[str], compile_mode: str, data: str | None,
                    steps: int, profile: Path | None, host: bool = False, objective: str = "clm") -> list[str]:
    """train.py's command line for one point."""
    data_overrides = (["data=text", f"data.path={Path(data).resolve()}"] if data
                      else ["data=synthetic", "data.vocab_size=256", "data.num_val=1", "data.num_test=1"])
    profiling = [] if profile is None else [
        "+callbacks.kernel_profile._target_=models.KernelProfile", f"+callbacks.kernel_profile.path={profile}",
        f"+callbacks.kernel_profile.start_step={steps - 10}", *(["+callbacks.kernel_profile.host=true"] if host else [])]
    return [*series.overrides, "trainer=gpu", f"objective={objective}", *size, *data_overrides,
            f"data.seq_len={seq_len}", f"data.batch_size={batch}", f"compile={compile_mode}", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=10", "+trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
            "~callbacks.best_checkpoint", "~callbacks.last_checkpoint", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "test=false", *profiling]


def run_point(overrides: list[str], run_dir: Path) -> tuple[dict, str]:
    """result.json of train.py run with `overrides` in run_dir (or a failure), and the command."""
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        returncode = subprocess.run(command, stdout=out, stderr=err, cwd=ROOT).returncode
    try:
        return json.loads((run_dir / "result.json").read_text()), shlex.join(command)
    except (OSError, ValueError):
        return {"status": "failed", "reason": f"exit code {returncode} without result.json (see stderr.log)"}, \
            shlex.join(command)


def main():
    parser = benchmark_parser(__doc__, lengths=[1024, 4096, 16384, 65536], tokens=65536,
                              tokens_help="tokens per optimizer step", out="benchmarks/train_py", repeats=False)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--compile", nargs="+", default=["auto"], choices=["auto", "false", "true", "reduce-overhead"],
                        help="train.py's compile= for each row (default: auto)")
    parser.add_argument("--data", help="a text file to train on as bytes (data=text); default: the synthetic copy "
                                       "task over 256 symbols")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per point (logged every 10)")
    parser.add_argument("--objective", choices=["clm", "mlm"], default="clm",
                        help="train.py's objective= for every row (mlm: the default rows add the kinds without a "
                             "causal form)")
    parser.add_argument("--profile", nargs="?", const="kernels", choices=["kernels", "host"],
                        help="also profile 5 steps per point (models.KernelProfile); host: with the host's time "
                             "per Python function")
    args = parse_args(parser)
    args.series = rows_to_run(args.series, args.objective == "mlm")
    require_cuda("bench_train.py")
    size = [f"model.depth={args.depth}", f"model.dim={args.dim}", f"model.num_heads={args.heads}"]
    env = environment()
    env["setting"] = (f"train.py, objective={args.objective}, {args.depth} layers, d_model {args.dim}, {args.heads} "
                      f"heads, {args.tokens} tokens "
                      f"per step, {args.steps} steps, data: "
                      f"{args.data + ' as bytes (stand-in)' if args.data else 'synthetic copy task, 256 symbols'}")
    rows = []
    for seq_len in args.lengths:
        batch = max(1, args.tokens // seq_len)
        for series in args.series:
            for mode in args.compile:
                label = series.label if args.compile == ["auto"] else f"{series.label} [compile={mode}]"
                run_dir = (args.out / "points" / f"{re.sub('[^A-Za-z0-9]+', '-', label).strip('-')}_{seq_len}").resolve()
                profile = run_dir / "kernel_profile.json" if args.profile else None
                overrides = point_overrides(series, seq_len, batch, size, mode, args.data, args.steps, profile,
                                            host=args.profile == "host", objective=args.objective)
                result, command = run_point(overrides, run_dir)
                rows.append(row_of(result, label, series, mode, seq_len, batch, profile, command))
                row = rows[-1]
                shown = (f"{row['tokens_per_s']:,.0f} tok/s, {row['peak_gib']:.2f} GiB" if row["tokens_per_s"]
                         else row["error"])
                print(f"{seq_len:>7} x{batch:<4} {label:<28} {shown}", flush=True)
    write_outputs(args.out, rows, env)


def row_of(result: dict, label: str, series: Series, mode: str, seq_len: int, batch: int, profile: Path | None,
           command: str) -> dict:
    """One table row from a point's result.json (and its kernel profile)."""
    ok = result["status"] == "ok" and result.get("tokens_per_s")
    row = {"variant": label, "kind": series.kind, "compile": mode, "seq_len": seq_len, "batch": batch,
           "tokens_per_s": result["tokens_per_s"] if ok else None, "peak_gib": result.get("peak_mem_gib") if ok else None,
           "error": "" if ok else (result["status"] if result["status"] == "oom" else result["reason"][:160]),
           "mfu": None, "dense_mfu": None, "command": command}
    if not ok:
        return row
    model, parameters = result["config"]["model"], result["parameters"]
    vocab = (parameters["total"] - parameters["non_embedding"]) // model["dim"] - 1  # less the mask token's row
    masked = result["config"]["objective"].get("mask_prob")  # masked LM: the head runs at the selected tokens only
    head = vocab * (masked if masked is not None else 1)
    dense = 6 * (model["depth"] * (4 + 2 * model["mlp_ratio"]) * model["dim"] + head) * model["dim"]
    row["dense_mfu"] = dense * row["tokens_per_s"] / (PEAK_BF16_TFLOPS * 1e12)
    if series.kind == "full":  # causal attention does half of the bidirectional scores and values
        attention = (6 if masked is None else 12) * model["depth"] * seq_len * model["dim"]
        row["mfu"] = (dense + attention) * row["tokens_per_s"] / (PEAK_BF16_TFLOPS * 1e12)
    if profile is not None and profile.exists():
        summary = json.loads(profile.read_text())["summary"]
        step_ms = batch * seq_len / row["tokens_per_s"] * 1e3
        row.update(step_ms=step_ms, kernel_ms=summary["kernel_ms"], launches=summary["launches"],
                   gpu_busy=summary["gpu_busy_ms"] / step_ms)
    return row


def write_outputs(out: Path, rows: list[dict], env: dict) -> None:
    labels = list(dict.fromkeys(row["variant"] for row in rows))
    table = "### tokens/s\n\n" + length_table(rows, labels, "tokens_per_s", "{:,.0f}")
    table += "\n\n### peak memory (GiB)\n\n" + length_table(rows, labels, "peak_gib", "{:.2f}")
    table += "\n\n### model FLOPs utilisation (full: weights and attention; every kind: 6 N per token)\n\n"
    table += markdown_table(["variant", "length", "mfu", "dense_mfu"], [
        [r["variant"], r["seq_len"], f"{100 * r['mfu']:.1f}%" if r["mfu"] else "", f"{100 * r['dense_mfu']:.1f}%"]
        for r in rows if r["dense_mfu"]])
    profiled = [r for r in rows if "kernel_ms" in r]
    if profiled:
        table += "\n\n### GPU time per step (ms; busy: share of the step the GPU runs kernels)\n\n" + markdown_table(
            ["variant", "length", "step", "kernels", "busy", "launches"],
            [[r["variant"], r["seq_len"], f"{r['step_ms']:.2f}", f"{r['kernel_ms']:.2f}", f"{100 * r['gpu_busy']:.0f}%",
              f"{r['launches']:,.0f}"] for r in profiled])
    write_reports(out, "train_throughput", rows, env, table)
    plot_against_length(out / "train_throughput.png", rows, "variant",
                        [("tokens_per_s", "training tokens/s"), ("peak_gib", "peak memory (GiB)")])
    print(table)


if __name__ == "__main__":
    main()
