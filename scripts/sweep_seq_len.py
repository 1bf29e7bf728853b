"""One model, several attention kinds, several sequence lengths, the same training budget: one table.

Every point (attention setting x length x seed) trains with the same optimizer steps and the same
tokens per step (`data.batch_size` = tokens / seq_len, gradient accumulation above
--micro-batch-tokens), then scores the test split. Collected into one CSV and a markdown table:
the final test and validation metric, parameters, peak training memory and tokens/s per point.

    python scripts/sweep_seq_len.py --lengths 512 1024 2048 \\
        --series model=full "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2" \\
        model=local model=linear --data enwik8 --data-path /data/enwik8.zip --objective clm \\
        --budget-steps 2000 --tokens-per-step 16384 --overrides trainer=gpu --out results/sweep

    --series         attention settings, each one string of train.py overrides with model=KIND
                     (full, fma, local, linear, reformer, htransformer) among them, optionally after
                     a label and a colon: "fma m=32: model=fma model.attention.block_size=32"
                     (unlabelled, "model=fma model.attention.block_size=32" is "fma block_size=32")
    --data           data group: synthetic (default), enwik8, wikitext103, text; --data-path its path
    --objective      clm (default) or mlm
    --seeds 0 1 2    several seeds: mean ± std in the table
    --model-overrides model.dim=512 model.depth=6 model.num_heads=8   the model size of every point
    --overrides      any other Hydra override for every point (trainer=gpu, data.vocab_size=..., ...)
    --timeout S      stop a point after S seconds (status timeout); --gpus 0 1 2 3 runs points side by side
    --dry-run        print the train.py command of every point and stop

Each point runs as its own `train.py` process in <out>/points/<name>/ (its .hydra/config.yaml is the
exact config; stdout.log and stderr.log are kept). A point that runs out of memory or fails is
recorded with its status and reason and the sweep goes on; once every point ran, the script exits 1
if any is not ok (naming them), 0 if all are. Results are appended to
<out>/points.jsonl as points finish; run the same command again after an interruption and it runs
only the points not yet recorded (--retry-failed also reruns failed ones). Writes <out>/table.md,
table.csv (one row per point, with its overrides and config path), table.json,
metric_vs_length.png, memory_vs_length.png and points.jsonl; the markdown table is printed last.

The same thing as a plain Hydra multirun, without the resume and the table:
`python train.py -m model=full,fma data.seq_len=512,1024 data.batch_size=32 ...` (one batch size
for all lengths there, so tokens per step differ; this script keeps them equal).
"""

import argparse

from runlib import DATA_GROUPS, add_sweep_arguments, data_overrides, main_guard, run_sweep, spec_from

SERIES = ["model=full", "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2", "model=local",
          "model=linear"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser, series=SERIES, lengths=[512, 1024, 2048, 4096], steps=1000, tokens_per_step=16384,
                        out="results/sweep")
    parser.add_argument("--data", default="synthetic", help=f"data group: {', '.join(DATA_GROUPS)}")
    parser.add_argument("--data-path", default=None, help="data.path of the data group")
    parser.add_argument("--objective", default="clm", choices=["clm", "mlm"])
    parser.add_argument("--metric", default="auto", choices=["auto", "bpc", "ppl", "acc"],
                        help="the table's metric (auto: bpc or ppl, whichever the data reports)")
    parser.add_argument("--title", default=None, help="the table's title")
    args = parser.parse_args()
    overrides = [*data_overrides(args.data, args.data_path), f"objective={args.objective}"]
    title = args.title or f"Sequence-length sweep: data={args.data}, objective={args.objective}"
    spec = spec_from(args, title=title, overrides=overrides, metric=args.metric,
                     notes={"data": f"{args.data} ({args.data_path or 'no path'})", "objective": args.objective})
    return run_sweep(spec)


if __name__ == "__main__":
    main_guard(main)
