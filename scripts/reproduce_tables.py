"""The paper's comparison tables (FMA, arXiv 2310.11960) with one command each.

    python scripts/reproduce_tables.py --table enwik8    --data-path /data/enwik8.zip     --out results/enwik8
    python scripts/reproduce_tables.py --table wt103-mlm --data-path /data/wikitext-103   --out results/wt103-mlm
    python scripts/reproduce_tables.py --table wt103-clm --data-path /data/wikitext-103   --out results/wt103-clm
        [--budget-steps N] [--tokens-per-step T] [--micro-batch-tokens M] [--lengths 512 1024 2048 4096]
        [--series model=full "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2" ...]
        [--seeds 0 1 2] [--model-overrides model.dim=...] [--overrides trainer=gpu]
        [--stand-in-label "..."] [--timeout S] [--gpus 0 1 ...] [--dry-run]

| --table | data | objective | metric |
|---|---|---|---|
| enwik8 | `data=enwik8` (`--data-path` the raw file, .zip or .gz); `--data text --data-path f.txt`: any file, byte level | causal LM | test bits per character |
| wt103-mlm | `data=wikitext103` (`--data-path` a folder with wiki.{train,valid,test}.tokens); `--data text`: a file, BPE | masked LM (15% masked) | test perplexity of the masked tokens |
| wt103-clm | as wt103-mlm | causal LM | test perplexity |

Every table: sequence lengths 512, 1024, 2048, 4096; a 6-layer model, d_model 512, 8 heads for
every row; rows full, fma m=64 p=2, fma m=32 p=2, htransformer, linear, reformer, local, fastmax, and
for the masked LM also nystromformer and linformer (bidirectional only; the masked LM runs every kind
bidirectionally). Columns: the test metric, parameters, peak training memory and
training tokens/s per length. Every row gets the same recipe (configs/train.yaml's optimizer and
schedule), steps, tokens per step, seeds and budget; no kind is tuned. The defaults (2,000 steps x
16,384 tokens) are a reduced budget, not the paper's; say so when you report them.

Writes to --out (default results/<table>): table.md (environment, budget, data, "STAND-IN" label if
given, the tables, and every point with its config path), table.csv and table.json (one row per
point: all its overrides, status, metrics, config path), metric_vs_length.png,
memory_vs_length.png (peak memory and tokens/s against length), points.jsonl (the raw records;
an interrupted run resumes from them), and points/<name>/ (each point's train.py run folder, with
.hydra/config.yaml, the exact config). The markdown table is printed last. A point that runs out of
memory or fails is recorded as such and the table goes on. The runner is scripts/runlib.py, the
same one as sweep_seq_len.py and long_range_diagnostic.py.

Stand-ins when the real corpora are not at hand: build them from WikiText-2 once,

    python scripts/reproduce_tables.py --make-wikitext-standin data/wikitext2-standin

which splits ../shared/data/wikitext-2/valid.txt at a line boundary into wiki.train.tokens (90%)
and wiki.valid.tokens (10%), copies test.txt to wiki.test.tokens, writes the three concatenated
as bytes.raw for a byte-level enwik8-style table, and prints the three table commands to run on it
(`--data enwik8 --data-path DIR/bytes.raw --overrides data.split_bytes=[...]` and
`--data-path DIR` for the WikiText tables), labelled with --stand-in-label.
(`--wikitext2-dir` picks another source folder; `--standin-max-bytes N` keeps at most N bytes of
each source file, for smoke tests.)
"""

import argparse
import shlex
from pathlib import Path

from runlib import ROOT, UsageError, add_sweep_arguments, data_overrides, main_guard, run_sweep, spec_from

SERIES = ["model=full", "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2",
          "fma m=32 p=2: model=fma model.attention.block_size=32 model.attention.rank=2",
          "model=htransformer", "model=linear", "model=reformer", "model=local"]
LENGTHS = [512, 1024, 2048, 4096]
MODEL = ["model.depth=6", "model.dim=512", "model.num_heads=8"]  # the paper's size, every row
# Each table's rows: SERIES, then the kinds defined for its objective that the paper's tables lack
# (Nyströmformer and Linformer are bidirectional only).
TABLES = {
    "enwik8": {"title": "enwik8, causal LM: test bits per character", "data": "enwik8", "objective": "clm",
               "metric": "bpc", "tokenizer": "byte", "more_series": ["model=fastmax"]},
    "wt103-mlm": {"title": "WikiText-103, masked LM: test perplexity of masked tokens", "data": "wikitext103",
                  "objective": "mlm", "metric": "ppl", "tokenizer": "bpe",
                  "more_series": ["model=fastmax", "model=nystromformer", "model=linformer"]},
    "wt103-clm": {"title": "WikiText-103, causal LM: test perplexity", "data": "wikitext103", "objective": "clm",
                  "metric": "ppl", "tokenizer": "bpe", "more_series": ["model=fastmax"]},
}
WIKITEXT2 = ROOT.parent / "shared" / "data" / "wikitext-2"


