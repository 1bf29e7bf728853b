"""A sweep's reports (table.md, table.csv, table.json, metric_vs_length.png, memory_vs_length.png),
made from its records: runlib.py runs the points and records each in points.jsonl, and rewrites
the reports from the records with `write_outputs` after every point."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import benchlib

if TYPE_CHECKING:
    from runlib import Point, SweepSpec

METRIC_LABELS = {"bpc": "test bits per character", "ppl": "test perplexity", "acc": "test accuracy (scored tokens)"}


def primary_metric(records: list[dict], wanted: str) -> str:
    """'bpc', 'ppl' or 'acc': `wanted`, or for 'auto' the one the data reports (bpc or ppl)."""
    if wanted != "auto":
        return wanted
    for record in records:
        for metric in ("bpc", "ppl"):
            if f"test/{metric}" in record:
                return metric
    return "ppl"


def format_count(n: float | None) -> str:
    if n is None:
        return "–"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:.0f}"


def markdown_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def summarise(plan: list[Point], records: dict[str, dict], metric: str) -> list[dict]:
    """One row per (series, length): mean and std over the seeds that finished ok, and their status."""
    groups: dict[tuple[str, int], list[Point]] = {}
    for point in plan:
        groups.setdefault((point.series.label, point.seq_len), []).append(point)
    rows = []
    for (label, seq_len), points in groups.items():
        done = [records[p.key] for p in points if p.key in records]
        ok = [r for r in done if r["status"] == "ok" and isinstance(r.get(f"test/{metric}"), (int, float))]
        values = [r[f"test/{metric}"] for r in ok]

        def mean_of(key):
            found = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            return statistics.fmean(found) if found else None

        rows.append({
            "label": label, "seq_len": seq_len, "seeds_ok": len(ok), "seeds": len(points),
            "pending": len(points) - len(done), "metric": statistics.fmean(values) if values else None,
            "metric_std": statistics.stdev(values) if len(values) > 1 else None, "params": mean_of("params"),
            "peak_mem_gib": mean_of("peak_mem_gib"), "tokens_per_s": mean_of("tokens_per_s"),
            "failures": [r for r in done if r["status"] != "ok"],
        })
    return rows


def metric_format(metric: str) -> str:
    return {"bpc": "{:.3f}", "ppl": "{:.2f}", "acc": "{:.3f}"}.get(metric, "{:.4g}")


def summary_cell(row: dict, key: str, fmt: str, with_std: bool = False) -> str:
    if row[key] is not None:
        text = fmt.format(row[key])
        if with_std and row["metric_std"] is not None:
            text += " ± " + fmt.format(row["metric_std"])
        if row["seeds_ok"] < row["seeds"]:
            text += f" ({row['seeds_ok']}/{row['seeds']} seeds)"
        return text
    if row["failures"]:
        first = row["failures"][0]
        return {"oom": "OOM", "timeout": "timeout"}.get(first["status"], "failed")
    return "pending" if row["pending"] else "–"


def markdown_report(spec: "SweepSpec", plan: list[Point], records: dict[str, dict], metric: str) -> str:
    rows = summarise(plan, records, metric)
    labels = list(dict.fromkeys(p.series.label for p in plan))
    lengths = list(dict.fromkeys(p.seq_len for p in plan))
    header = ["attention"] + [benchlib.format_length(n) for n in lengths]
    by = {(r["label"], r["seq_len"]): r for r in rows}
    fmt = metric_format(metric)

    def wide(key, cell_fmt, with_std=False):
        return benchlib.markdown_table(header, [[label] + [summary_cell(by[label, n], key, cell_fmt, with_std)
                                                           for n in lengths] for label in labels])

    parts = [f"## {spec.title}"]
    if spec.stand_in:
        parts.append(f"**STAND-IN** — {spec.stand_in}. Not the paper's data or budget; do not compare these "
                     f"numbers with published ones.")
    parts.append(f"Budget: {spec.budget.describe()}. Every row: the same recipe, steps, seeds and budget; "
                 f"no kind is tuned.")
    seeds_note = " (mean ± std over seeds)" if len(spec.budget.seeds) > 1 else ""
    parts += [f"### {METRIC_LABELS.get(metric, metric)}{seeds_note}", wide("metric", fmt, True),
              "### peak training memory (GiB)", wide("peak_mem_gib", "{:.2f}"),
              "### training tokens/s", wide("tokens_per_s", "{:,.0f}"),
              "### parameters", benchlib.markdown_table(header, [
                  [label] + [format_count(by[label, n]["params"]) if by[label, n]["params"] else
                             summary_cell(by[label, n], "params", "{}") for n in lengths] for label in labels])]
    point_header = ["attention", "length", "seed", "batch x accum", f"test {metric}", f"val {metric}", "params",
                    "peak GiB", "tokens/s", "status", "config"]
    body = []
    for point in plan:
        record = records.get(point.key)
        if record is None:
            body.append([point.series.label, point.seq_len, point.seed, f"{point.batch_size} x {point.accumulate}",
                         "", "", "", "", "", "pending", ""])
            continue

        def number(key, cell_fmt):
            value = record.get(key)
            return cell_fmt.format(value) if isinstance(value, (int, float)) else ""

        status = record["status"] if record["status"] == "ok" else f"{record['status']}: {record['reason']}"
        body.append([point.series.label, point.seq_len, point.seed, f"{point.batch_size} x {point.accumulate}",
                     number(f"test/{metric}", fmt), number(f"val/{metric}", fmt),
                     format_count(record.get("params")) if record.get("params") else "",
                     number("peak_mem_gib", "{:.2f}"), number("tokens_per_s", "{:,.0f}"),
                     markdown_cell(status[:300]), f"`{record['config']}`" if record["config"] else ""])
    parts += ["### every point (configs relative to this folder)", benchlib.markdown_table(point_header, body)]
    return "\n\n".join(parts)


def plot_metric(path: Path, rows: list[dict], metric: str, title: str = "") -> None:
    """Metric against length, one line per series, error bars over seeds; failed points left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    for label in dict.fromkeys(row["label"] for row in rows):
        points = [(r["seq_len"], r["metric"], r["metric_std"] or 0.0) for r in rows
                  if r["label"] == label and r["metric"] is not None]
        if points:
            x, y, err = zip(*points)
            axis.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label=label)
    axis.set_xscale("log", base=2)
    lengths = sorted({row["seq_len"] for row in rows})
    axis.set_xticks(lengths, [benchlib.format_length(n) for n in lengths])
    axis.minorticks_off()
    if title:
        axis.set_title(title, fontsize=9)
    if metric == "ppl":
        axis.set_yscale("log")
    if metric == "acc":
        axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("sequence length (tokens)")
    axis.set_ylabel(METRIC_LABELS.get(metric, metric))
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def csv_rows(plan: list[Point], records: dict[str, dict]) -> list[dict]:
    """The finished points in plan order, flat (overrides as one string) for table.csv."""
    rows = []
    for point in plan:
        if point.key in records:
            record = {k: v for k, v in records[point.key].items() if k != "key"}
            record["overrides"] = " ".join(record.get("overrides", []))
            rows.append(record)
    return rows


def write_outputs(spec: "SweepSpec", plan: list[Point], records: dict[str, dict], env: dict) -> str:
    """table.md/.csv/.json and the two plots from the records; returns the markdown."""
    metric = primary_metric([records[p.key] for p in plan if p.key in records], spec.metric)
    table = markdown_report(spec, plan, records, metric)
    benchlib.write_reports(spec.out, "table", csv_rows(plan, records), env, table)
    summary = summarise(plan, records, metric)
    try:
        plot_metric(spec.out / "metric_vs_length.png", summary, metric,
                    ("STAND-IN: " if spec.stand_in else "") + spec.title)
        benchlib.plot_against_length(spec.out / "memory_vs_length.png", summary, "label",
                                     [("peak_mem_gib", "peak training memory (GiB)"),
                                      ("tokens_per_s", "training tokens/s")])
    except Exception as error:  # noqa: BLE001 - a plot must not end a sweep
        print(f"warning: plotting failed ({type(error).__name__}: {error})", file=sys.stderr)
    return (spec.out / "table.md").read_text()
