"""Length generalisation: train every kind at one length, then score its test split at 1x-16x that length.

    python scripts/length_generalization.py --train-length 1024 --factors 1 2 4 8 16 \\
        --data text --data-path ../shared/data/kernel-docs.txt --stand-in-label "kernel-docs bytes" \\
        --budget-steps 2000 --tokens-per-step 16384 --overrides trainer=gpu --out results/length-generalization

Training is a sweep at --train-length (scripts/runlib.py: one train.py per series, the same budget,
resumable; its own table under <out>/). Then every trained point's best checkpoint is scored at each
factor times that length, each evaluation its own process (with --gpus, side by side like the
training points: one per listed entry, so a GPU listed k times overlaps k evaluations' start-up):

    python eval.py ckpt_path=<point>/checkpoints/best.ckpt data.seq_len=<n> data.eval_batch_size=<tokens / n>

with --eval-tokens tokens per evaluation batch. A cell whose model cannot run the length (FMA's
`groupedconv` basis has filters only up to its training length: eval.py refuses, exit 2) is
recorded as "cannot run" with eval.py's reason; an out-of-memory or a crash as "oom" or "failed";
the other cells go on. Evaluations are appended to <out>/evaluations.jsonl as they finish, and a rerun
skips those recorded. Writes <out>/length_generalization.{md,csv,json,png} (test metric per series
and evaluation length) and prints the table last.

Positions are sinusoidal (models/transformer.py): every length has an encoding and nothing is learned
per position, but positions past the training length are angles the model never saw, which is what
full attention then has to extrapolate; local attention never sees more than its window, and FMA's
coarse levels gain one level per doubling of length.
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import benchlib
from runlib import (ROOT, DATA_GROUPS, add_sweep_arguments, append_record, data_overrides, hydra_value, main_guard,
                    on_slots, plan_points, read_records, run_sweep, spec_from)
from series import UsageError
from sweep_report import primary_metric

SERIES = ["model=full", "model=local", "model=linear", "model=htransformer",
          "fma avgpool: model=fma model.attention.downsample=avgpool",
          "fma multilevel: model=fma model.attention.downsample=multilevel",
          "fma groupedconv: model=fma model.attention.downsample=groupedconv"]
EVAL = ROOT / "eval.py"


def evaluation_key(record: dict, seq_len: int) -> str:
    """What identifies an evaluation across reruns: the trained point's key and the length."""
    return json.dumps([record["key"], seq_len])


def evaluation(record: dict, out: Path, seq_len: int, eval_tokens: int, timeout_s: float | None,
               gpu: str | None = None) -> dict:
    """Score one trained point (its sweep record) at seq_len with eval.py (on CUDA_VISIBLE_DEVICES=gpu
    if given): the evaluation's record."""
    run_dir = out / record["run_dir"]
    result_path = out / "evaluations" / f"{Path(record['run_dir']).name}_n{seq_len}.json"
    command = [sys.executable, str(EVAL), f"ckpt_path={hydra_value(run_dir / 'checkpoints' / 'best.ckpt')}",
               f"data.seq_len={seq_len}", f"data.eval_batch_size={max(1, eval_tokens // seq_len)}",
               f"out={hydra_value(result_path)}"]
    started = time.time()
    try:
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
        returncode, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        returncode, stderr = None, ""
    entry = {"key": evaluation_key(record, seq_len), "point": record["key"], "label": record["label"],
             "kind": record["kind"], "train_seq_len": record["seq_len"], "seq_len": seq_len, "factor": seq_len / record["seq_len"], "wall_s": round(time.time() - started, 2),
             "command": shlex.join(command)}
    last_lines = " ".join(stderr.strip().splitlines()[-3:])
    if returncode == 0:
        metrics = json.loads(result_path.read_text())["metrics"]
        return {**entry, "status": "ok", "reason": "", **metrics}
    if returncode is None:
        return {**entry, "status": "timeout", "reason": f"stopped after the --timeout of {timeout_s:g} s"}
    if returncode == 2:  # eval.py's refusal, its last message: the model cannot run this length (or another reason)
        return {**entry, "status": "cannot run", "reason": " ".join(stderr.rsplit("error: ", 1)[-1].split())}
    oom = "out of memory" in stderr.lower() or "OutOfMemoryError" in stderr
    return {**entry, "status": "oom" if oom else "failed", "reason": last_lines[-300:] or f"exit code {returncode}"}


