"""The comparison scripts end to end at a tiny scale: each table, the diagnostic, failures and resume;
series (attention settings) and the benchmarks' planning.

Every point is a real train.py process (about 5 s of imports each on CPU), so the runs are kept to a
few points of a 1-layer, 32-wide model trained for 3 steps.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fma
from conftest import ROOT
from models import ExclusiveDevice

SCRIPTS = ROOT / "scripts"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT2 = SHARED_DATA / "wikitext-2"
sys.path.insert(0, str(SCRIPTS))

import bench_attention  # noqa: E402
import bench_train  # noqa: E402
import benchlib  # noqa: E402
import long_range_diagnostic  # noqa: E402
import reproduce_tables  # noqa: E402
import runlib  # noqa: E402
import sweep_report  # noqa: E402
from series import Series, UsageError, parse_series, parse_series_list  # noqa: E402

needs_wikitext2 = pytest.mark.skipif(not (WIKITEXT2 / "valid.txt").exists(), reason="needs ../shared/data/wikitext-2")


def tiny(tmp_path: Path, steps: int = 3) -> list[str]:
    """Budget and model for a CPU test; caches under tmp_path."""
    return ["--budget-steps", str(steps), "--model-overrides", "model.dim=32", "model.depth=1", "model.num_heads=2",
            "--overrides", "trainer=cpu", "optim.warmup_steps=2", "trainer.enable_model_summary=false",
            "data.val_windows=8", "data.eval_batch_size=32", f"paths.cache_dir={tmp_path / 'cache'}"]


def run_script(name: str, args: list[str], cwd: Path, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, **popen)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]


def check_table(out: Path, metric: str, points: int, stand_in: str | None = None) -> list[dict]:
    """The report files exist; every point ran ok with finite metrics, parameters, memory, throughput."""
    for name in ("table.md", "table.csv", "table.json", "metric_vs_length.png", "memory_vs_length.png",
                 "points.jsonl"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == points
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert math.isfinite(float(row[f"test/{metric}"])) and math.isfinite(float(row[f"val/{metric}"]))
        assert float(row["peak_mem_gib"]) > 0 and float(row["tokens_per_s"]) > 0
        result = json.loads((out / row["run_dir"] / "result.json").read_text())   # what the row was read from
        assert int(row["params"]) == result["parameters"]["total"] > 0
        assert float(row["tokens_per_s"]) == result["tokens_per_s"] and float(row["peak_mem_gib"]) == result["peak_mem_gib"]
        assert float(row[f"test/{metric}"]) == result["metrics"][f"test/{metric}"]
        assert (out / row["config"]).is_file() and f"data.seq_len={row['seq_len']}" in row["overrides"]
    table = (out / "table.md").read_text()
    assert "budget" in table and "torch" in table
    if stand_in:
        assert "STAND-IN" in table and stand_in in table
    return rows


def test_series_are_train_py_overrides_with_an_optional_label():
    labelled = parse_series("fma m=16 p=4: model=fma model.attention.block_size=16 model.attention.rank=4")
    assert labelled == Series("fma m=16 p=4", ("model=fma", "model.attention.block_size=16", "model.attention.rank=4"))
    assert labelled.kind == "fma"
    assert parse_series("model=fma  model.attention.block_size=32") == \
        Series("fma block_size=32", ("model=fma", "model.attention.block_size=32"))
    assert parse_series("model=full") == Series("full", ("model=full",))
    assert parse_series("model.dim=64 model=local").label == "local dim=64"   # the kind first
    for spec, message in [("full", "'full' is not a Hydra override"), ("fma: block_size=3", "name the attention kind"),
                          ("model=full model=fma", "name the attention kind once"),
                          ("model=nope", "Unknown attention kind 'nope'")]:
        with pytest.raises(UsageError, match=message):
            parse_series(spec)
    with pytest.raises(UsageError, match="same label"):
        parse_series_list(["model=full", "full: model=full model.attention.backend=math"])
    with pytest.raises(UsageError, match="same overrides"):
        parse_series_list(["a: model=full", "b: model=full"])


def test_presets_keep_their_labels_and_point_keys():
    """The comparison presets name today's rows, with the overrides (and so the point keys) of the
    committed results/*/points.jsonl."""
    assert [parse_series(spec).label for spec in reproduce_tables.SERIES] == [
        "full", "fma m=64 p=2", "fma m=32 p=2", "htransformer", "linear", "reformer", "local"]
    assert [parse_series(spec).label for spec in long_range_diagnostic.SERIES] == [
        "full", "fma m=64 p=2", "fma m=16 p=4", "local", "linear", "reformer", "htransformer"]
    committed = [json.loads(line) for line in (ROOT / "results" / "enwik8-standin" / "points.jsonl").read_text()
                 .splitlines()]
    for spec in reproduce_tables.SERIES:
        series = parse_series(spec)
        record = next(r for r in committed if r["label"] == series.label)
        assert record["overrides"][:len(series.overrides)] == list(series.overrides)


def test_planning_holds_the_budget_equal():
    budget = runlib.Budget(steps=10, tokens_per_step=1024, micro_batch_tokens=256)
    assert [budget.shape(n) for n in (32, 256, 512, 1024)] == [(8, 4), (1, 4), (1, 2), (1, 1)]
    assert budget.val_every == 10 and runlib.Budget(steps=8, tokens_per_step=64).val_every == 2
    with pytest.raises(runlib.UsageError, match="multiple"):
        budget.shape(2048)
    with pytest.raises(runlib.UsageError, match="held equal|--lengths"):
        runlib.check_user_overrides(["data.seq_len=64"])
    plan = runlib.plan_points([parse_series("model=full")], [32, 64], budget, ["model.dim=8", "trainer.max_steps=1"])
    assert [p.overrides.count("trainer.max_steps=1") for p in plan] == [1, 1]  # a later override replaces
    assert all(p.batch_size * p.accumulate * p.seq_len == 1024 for p in plan)


def test_seeds_give_mean_and_std_and_failures_show(tmp_path):
    budget = runlib.Budget(steps=4, tokens_per_step=128, seeds=(0, 1))
    plan = runlib.plan_points([parse_series("model=full")], [32, 64], budget, [])
    results = {32: [("ok", 1.0), ("ok", 1.2)], 64: [("oom", None), ("failed", None)]}
    records = {}
    for point in plan:
        status, value = results[point.seq_len][point.seed]
        records[point.key] = {"status": status, "reason": "CUDA out of memory" if status == "oom" else "boom",
                              "test/bpc": value, "params": 1000, "config": "", **({} if value is None else {
                                  "peak_mem_gib": 1.5, "tokens_per_s": 100.0})}
    spec = runlib.SweepSpec(title="t", series=[parse_series("model=full")], lengths=[32, 64], budget=budget,
                            overrides=[], out=tmp_path)
    table = sweep_report.markdown_report(spec, plan, records, "bpc")
    assert "| full | 1.100 ± 0.141 | OOM |" in table
    assert "failed: boom" in table and "(mean ± std over seeds)" in table


def test_records_survive_a_torn_line(tmp_path):
    jsonl = tmp_path / "points.jsonl"
    runlib.append_record(jsonl, {"key": "a", "status": "ok"})
    with open(jsonl, "a") as f:
        f.write('{"key": "b", "sta')  # a crash in the middle of a write
    assert list(runlib.read_records(jsonl)) == ["a"]
    runlib.append_record(jsonl, {"key": "c", "status": "ok"})
    assert list(runlib.read_records(jsonl)) == ["a", "c"]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A tiny WikiText-2 stand-in: wiki.{train,valid,test}.tokens and bytes.raw, via the script's helper."""
    if not (WIKITEXT2 / "valid.txt").exists():
        pytest.skip("needs ../shared/data/wikitext-2")
    folder = tmp_path_factory.mktemp("standin")
    result = run_script("reproduce_tables.py", ["--make-wikitext-standin", str(folder / "wt2"),
                                                "--standin-max-bytes", "16000"], cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--table enwik8" in result.stdout and "--table wt103-mlm" in result.stdout
    return folder / "wt2"


def test_enwik8_table(tmp_path, standin):
    sizes = [(standin / f"wiki.{split}.tokens").stat().st_size for split in ("train", "valid", "test")]
    assert sum(sizes) == (standin / "bytes.raw").stat().st_size
    out = tmp_path / "enwik8"
    result = run_script("reproduce_tables.py", [
        "--table", "enwik8", "--data-path", str(standin / "bytes.raw"), "--series", "model=full",
        "fma m=8 p=2: model=fma model.attention.block_size=8 model.attention.rank=2",
        "--lengths", "32", "64", "--tokens-per-step", "128", "--stand-in-label", "tiny CI stand-in",
        "--out", str(out), *tiny(tmp_path), f"data.split_bytes=[{','.join(map(str, sizes))}]"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_table(out, "bpc", 4, stand_in="tiny CI stand-in")
    assert {(r["label"], int(r["seq_len"])) for r in rows} == {(k, n) for k in ("full", "fma m=8 p=2") for n in (32, 64)}
    assert all("model.depth=1" in r["overrides"] and "objective=clm" in r["overrides"] for r in rows)
    table = (out / "table.md").read_text()
    assert "test bits per character" in table and "| fma m=8 p=2 |" in table
    assert result.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last


@pytest.mark.parametrize("table, series", [
    ("wt103-mlm", ["fma m=8 p=2: model=fma model.attention.block_size=8 model.attention.rank=2"]),
    ("wt103-clm", ["model=full", "model=local model.attention.window=8"]),
])
def test_wikitext_tables(tmp_path, standin, table, series):
    out = tmp_path / table
    result = run_script("reproduce_tables.py", [
        "--table", table, "--data-path", str(standin), "--series", *series, "--lengths", "32",
        "--tokens-per-step", "64", "--out", str(out), *tiny(tmp_path), "data.vocab_size=300"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_table(out, "ppl", len(series))
    assert [r["label"] for r in rows] == [parse_series(one).label for one in series]
    objective = "mlm" if table == "wt103-mlm" else "clm"
    assert all(f"objective={objective}" in r["overrides"] and "data=wikitext103" in r["overrides"] for r in rows)
    assert "perplexity" in (out / "table.md").read_text()


def test_chance_levels_by_hand():
    assert long_range_diagnostic.chance("copy", 16) == pytest.approx(1 / 15)   # one of 15 symbols
    # vocabulary 11: keys 0-3 and values 4-8 (see test_synthetic_recall_rows); half the scored
    # tokens are keys (known), half values (one of 5): (1 + 1/5) / 2
    assert long_range_diagnostic.chance("recall", 11) == pytest.approx(0.6)
    assert long_range_diagnostic.chance("recall", 16) == pytest.approx(4 / 7)


@pytest.mark.parametrize("task, lengths, series, gpus, chance", [
    ("copy", ["32", "64"], ["model=full", "local w=8: model=local model.attention.window=8"], ["0", "0"],
     "0.100"),   # vocabulary 11: 1/10
    ("recall", ["32"], ["fma m=8 p=2: model=fma model.attention.block_size=8 model.attention.rank=2"], [], "0.600"),
])
def test_long_range_diagnostic(tmp_path, task, lengths, series, gpus, chance):
    """Copy also runs two points side by side on one listed GPU (CPU here), taking turns."""
    out = tmp_path / "diagnostic"
    result = run_script("long_range_diagnostic.py", [
        "--task", task, "--lengths", *lengths, "--series", *series, "--tokens-per-step", "128",
        *(["--gpus", *gpus] if gpus else []), "--out", str(out), *tiny(tmp_path), "data.num_test=16",
        "data.vocab_size=11"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_table(out, "acc", len(lengths) * len(series))
    table = (out / "table.md").read_text()
    assert f"synthetic {task}, vocabulary 11; chance accuracy about {chance}" in table
    logged = {(r["label"], r["seq_len"]): r["test/acc"] for r in records(out)}
    for row in rows:
        assert f"data.task={task}" in row["overrides"]
        assert float(row["test/acc"]) == pytest.approx(logged[row["label"], int(row["seq_len"])])
        assert f"| {float(row['test/acc']):.3f} |" in table
    if gpus:
        assert all(f"lock_path={out / '.gpu0.lock'}" in r["command"] for r in records(out))


def test_exclusive_device_makes_runs_take_turns(tmp_path):
    first = ExclusiveDevice(str(tmp_path / "gpu.lock"))
    second = ExclusiveDevice(str(tmp_path / "gpu.lock"), wait_file=str(tmp_path / "waited"))
    first.setup(None, None, "fit")
    waiting = threading.Thread(target=second.setup, args=(None, None, "fit"))
    waiting.start()
    waiting.join(1.5)
    assert waiting.is_alive()   # blocked while the first run holds the device
    assert float((tmp_path / "waited").read_text()) >= 1.0   # reported while waiting
    first.teardown(None, None, "fit")
    waiting.join(10)
    assert not waiting.is_alive()
    assert 1.5 <= float((tmp_path / "waited").read_text()) < 10
    second.teardown(None, None, "fit")


@pytest.mark.parametrize("reported_wait, status", [(0.0, "timeout"), (3.0, "failed")])
def test_timeout_leaves_out_the_wait_for_a_shared_gpu(tmp_path, monkeypatch, reported_wait, status):
    """A stand-in for train.py that runs 2.5 s, having 'waited' `reported_wait` s of them: with a
    1.5 s limit it is stopped unless the wait is left out (then it ends, without metrics: failed)."""
    stand_in = tmp_path / "stand_in_train.py"
    stand_in.write_text(
        "import sys, time\n"
        "run_dir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('hydra.run.dir='))\n"
        f"open(run_dir + '/{runlib.WAIT_FILE}', 'w').write('{reported_wait}')\n"
        "time.sleep(2.5)\n")
    monkeypatch.setattr(runlib, "TRAIN", stand_in)
    point = runlib.plan_points([parse_series("model=full")], [32], runlib.Budget(steps=1, tokens_per_step=32), [])[0]
    record = runlib.run_point(point, tmp_path / "out", timeout_s=1.5, gpu="0", shared_gpu=True)
    assert record["status"] == status and record["device_wait_s"] == reported_wait


@pytest.mark.parametrize("result, expected", [
    ({"status": "ok", "reason": "", "metrics": {"val/bpc": 2.5, "test/bpc": 2.25}, "parameters": {"total": 1234},
      "tokens_per_s": 1000.5, "peak_mem_gib": 3.5, "steps": 7},
     {"status": "ok", "reason": "", "val/bpc": 2.5, "test/bpc": 2.25, "params": 1234, "tokens_per_s": 1000.5,
      "peak_mem_gib": 3.5, "steps_trained": 7}),
    ({"status": "oom", "reason": "OutOfMemoryError: CUDA out of memory", "metrics": {"val/bpc": 2.5},
      "parameters": {"total": 1234}, "tokens_per_s": None, "peak_mem_gib": 70.0, "steps": 3},
     {"status": "oom", "reason": "OutOfMemoryError: CUDA out of memory", "val/bpc": 2.5, "params": 1234,
      "peak_mem_gib": 70.0, "steps_trained": 3}),
    ({"status": "config_error", "reason": "The valid split has 5 tokens. Lower data.seq_len=", "metrics": {},
      "parameters": None, "tokens_per_s": None, "peak_mem_gib": None, "steps": 0},
     {"status": "failed", "reason": "config error (exit 2): The valid split has 5 tokens. Lower data.seq_len=",
      "params": None}),
    ({"status": "ok", "reason": "", "metrics": {"val/bpc": 2.5}, "parameters": {"total": 1234},
      "tokens_per_s": 10.0, "peak_mem_gib": 1.0, "steps": 7},
     {"status": "failed", "reason": "train.py ended without test/* metrics in result.json"}),
    (None, {"status": "failed", "returncode": 1, "reason": "no result.json: train.py exited with code 1 without "
            "writing one (it crashed before it could, e.g. on a bad override; see stderr.log)"}),
])
def test_a_point_record_is_read_from_result_json(tmp_path, monkeypatch, result, expected):
    """A stand-in for train.py that writes `result` as its result.json (None: exits 1 without one)."""
    stand_in = tmp_path / "stand_in_train.py"
    stand_in.write_text(
        "import sys\n"
        "run_dir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('hydra.run.dir='))\n"
        + (f"open(run_dir + '/result.json', 'w').write({json.dumps(result)!r})\n" if result else "sys.exit(1)\n"))
    monkeypatch.setattr(runlib, "TRAIN", stand_in)
    point = runlib.plan_points([parse_series("model=full")], [32], runlib.Budget(steps=1, tokens_per_step=32), [])[0]
    record = runlib.run_point(point, tmp_path / "out", timeout_s=60)
    assert {key: record.get(key) for key in expected} == expected
    if result and result["status"] == "ok":
        assert record["returncode"] == 0 and record["label"] == "full" and record["kind"] == "full"


def test_a_sweep_with_a_failed_point_runs_every_point_and_exits_1(tmp_path, monkeypatch, capsys):
    """A stand-in for train.py whose first point (length 32) fails: the second still runs, and the
    sweep returns 1 naming the failed point; run again with nothing left to run, it still returns 1."""
    stand_in = tmp_path / "stand_in_train.py"
    stand_in.write_text(
        "import json, sys\n"
        "run_dir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('hydra.run.dir='))\n"
        "ok = 'data.seq_len=64' in sys.argv\n"
        "result = {'status': 'ok' if ok else 'failed', 'reason': '' if ok else 'RuntimeError: boom',\n"
        "          'metrics': {'test/bpc': 2.0} if ok else {}, 'parameters': {'total': 10}, 'tokens_per_s': 1.0,\n"
        "          'peak_mem_gib': 1.0, 'steps': 1}\n"
        "open(run_dir + '/result.json', 'w').write(json.dumps(result))\n")
    monkeypatch.setattr(runlib, "TRAIN", stand_in)
    spec = runlib.SweepSpec(title="t", series=[parse_series("model=full")], lengths=[32, 64],
                            budget=runlib.Budget(steps=1, tokens_per_step=64), overrides=[], out=tmp_path / "out")
    assert runlib.run_sweep(spec) == 1
    assert [(r["seq_len"], r["status"]) for r in records(tmp_path / "out")] == [(32, "failed"), (64, "ok")]
    named = "1 of 2 points did not finish ok: full, length 32, seed 0: failed (RuntimeError: boom)"
    assert named in capsys.readouterr().err
    assert runlib.run_sweep(spec) == 1 and len(records(tmp_path / "out")) == 2


def test_a_killed_run_leaves_no_result_json_and_its_record_says_so(tmp_path):
    """A real train.py point killed with SIGKILL once it is training (its metrics log exists, after 100
    steps): no result.json, and the record names the signal."""
    budget = runlib.Budget(steps=100_000, tokens_per_step=128)
    point = runlib.plan_points([parse_series("model=full")], [32], budget, [
        "trainer=cpu", "model.dim=32", "model.depth=1", "model.num_heads=2", "trainer.enable_model_summary=false",
        f"paths.cache_dir={tmp_path / 'cache'}"])[0]
    run_dir, records = tmp_path / "out" / "points" / point.name, []
    runner = threading.Thread(target=lambda: records.append(runlib.run_point(point, tmp_path / "out", timeout_s=300)))
    runner.start()
    deadline = time.time() + 240
    while not (run_dir / "csv" / "metrics.csv").exists() and time.time() < deadline and runner.is_alive():
        time.sleep(0.2)
    assert (run_dir / "csv" / "metrics.csv").exists(), (run_dir / "stderr.log").read_text()[-3000:]
    with runlib._RUNNING_LOCK:
        [process] = runlib._RUNNING
    process.kill()
    runner.join(60)
    [record] = records
    assert record["returncode"] == -signal.SIGKILL and record["status"] == "failed"
    assert record["reason"] == "no result.json: killed by signal SIGKILL (possibly the host's out-of-memory killer)"
    assert (run_dir / "csv" / "metrics.csv").exists() and not (run_dir / "result.json").exists()


# Before series, the benchmarks' rows were these (kind, options), FMA's max_seq_len set to the length;
# full on cuDNN was added since.
OLD_VARIANTS = {
    "full (cuDNN)": ("full", {"backend": "cudnn"}),
    "full (flash)": ("full", {"backend": "flash"}),
    "fma m=64 p=2": ("fma", {"block_size": 64, "rank": 2}),
    "fma m=32 p=2": ("fma", {"block_size": 32, "rank": 2}),
    "local w=128": ("local", {"window": 128}),
    "linear": ("linear", {}),
    "htransformer": ("htransformer", {}),
    "reformer": ("reformer", {}),
    "fastmax": ("fastmax", {}),
}


def test_benchmark_rows_compose_to_the_layers_and_models_they_measured():
    """Each default row, composed from the configs at length 256, builds the same attention layer and
    the same model (parameters equal under one seed) as the old (kind, options) rows."""
    args = benchlib.parse_args(bench_attention.benchmark_parser("", lengths=[256], tokens=256, tokens_help="",
                                                                out="unused"), [])
    assert [series.label for series in args.series] == list(OLD_VARIANTS)
    assert benchlib.model_config(args.series[3], 256)["attention"] == {
        "name": "fma", "block_size": 32, "rank": 2, "downsample": "groupedconv", "multilevel_maps": "shared",
        "scale_coarse": True, "backend": "auto", "max_seq_len": 256, "downsample_queries": False}
    for series in args.series:
        kind, options = OLD_VARIANTS[series.label]
        options = {**options, "max_seq_len": 256} if kind == "fma" else options
        torch.manual_seed(0)
        layer = bench_attention.attention_layer(series, 256, dim=32, heads=2, causal=True)
        torch.manual_seed(0)
        old_layer = fma.build_attention(kind, dim=32, num_heads=2, causal=True, **options)
        assert type(layer) is type(old_layer) and same_parameters(layer, old_layer), series.label
    with pytest.raises(SystemExit):   # a bad row is a usage error
        benchlib.parse_args(bench_attention.benchmark_parser("", lengths=[256], tokens=256, tokens_help="",
                                                             out="unused"), ["--series", "fma:m=64,p=2"])


def test_bidirectional_benchmark_rows_add_the_kinds_without_a_causal_form():
    default = benchlib.parse_args(bench_attention.benchmark_parser("", lengths=[256], tokens=256, tokens_help="",
                                                                   out="unused"), []).series
    assert benchlib.rows_to_run(default, bidirectional=False) == default
    extended = benchlib.rows_to_run(default, bidirectional=True)
    assert [series.label for series in extended] == [*OLD_VARIANTS, "nystromformer", "linformer"]
    for series in extended[-2:]:
        assert bench_attention.attention_layer(series, 256, dim=32, heads=2, causal=False).causal is False
    chosen = benchlib.parse_series_list(["model=full"])
    assert benchlib.rows_to_run(chosen, bidirectional=True) == chosen


@pytest.mark.parametrize("kind, objective", [("full", "clm"), ("fma", "clm"), ("full", "mlm")])
def test_bench_train_runs_train_py_and_reports_its_result(tmp_path, kind, objective):
    """A bench_train point is train.py with the point's overrides (here on the CPU): it trains its steps
    and nothing else, and its row holds result.json's tokens/s with the FLOPs counted by hand: d = 32, one
    layer, MLP ratio 4, 256 byte symbols: 6 (12 d^2 + 256 d) per token (masked LM: the head at 15% of
    them), plus 6 n d for causal full attention, 12 n d bidirectional."""
    overrides = bench_train.point_overrides(
        parse_series(f"model={kind}"), 64, 2, ["model.depth=1", "model.dim=32", "model.num_heads=2"], "auto",
        data=None, steps=12, profile=tmp_path / "profile.json", objective=objective)
    result, command = bench_train.run_point([o.replace("trainer=gpu", "trainer=cpu") for o in overrides],
                                            tmp_path / "run")
    assert (result["status"], result["steps"]) == ("ok", 12) and result["metrics"] == {}
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "profile.json").exists()
    row = bench_train.row_of(result, kind, parse_series(f"model={kind}"), "auto", 64, 2, tmp_path / "profile.json",
                             command)
    dense = 6 * (12 * 32 * 32 + (256 if objective == "clm" else 0.15 * 256) * 32)
    assert row["tokens_per_s"] == result["tokens_per_s"] > 0
    assert row["dense_mfu"] == pytest.approx(dense * row["tokens_per_s"] / 989e12, rel=1e-9)
    attention = (6 if objective == "clm" else 12) * 64 * 32
    assert row["mfu"] == (pytest.approx((dense + attention) * row["tokens_per_s"] / 989e12, rel=1e-9)
                          if kind == "full" else None)


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@needs_wikitext2
def test_failed_point_is_recorded_and_an_interrupted_sweep_resumes(tmp_path):
    """Length 1024 does not fit the 600-byte validation split: recorded as failed, the others finish.
    A sweep stopped during its second point reruns only the unfinished ones; a finished sweep reruns none."""
    text = tmp_path / "small.txt"
    text.write_bytes(reproduce_tables.head((WIKITEXT2 / "valid.txt").read_bytes(), 12000))
    out = tmp_path / "sweep"
    args = ["--series", "model=full", "--lengths", "32", "64", "1024", "--data", "text", "--data-path", str(text),
            "--tokens-per-step", "1024", "--micro-batch-tokens", "256", "--out", str(out), *tiny(tmp_path, steps=2)]
    dry = run_script("sweep_seq_len.py", [*args, "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0 and dry.stdout.count("train.py") == 3 and not out.exists()

    sweep = subprocess.Popen([sys.executable, str(SCRIPTS / "sweep_seq_len.py"), *args], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "points.jsonl").exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # the second point is now running
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr[-3000:]
    first = records(out)
    assert [(r["seq_len"], r["status"]) for r in first] == [(32, "ok")]

    result = run_script("sweep_seq_len.py", args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]   # a point failed
    assert "1 already recorded" in result.stdout and "2 to run" in result.stdout
    second = records(out)
    assert second[0] == first[0]   # the finished point was not run again
    by_length = {r["seq_len"]: r for r in second}
    assert len(second) == 3 and by_length[64]["status"] == "ok"
    assert by_length[1024]["status"] == "failed" and "data.seq_len=" in by_length[1024]["reason"]
    assert by_length[1024]["reason"].startswith("config error (exit 2)")
    assert [(r["batch_size"], r["accumulate"]) for r in second] == [(8, 4), (4, 4), (1, 1)]
    assert "failed: config error" in (out / "table.md").read_text()

    again = run_script("sweep_seq_len.py", args, cwd=tmp_path)
    assert again.returncode == 1 and "0 to run" in again.stdout
    assert records(out) == second



def test_length_generalization_scores_each_checkpoint_at_longer_lengths(tmp_path):
    """One FMA model trained at 32 tokens: at 1x eval.py reproduces train.py's test metric; at 2x its
    groupedconv basis cannot run, recorded with eval.py's reason, and the study still reports."""
    out = tmp_path / "study"
    done = run_script("length_generalization.py", [
        "--series", "fma groupedconv: model=fma model.attention.downsample=groupedconv", "--train-length", "32",
        "--factors", "1", "2", "--eval-tokens", "256", "--tokens-per-step", "64", "--out", str(out),
        *tiny(tmp_path, steps=2), "model.attention.block_size=8", "data.num_test=16"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = records(out)[0]
    with open(out / "length_generalization.csv", newline="") as f:
        rows = {int(row["seq_len"]): row for row in csv.DictReader(f)}
    assert rows[32]["status"] == "ok" and float(rows[32]["metric"]) == pytest.approx(trained["test/ppl"], rel=1e-6)
    assert rows[64]["status"] == "cannot run" and "max_seq_len" in rows[64]["reason"]
    assert "cannot run" in (out / "length_generalization.md").read_text()
    assert (out / "length_generalization.png").stat().st_size > 0


def test_bench_decode_point_measures_the_decoding_state():
    """A bench_decode point on the CPU (tiny model): full's KV cache holds the prompt plus 1,024 rows of
    room (2 sides x batch 2 x 2 heads x head_dim 8 x fp32), local's window does not grow; every timing is positive."""
    import bench_decode

    size = {"depth": 1, "dim": 16, "num_heads": 2}
    rows = {(kind, n): bench_decode.decode_point(parse_series(spec), n, 2, size, steps=2, warmup=1, device="cpu",
                                                 dtype=torch.float32)
            for kind, spec in [("full", "model=full"), ("local", "model=local model.attention.window=8")]
            for n in (32, 64)}
    for n in (32, 64):
        assert rows["full", n]["state_gib"] * 2**30 == 2 * 2 * 2 * (n + 1024) * 8 * 4
    assert rows["local", 64]["state_gib"] == rows["local", 32]["state_gib"] > 0
    assert all(row["prefill_ms"] > 0 and row["step_ms"] > 0 and row["tokens_per_s"] > 0 for row in rows.values())
    assert bench_decode.state_bytes((torch.zeros(3, dtype=torch.bfloat16), [torch.zeros(2, 2)])) == 3 * 2 + 4 * 4
