"""The comparison scripts end to end at a tiny scale: each table, the diagnostic, failures and resume.

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

from conftest import ROOT
from models import ExclusiveDevice

SCRIPTS = ROOT / "scripts"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT2 = SHARED_DATA / "wikitext-2"
sys.path.insert(0, str(SCRIPTS))

import long_range_diagnostic  # noqa: E402
import reproduce_tables  # noqa: E402
import runlib  # noqa: E402

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
        assert int(row["params"]) > 0 and row["params_source"] == "model rebuilt from the checkpoint"
        assert float(row["peak_mem_gib"]) > 0 and float(row["tokens_per_s"]) > 0
        assert (out / row["config"]).is_file() and f"data.seq_len={row['seq_len']}" in row["overrides"]
    table = (out / "table.md").read_text()
    assert "budget" in table and "torch" in table
    if stand_in:
        assert "STAND-IN" in table and stand_in in table
    return rows


def test_planning_holds_the_budget_equal():
    budget = runlib.Budget(steps=10, tokens_per_step=1024, micro_batch_tokens=256)
    assert [budget.shape(n) for n in (32, 256, 512, 1024)] == [(8, 4), (1, 4), (1, 2), (1, 1)]
    assert budget.val_every == 10 and runlib.Budget(steps=8, tokens_per_step=64).val_every == 2
    with pytest.raises(runlib.UsageError, match="multiple"):
        budget.shape(2048)
    series = runlib.parse_kind("fma:m=16,p=4")
    assert series.label == "fma m=16 p=4"
    assert series.overrides() == ["model=fma", "model.attention.block_size=16", "model.attention.rank=4"]
    with pytest.raises(runlib.UsageError, match="Unknown attention kind"):
        runlib.parse_kind("nope")
    with pytest.raises(runlib.UsageError, match="held equal|--lengths"):
        runlib.check_user_overrides(["data.seq_len=64"])
    plan = runlib.plan_points([runlib.parse_kind("full")], [32, 64], budget, ["model.dim=8", "trainer.max_steps=1"])
    assert [p.overrides.count("trainer.max_steps=1") for p in plan] == [1, 1]  # a later override replaces
    assert all(p.batch_size * p.accumulate * p.seq_len == 1024 for p in plan)


def test_seeds_give_mean_and_std_and_failures_show(tmp_path):
    budget = runlib.Budget(steps=4, tokens_per_step=128, seeds=(0, 1))
    plan = runlib.plan_points([runlib.parse_kind("full")], [32, 64], budget, [])
    results = {32: [("ok", 1.0), ("ok", 1.2)], 64: [("oom", None), ("failed", None)]}
    records = {}
    for point in plan:
        status, value = results[point.seq_len][point.seed]
        records[point.key] = {"status": status, "reason": "CUDA out of memory" if status == "oom" else "boom",
                              "test/bpc": value, "params": 1000, "config": "", **({} if value is None else {
                                  "peak_mem_gib": 1.5, "tokens_per_s": 100.0})}
    spec = runlib.SweepSpec(title="t", series=[runlib.parse_kind("full")], lengths=[32, 64], budget=budget,
                            overrides=[], out=tmp_path)
    table = runlib.markdown_report(spec, plan, records, "bpc")
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
    assert runlib.failure_reason("INFO: x\n\nerror: The valid split has 5 tokens. Lower data.seq_len=\n", 2) \
        == "config error (exit 2): The valid split has 5 tokens. Lower data.seq_len="
    assert runlib.failure_reason("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n", 1) \
        == "RuntimeError: boom"


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
        "--table", "enwik8", "--data-path", str(standin / "bytes.raw"), "--kinds", "full", "fma:m=8,p=2",
        "--lengths", "32", "64", "--tokens-per-step", "128", "--stand-in-label", "tiny CI stand-in",
        "--out", str(out), *tiny(tmp_path), f"data.split_bytes=[{','.join(map(str, sizes))}]"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_table(out, "bpc", 4, stand_in="tiny CI stand-in")
    assert {(r["label"], int(r["seq_len"])) for r in rows} == {(k, n) for k in ("full", "fma m=8 p=2") for n in (32, 64)}
    assert all("model.depth=1" in r["overrides"] and "objective=clm" in r["overrides"] for r in rows)
    table = (out / "table.md").read_text()
    assert "test bits per character" in table and "| fma m=8 p=2 |" in table
    assert result.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last


@pytest.mark.parametrize("table, kinds", [("wt103-mlm", ["fma:m=8,p=2"]), ("wt103-clm", ["full", "local:w=8"])])
def test_wikitext_tables(tmp_path, standin, table, kinds):
    out = tmp_path / table
    result = run_script("reproduce_tables.py", [
        "--table", table, "--data-path", str(standin), "--kinds", *kinds, "--lengths", "32",
        "--tokens-per-step", "64", "--out", str(out), *tiny(tmp_path), "data.vocab_size=300"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_table(out, "ppl", len(kinds))
    objective = "mlm" if table == "wt103-mlm" else "clm"
    assert all(f"objective={objective}" in r["overrides"] and "data=wikitext103" in r["overrides"] for r in rows)
    assert "perplexity" in (out / "table.md").read_text()


def test_chance_levels_by_hand():
    assert long_range_diagnostic.chance("copy", 16) == pytest.approx(1 / 15)   # one of 15 symbols
    # vocabulary 11: keys 0-3 and values 4-8 (see test_synthetic_recall_rows); half the scored
    # tokens are keys (known), half values (one of 5): (1 + 1/5) / 2
    assert long_range_diagnostic.chance("recall", 11) == pytest.approx(0.6)
    assert long_range_diagnostic.chance("recall", 16) == pytest.approx(4 / 7)


@pytest.mark.parametrize("task, lengths, kinds, gpus, chance", [
    ("copy", ["32", "64"], ["full", "local:w=8"], ["0", "0"], "0.100"),   # vocabulary 11: 1/10
    ("recall", ["32"], ["fma:m=8,p=2"], [], "0.600"),
])
def test_long_range_diagnostic(tmp_path, task, lengths, kinds, gpus, chance):
    """Copy also runs two points side by side on one listed GPU (CPU here), taking turns."""
    out = tmp_path / "diagnostic"
    result = run_script("long_range_diagnostic.py", [
        "--task", task, "--lengths", *lengths, "--kinds", *kinds, "--tokens-per-step", "128",
        *(["--gpus", *gpus] if gpus else []), "--out", str(out), *tiny(tmp_path), "data.num_test=16",
        "data.vocab_size=11"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_table(out, "acc", len(lengths) * len(kinds))
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
    point = runlib.plan_points([runlib.parse_kind("full")], [32], runlib.Budget(steps=1, tokens_per_step=32), [])[0]
    record = runlib.run_point(point, tmp_path / "out", timeout_s=1.5, gpu="0", shared_gpu=True)
    assert record["status"] == status and record["device_wait_s"] == reported_wait


@needs_wikitext2
def test_failed_point_is_recorded_and_an_interrupted_sweep_resumes(tmp_path):
    """Length 1024 does not fit the 600-byte validation split: recorded as failed, the others finish.
    A sweep stopped during its second point reruns only the unfinished ones; a finished sweep reruns none."""
    text = tmp_path / "small.txt"
    text.write_bytes(reproduce_tables.head((WIKITEXT2 / "valid.txt").read_bytes(), 12000))
    out = tmp_path / "sweep"
    args = ["--kinds", "full", "--lengths", "32", "64", "1024", "--data", "text", "--data-path", str(text),
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
    assert result.returncode == 0, result.stderr[-3000:]
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
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert records(out) == second

