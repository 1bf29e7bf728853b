"""What each attention kind can retrieve from far away: accuracy on a synthetic task at 1K-16K tokens.

    python scripts/long_range_diagnostic.py --task copy --lengths 1024 2048 4096 8192 16384 \\
        --series model=full "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2" \\
        "fma m=16 p=4: model=fma model.attention.block_size=16 model.attention.rank=4" model=local model=linear \\
        model=reformer model=htransformer \\
        [--budget-steps N] [--tokens-per-step T] [--seeds 0 1 2] [--overrides trainer=gpu] --out results/diagnostic

Trains every kind on `data=synthetic` (generated in memory, no files) at every length with the same
budget (steps, tokens per step, seeds, recipe, model: 4 layers, d_model 256, 4 heads unless
--model-overrides), then reports `test/acc`, the accuracy on the scored tokens only, as a table
(kind x length) and a plot (accuracy against length), with peak memory and tokens/s alongside.

The tasks (data/synthetic.py; vocabulary data.vocab_size=16, the last symbol a separator):
- copy (the default): random symbols, a separator, the same symbols again. Each copied token sits n/2 positions
  after its source, so once n/2 exceeds the near field (local: its window; FMA: 2m causal) it must
  be read exactly through the far field. Chance: 1/(vocab_size - 1).
- recall (associative recall): up to (vocab_size - 2) / 2 key-value pairs open the row (7 with the
  default 16 symbols), filler follows, and after a separator every key is asked once, in order, at
  the end of the row: each answer is about n tokens back and appears nowhere else, so it must be
  found by content through the far field. Scored are the query part's keys (a fixed order) and
  values; chance: about (1 + 1/(number of values))/2. Fewer scored tokens per row than copy, but
  matching one key among a few is an easier circuit than copying at a fixed distance.

Exact attention (`full`) sees every token at full resolution; `local` sees only its window, so it
marks what the near field alone achieves; FMA adds learned coarse summaries of the far field, one
level per doubling of distance, whose resolution (m/p tokens per summary near the query, coarser
farther away) bounds what it can retrieve exactly: the gap between FMA and full at a length, and
between FMA and local, is what its far field can and cannot retrieve. Failed or out-of-memory points
are recorded, not fatal; an interrupted run resumes (see scripts/runlib.py).

Writes to --out (default results/diagnostic-<task>): table.md, table.csv, table.json,
metric_vs_length.png (accuracy), memory_vs_length.png, points.jsonl and points/<name>/ (each run,
with its exact config). --dry-run prints the commands. The markdown table is printed last.
"""

import argparse
from pathlib import Path

from runlib import add_sweep_arguments, main_guard, run_sweep, spec_from
from series import override_key

SERIES = ["model=full", "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2",
          "fma m=16 p=4: model=fma model.attention.block_size=16 model.attention.rank=4",
          "model=local", "model=linear", "model=reformer", "model=htransformer"]
LENGTHS = [1024, 2048, 4096, 8192, 16384]
MODEL = ["model.depth=4", "model.dim=256", "model.num_heads=4"]


def chance(task: str, vocab_size: int) -> float:
    """Accuracy of guessing: copy, one of the symbols; recall, the keys known, one of the values."""
    if task == "copy":
        return 1 / (vocab_size - 1)
    values = (vocab_size - 2) - (vocab_size - 2) // 2
    return (1 + 1 / values) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["copy", "recall"], default="copy")
    add_sweep_arguments(parser, series=SERIES, lengths=LENGTHS, steps=2000, tokens_per_step=16384,
                        out="results/diagnostic-<task>")
    args = parser.parse_args()
    if str(args.out) == "results/diagnostic-<task>":
        args.out = Path(f"results/diagnostic-{args.task}")
    vocab = next((int(o.split("=", 1)[1]) for o in args.overrides if override_key(o) == "data.vocab_size"), 16)
    overrides = ["data=synthetic", f"data.task={args.task}", "objective=clm", *MODEL]
    notes = {"task": f"synthetic {args.task}, vocabulary {vocab}; chance accuracy about {chance(args.task, vocab):.3f}",
             "model": "4 layers, d_model 256, 4 heads unless --model-overrides: "
             + (" ".join(args.model_overrides) or "none")}
    title = f"Long-range diagnostic: synthetic {args.task} task, test accuracy on the scored tokens"
    return run_sweep(spec_from(args, title=title, overrides=overrides, metric="acc", notes=notes))


if __name__ == "__main__":
    main_guard(main)