def report(out: Path, trained: list[dict], evaluations: list[dict], metric: str, env: dict) -> str:
    """length_generalization.{md,csv,json,png}; returns the markdown table."""
    rows = [{"variant": e["label"], "seq_len": e["seq_len"], "factor": e["factor"], "status": e["status"],
             "metric": e.get(f"test/{metric}") if e["status"] == "ok" else None,
             "error": e["status"], "reason": e["reason"]}
            for e in evaluations]
    labels = list(dict.fromkeys(record["label"] for record in trained))
    table = (f"### test {metric} against evaluation length (trained at {trained[0]['seq_len']:,} tokens)\n\n"
             + benchlib.length_table(rows, labels, "metric", "{:.4g}"))
    reasons = [f"- {row['variant']}, {row['seq_len']:,}: {row['status']}: {row['reason'][:300]}"
               for row in rows if row["status"] != "ok"]
    if reasons:
        table += "\n\n" + "\n".join(reasons)
    benchlib.write_reports(out, "length_generalization", rows, env, table)
    benchlib.plot_against_length(out / "length_generalization.png", rows, "variant", [("metric", f"test {metric}")])
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser, series=SERIES, lengths=None, steps=2000, tokens_per_step=16384,
                        out="results/length-generalization")
    parser.add_argument("--train-length", type=int, default=1024, help="the one training length (default 1024)")
    parser.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4, 8, 16],
                        help="evaluation lengths as multiples of the training length (default 1 2 4 8 16)")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="tokens per evaluation batch (default 65536)")
    parser.add_argument("--data", default="synthetic", help=f"data group: {', '.join(DATA_GROUPS)}")
    parser.add_argument("--data-path", default=None, help="data.path of the data group")
    parser.add_argument("--objective", default="clm", choices=["clm", "mlm"])
    args = parser.parse_args()
    if args.train_length < 1 or not args.factors or min(args.factors) < 1 or args.eval_tokens < 1:
        raise UsageError("--train-length, --factors and --eval-tokens must be positive integers.")
    args.lengths = [args.train_length]
    overrides = [*data_overrides(args.data, args.data_path), f"objective={args.objective}"]
    spec = spec_from(args, title=f"Length generalisation, training at {args.train_length:,}: data={args.data}, "
                                 f"objective={args.objective}", overrides=overrides)
    if args.dry_run:
        return run_sweep(spec)
    trained_ok = run_sweep(spec) == 0
    sweep = read_records(spec.out / "points.jsonl")
    trained = [sweep[point.key] for point in plan_points(spec.series, spec.lengths, spec.budget, spec.overrides)
               if point.key in sweep]
    jsonl = spec.out / "evaluations.jsonl"
    lengths = sorted({factor * args.train_length for factor in args.factors})
    done = read_records(jsonl)
    todo = [(record, seq_len) for record in trained if record["status"] == "ok" for seq_len in lengths
            if evaluation_key(record, seq_len) not in done]

    def evaluate(item: tuple[dict, int], gpu: str | None) -> dict:
        record, seq_len = item
        return evaluation(record, spec.out, seq_len, args.eval_tokens, args.timeout, gpu)

    for entry in on_slots(evaluate, todo, args.gpus or [None]):  # side by side as the sweep's points
        append_record(jsonl, entry)
        done[entry["key"]] = entry
        shown = f"test = {entry.get('test/' + primary_metric([entry], 'auto'), math.nan):.4g}" \
            if entry["status"] == "ok" else entry["reason"][:200]
        print(f"{entry['label']} at {entry['seq_len']:,}: {entry['status']} ({shown})", flush=True)
    evaluations = [done[evaluation_key(r, n)] for r in trained for n in lengths if evaluation_key(r, n) in done]
    if not evaluations:
        print("no trained point to evaluate", file=sys.stderr)
        return 1
    env = {"study": spec.title, **({"STAND-IN": spec.stand_in} if spec.stand_in else {}),
           "budget": spec.budget.describe(), "evaluation": f"eval.py, {args.eval_tokens:,} tokens per batch",
           **benchlib.environment()}
    print(report(spec.out, trained, evaluations, primary_metric(evaluations, "auto"), env))
    return 0 if trained_ok and all(e["status"] in ("ok", "cannot run") for e in evaluations) else 1


if __name__ == "__main__":
    main_guard(main)