def table_data(table: dict, data: str | None, path: str | None) -> list[str]:
    """The data overrides of a table: its own data group, or a text file tokenised as the table needs."""
    data = data or table["data"]
    allowed = {"bpc": ("enwik8", "text"), "ppl": ("wikitext103", "text")}[table["metric"]]
    if data not in allowed:
        raise UsageError(f"--data {data} does not fit this table; use {' or '.join(allowed)}.")
    overrides = data_overrides(data, path)
    return overrides + [f"data.tokenizer={table['tokenizer']}"] if data == "text" else overrides


def head(data: bytes, max_bytes: int | None) -> bytes:
    """At most max_bytes of data, cut after a line end."""
    if max_bytes is None or len(data) <= max_bytes:
        return data
    cut = data.rfind(b"\n", 0, max_bytes) + 1
    return data[: cut or max_bytes]


def make_wikitext_standin(out: Path, source: Path, max_bytes: int | None) -> None:
    """WikiText-2 valid.txt -> train (90%) + valid (10%), test.txt -> test; plus bytes.raw of all three."""
    try:
        valid, test = head((source / "valid.txt").read_bytes(), max_bytes), head((source / "test.txt").read_bytes(),
                                                                                  max_bytes)
    except OSError as error:
        raise UsageError(f"cannot read WikiText-2 from {source} ({error}); pass --wikitext2-dir DIR with "
                         f"valid.txt and test.txt.") from error
    cut = valid.rfind(b"\n", 0, int(len(valid) * 0.9)) + 1 or int(len(valid) * 0.9)
    splits = {"train": valid[:cut], "valid": valid[cut:], "test": test}
    out.mkdir(parents=True, exist_ok=True)
    for split, data in splits.items():
        (out / f"wiki.{split}.tokens").write_bytes(data)
    (out / "bytes.raw").write_bytes(b"".join(splits.values()))
    sizes = ",".join(str(len(data)) for data in splits.values())
    label = f"WikiText-2 stand-in ({source}: valid.txt split 90/10 into train/valid, test.txt as test)"
    script = "python scripts/reproduce_tables.py"
    print(f"wrote {out}/wiki.{{train,valid,test}}.tokens ({sizes.replace(',', ', ')} bytes) and bytes.raw\n")
    print(f"{script} --table enwik8 --data enwik8 --data-path {out / 'bytes.raw'} "
          f"--overrides 'data.split_bytes=[{sizes}]' --stand-in-label {shlex.quote(label + ', byte level')} "
          f"--out results/enwik8-standin")
    for table in ("wt103-mlm", "wt103-clm"):
        print(f"{script} --table {table} --data-path {out} --overrides data.vocab_size=4096 "
              f"--stand-in-label {shlex.quote(label + ', BPE 4096')} --out results/{table}-standin")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=list(TABLES))
    parser.add_argument("--data", default=None, help="enwik8 table: enwik8 (default) or text; WikiText tables: "
                                                     "wikitext103 (default) or text")
    parser.add_argument("--data-path", default=None, help="the dataset: enwik8 file, WikiText-103 folder, text file")
    parser.add_argument("--make-wikitext-standin", type=Path, default=None, metavar="DIR",
                        help="write a WikiText-2 stand-in corpus to DIR, print the commands for it, and stop")
    parser.add_argument("--wikitext2-dir", type=Path, default=WIKITEXT2, help=f"default {WIKITEXT2}")
    parser.add_argument("--standin-max-bytes", type=int, default=None, help="keep at most N bytes per source file")
    add_sweep_arguments(parser, series=SERIES, lengths=LENGTHS, steps=2000, tokens_per_step=16384,
                        out="results/<table>")
    args = parser.parse_args()
    if args.make_wikitext_standin:
        make_wikitext_standin(args.make_wikitext_standin, args.wikitext2_dir, args.standin_max_bytes)
        return 0
    if args.table is None:
        raise UsageError("pass --table enwik8|wt103-mlm|wt103-clm (or --make-wikitext-standin DIR).")
    table = TABLES[args.table]
    if args.series is SERIES:  # not given: the table's own rows
        args.series = SERIES + table["more_series"]
    if str(args.out) == "results/<table>":
        args.out = Path("results") / args.table
    overrides = [*table_data(table, args.data, args.data_path), f"objective={table['objective']}", *MODEL]
    notes = {"data": f"{args.data or table['data']}: {args.data_path or '(default location)'}",
             "objective": table["objective"], "model": "6 layers, d_model 512, 8 heads unless --model-overrides: "
             + (" ".join(args.model_overrides) or "none")}
    return run_sweep(spec_from(args, title=table["title"], overrides=overrides, metric=table["metric"], notes=notes))


if __name__ == "__main__":
    main_guard(main)
