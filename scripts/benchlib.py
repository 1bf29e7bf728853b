"""What the benchmark scripts share: their rows (series) and arguments, timing, OOM-tolerant runs,
provenance and report files."""

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from series import Series, UsageError, parse_series, parse_series_list

# The rows every benchmark compares by default, as series (series.py): train.py's overrides, labelled.
# Exact attention first on its fastest kernel on Hopper (cuDNN; ratios are taken against the first
# full row), then on FlashAttention-2.
SERIES = ["full (cuDNN): model=full model.attention.backend=cudnn",
          "full (flash): model=full model.attention.backend=flash",
          "fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2",
          "fma m=32 p=2: model=fma model.attention.block_size=32 model.attention.rank=2",
          "local w=128: model=local model.attention.window=128", "model=linear", "model=htransformer", "model=reformer",
          "model=fastmax"]
# The kinds without a causal form, which the bidirectional benchmarks add to SERIES (`rows_to_run`).
BIDIRECTIONAL_SERIES = ["model=nystromformer", "model=linformer"]


def rows_to_run(series: list[Series], bidirectional: bool) -> list[Series]:
    """The rows: bidirectional, the default rows gain the kinds that have no causal form."""
    if bidirectional and series == parse_series_list(SERIES):
        return series + parse_series_list(BIDIRECTIONAL_SERIES)
    return series


def benchmark_parser(doc: str, *, lengths: list[int], tokens: int | None, out: str, tokens_help: str = "",
                     repeats: bool = True, series: list[str] = SERIES):
    """The arguments every benchmark takes (--tokens where it fixes tokens per batch, --repeats where it
    times calls itself); a script adds its own before parse_args()."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", nargs="+", default=series, metavar="SERIES",
                        help="the rows: attention settings as train.py overrides, optionally after a label and "
                             "a colon (scripts/series.py), e.g. 'fma m=32: model=fma model.attention.block_size=32'; "
                             "default: " + ", ".join(parse_series(one).label for one in series))
    parser.add_argument("--lengths", nargs="+", type=int, default=lengths)
    if tokens is not None:
        parser.add_argument("--tokens", type=int, default=tokens, help=tokens_help)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    if repeats:
        parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args, with --series parsed into Series (a bad one ends with the parser's usage error)."""
    args = parser.parse_args(argv)
    try:
        args.series = parse_series_list(args.series)
    except UsageError as error:
        parser.error(str(error))
    return args


def model_config(series: Series, seq_len: int, **model) -> dict:
    """The series' `model` config as train.py composes it at this length (configs/model/<kind>.yaml, the
    series' overrides, then model.<key>=<value> for each of `model`), resolved: FMA's max_seq_len is
    data.seq_len, so its learned basis covers the length."""
    cfg = series.compose(f"data.seq_len={seq_len}", *(f"model.{key}={value}" for key, value in model.items()))
    return OmegaConf.to_container(cfg.model, resolve=True)


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")


def cpu_name() -> str:
    """The CPU model and core count (Linux /proc/cpuinfo; platform's guess elsewhere)."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Hardware, software, date and the exact command: every reported number carries these."""
    return {
        "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


class CudaTimer:
    """Milliseconds between CUDA events around a block (the GPU's time, not the host's queueing)."""

    def __enter__(self):
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.start.record()

    def __exit__(self, *exc):
        self.end.record()
        self.end.synchronize()
        self.ms = self.start.elapsed_time(self.end)


class WallTimer:
    """The same on a CPU: wall-clock milliseconds."""

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.ms = (time.perf_counter() - self.start) * 1e3


def cuda_median_ms(step, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median over `repeats` CUDA-event timings of `step()`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    timer, times = CudaTimer(), []
    for _ in range(repeats):
        with timer:
            step()
        times.append(timer.ms)
    return statistics.median(times)


def measure(step, *, warmup: int = 3, repeats: int = 10) -> dict:
    """{"ms", "peak_gib"} of `step`, or {"error": "OOM" | message} if it fails; never raises."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = cuda_median_ms(step, warmup=warmup, repeats=repeats)
        return {"ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as error:  # a kind that cannot run a shape is a result, not a crash
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    finally:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def write_reports(out_dir: Path, name: str, rows: list[dict], env: dict, table_md: str) -> None:
    """name.csv, name.json (rows + environment) and name.md (environment + table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    provenance = "\n".join(f"- {key}: `{value}`" for key, value in env.items())
    (out_dir / f"{name}.md").write_text(f"{provenance}\n\n{table_md}\n")


def markdown_table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    return "\n".join(lines)


def length_table(rows: list[dict], variants: list[str], key: str, fmt: str) -> str:
    """Markdown table of rows[key]: one row per variant, one column per sequence length; a failed
    point shows its error (e.g. OOM)."""
    lengths = sorted({row["seq_len"] for row in rows})
    by_point = {(row["variant"], row["seq_len"]): row for row in rows}

    def cell(variant, n):
        row = by_point[variant, n]
        return fmt.format(row[key]) if row[key] is not None else row["error"]

    return markdown_table(["variant"] + [format_length(n) for n in lengths],
                          [[variant] + [cell(variant, n) for n in lengths] for variant in variants])


def format_length(n: int) -> str:
    """A column header: 1024 -> 1K, 512 -> 512."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_against_length(path: Path, rows: list[dict], series_key: str, metrics: list[tuple[str, str]]) -> None:
    """One log-log panel per (metric key, axis label), one line per series; failed points left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    axes = axes[0]
    for axis, (key, label) in zip(axes, metrics):
        for series in dict.fromkeys(row[series_key] for row in rows):
            points = [(row["seq_len"], row[key]) for row in rows
                      if row[series_key] == series and row.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=series)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
