"""The runner the comparison scripts share: plan points, run each as its own train.py, resume, report.

A *point* is one `train.py` run: one attention setting (a *series*, train.py overrides with a label,
e.g. `fma m=64 p=2: model=fma model.attention.block_size=64 model.attention.rank=2`; series.py), one
sequence length, one seed. Every point of a sweep gets the same recipe and budget: the same
`trainer.max_steps`, the same tokens per optimizer step (`data.batch_size` = tokens / seq_len, with
`trainer.accumulate_grad_batches` where a micro-batch limit asks for it), the same seeds, optimizer
and model size. Nothing is tuned per kind.

Each point runs as a subprocess (`python train.py <overrides> hydra.run.dir=<out>/points/<name>`)
with a time limit, so that running out of memory or crashing ends that point only. train.py reports
how the point ended, with its metrics, parameters, tokens/s and memory, in `<run dir>/result.json`;
that, flattened, and the runner's own fields go as one line into `<out>/points.jsonl` (appended
whole and fsynced); a restarted sweep skips every point already there (keyed by its overrides) and
reruns the ones it had not finished. The reports (`table.md`, `table.csv`, `table.json`,
`metric_vs_length.png`, `memory_vs_length.png`) are regenerated from the JSONL after every point (sweep_report.py).

Status of a point: `ok`; `oom`; `timeout` (the runner stopped it); `failed` with `reason` the error
(train.py's message for a mistake you can fix, e.g. seq_len longer than a split, or the exception;
without result.json, how the process ended: killed by a signal, or crashed before writing it);
`interrupted` (Ctrl-C, SIGTERM). A sweep exits 1 once all its points ran if any is not ok. The
scripts built on this module are sweep_seq_len.py (generic), reproduce_tables.py (the paper's
tables) and long_range_diagnostic.py (synthetic tasks).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from queue import Queue

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
TRAIN = ROOT / "train.py"
if str(SCRIPTS) not in sys.path:  # benchlib, series and sweep_report beside this file
    sys.path.insert(0, str(SCRIPTS))

import benchlib  # noqa: E402
from series import Series, UsageError, override_key, parse_series_list  # noqa: E402
from sweep_report import write_outputs  # noqa: E402

# Keys the sweep sets itself (equal budget); --overrides may not change them.
CONTROLLED = {"data.seq_len", "data.batch_size", "trainer.accumulate_grad_batches", "trainer.max_steps", "seed",
              "trainer.val_check_interval", "hydra.run.dir", "hydra.sweep.dir", "model"}
# Every point: no progress bar in its log files, and only best.ckpt (the test needs it; an interrupted
# point restarts from scratch, so last.ckpt would only fill the disk).
POINT_DEFAULTS = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar", "~callbacks.last_checkpoint"]
WAIT_FILE = "device_wait_s"  # seconds a point has waited for its shared GPU (models.ExclusiveDevice)


# ------------------------------------------------------------------------------------------- planning


def hydra_value(value) -> str:
    """A value for a Hydra override, quoted when it holds characters Hydra's grammar would misread."""
    text = str(value)
    if re.fullmatch(r"[\w./+:@~-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def merge_overrides(*groups: list[str]) -> list[str]:
    """Concatenate, a later override of the same key replacing an earlier one (at the later position)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged.pop(override_key(override), None)
            merged[override_key(override)] = override
    return list(merged.values())


def check_user_overrides(overrides: list[str], option: str = "--overrides") -> None:
    for override in overrides:
        if "=" not in override and not override.startswith("~"):
            raise UsageError(f"{option} {override!r}: write Hydra overrides as key=value (or ~key to delete).")
        if override_key(override) in CONTROLLED:
            raise UsageError(
                f"{option} {override!r} would change what the sweep holds equal; use --series, --lengths, "
                f"--budget-steps, --tokens-per-step, --micro-batch-tokens, --val-every or --seeds instead.")


@dataclasses.dataclass
class Budget:
    """The same for every point: optimizer steps, tokens per step, validation interval, seeds."""

    steps: int
    tokens_per_step: int
    micro_batch_tokens: int | None = None  # most tokens in one forward pass; more per step: gradient accumulation
    val_every: int | None = None           # optimizer steps between validations; None: steps / 4 (or steps)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        for name in ("steps", "tokens_per_step"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer.")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise UsageError("--micro-batch-tokens must be a positive integer.")
        if self.val_every is None:
            self.val_every = self.steps // 4 if self.steps % 4 == 0 else self.steps
        if not 1 <= self.val_every <= self.steps:
            raise UsageError(f"--val-every must lie in 1..{self.steps} (--budget-steps).")
        if not self.seeds:
            raise UsageError("--seeds needs at least one seed.")

    def shape(self, seq_len: int) -> tuple[int, int]:
        """(data.batch_size, trainer.accumulate_grad_batches) giving exactly tokens_per_step tokens per step."""
        if seq_len < 1:
            raise UsageError(f"--lengths: {seq_len} is not a positive length.")
        if self.tokens_per_step % seq_len:
            raise UsageError(
                f"--tokens-per-step {self.tokens_per_step} is not a multiple of the length {seq_len}: every length "
                f"must train on the same tokens per step. Use a multiple of every length (e.g. a power of two at "
                f"least as large as the longest).")
        sequences = self.tokens_per_step // seq_len
        limit = max(1, (self.micro_batch_tokens or self.tokens_per_step) // seq_len)
        batch = max(d for d in range(1, min(sequences, limit) + 1) if sequences % d == 0)
        return batch, sequences // batch

    def describe(self) -> str:
        text = (f"{self.steps:,} steps x {self.tokens_per_step:,} tokens/step = {self.steps * self.tokens_per_step:,} "
                f"training tokens per point; validation every {self.val_every} steps, test with the best "
                f"checkpoint by validation loss; seeds {' '.join(map(str, self.seeds))}")
        if self.micro_batch_tokens:
            text += f"; at most {self.micro_batch_tokens:,} tokens per micro-batch (gradient accumulation above)"
        return text


@dataclasses.dataclass
class Point:
    series: Series
    seq_len: int
    seed: int
    batch_size: int
    accumulate: int
    overrides: list[str]

    @property
    def key(self) -> str:
        """What identifies a point across restarts: its exact overrides (the run folder excluded)."""
        return json.dumps(self.overrides)

    @property
    def name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.series.label.replace("=", "")).strip("-")
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:8]
        return f"{slug}_n{self.seq_len}_s{self.seed}_{digest}"

    def command(self, run_dir: Path, device_lock: Path | None = None) -> list[str]:
        """train.py with this point's overrides; with `device_lock`, fitting and testing take turns on
        it, and the point writes its time spent waiting to `<run_dir>/WAIT_FILE`."""
        turns = [] if device_lock is None else [
            "+callbacks.exclusive_device._target_=models.ExclusiveDevice",
            f"+callbacks.exclusive_device.lock_path={hydra_value(device_lock)}",
            f"+callbacks.exclusive_device.wait_file={hydra_value(run_dir / WAIT_FILE)}"]
        return [sys.executable, str(TRAIN), *self.overrides, *turns, f"hydra.run.dir={hydra_value(run_dir)}"]


def plan_points(series: list[Series], lengths: list[int], budget: Budget, overrides: list[str]) -> list[Point]:
    """Every (series, length, seed) point, lengths outermost so that a partial sweep covers short ones first."""
    points = []
    for seq_len in lengths:
        batch, accumulate = budget.shape(seq_len)
        for seed in budget.seeds:
            for one in series:
                shape = [f"data.seq_len={seq_len}", f"data.batch_size={batch}",
                         f"trainer.accumulate_grad_batches={accumulate}", f"trainer.max_steps={budget.steps}",
                         # validation counts training batches. (POINT_DEFAULTS then drops last_checkpoint;
                         # its setting stays only because it is part of every recorded point's key.)
                         f"trainer.val_check_interval={budget.val_every * accumulate}",
                         f"callbacks.last_checkpoint.every_n_train_steps={budget.val_every}",
                         f"trainer.log_every_n_steps={max(1, min(10, budget.steps // 20))}", f"seed={seed}"]
                points.append(Point(one, seq_len, seed, batch, accumulate,
                                    merge_overrides(one.overrides, shape, POINT_DEFAULTS, overrides)))
    return points


# ------------------------------------------------------------------------------------- running a point

_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _end_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a point's process group (the point only: it was started in its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_all_points() -> None:
    _STOPPING.set()
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for process in running:
        _end_group(process)


def without_result(returncode: int) -> str:
    """Why a point that wrote no result.json ended: a signal (its name), or a crash before train.py could write it."""
    if returncode >= 0:
        return (f"no result.json: train.py exited with code {returncode} without writing one (it crashed before it "
                f"could, e.g. on a bad override; see stderr.log)")
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    oom_killer = " (possibly the host's out-of-memory killer)" if -returncode == signal.SIGKILL else ""
    return f"no result.json: killed by signal {name}{oom_killer}"


def outcome(run_dir: Path, returncode: int) -> dict:
    """status, reason and measurements of a point that ended by itself, from its result.json, flattened
    to the field names of earlier records (the reports read both)."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return {"status": "failed", "reason": without_result(returncode)}
    status, reason = result["status"], result["reason"]
    if status == "config_error":  # a mistake train.py explains (exit 2); the tables show it as failed
        status, reason = "failed", f"config error (exit 2): {reason}"
    elif status == "ok" and not any(key.startswith("test/") for key in result["metrics"]):
        status, reason = "failed", "train.py ended without test/* metrics in result.json"
    return {"status": status, "reason": reason, **result["metrics"], "tokens_per_s": result["tokens_per_s"],
            "peak_mem_gib": result["peak_mem_gib"], "steps_trained": result["steps"],
            "params": (result["parameters"] or {}).get("total")}


def waited_s(run_dir: Path) -> float:
    """Seconds the point in run_dir has waited for its shared GPU so far (0 if it never had to)."""
    try:
        return float((run_dir / WAIT_FILE).read_text())
    except (OSError, ValueError):
        return 0.0


def run_point(point: Point, out_dir: Path, timeout_s: float | None, gpu: str | None = None,
              shared_gpu: bool = False) -> dict | None:
    """Run one point to its end; its record, or None when the sweep is being stopped. With
    `shared_gpu`, points on that GPU fit and test one at a time (models.ExclusiveDevice), and
    `timeout_s` leaves out the time spent waiting for it."""
    run_dir = out_dir / "points" / point.name
    if run_dir.exists():  # an unfinished attempt of an interrupted sweep: start the point afresh
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = point.command(run_dir, out_dir / f".gpu{gpu}.lock" if shared_gpu else None)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    started, status, returncode = time.time(), None, None
    with open(run_dir / "stdout.log", "w") as stdout, open(run_dir / "stderr.log", "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        try:
            while returncode is None:
                try:
                    returncode = process.wait(1.0)
                except subprocess.TimeoutExpired:
                    if timeout_s is not None and time.time() - started - waited_s(run_dir) > timeout_s:
                        _end_group(process)
                        status = "timeout"
                        break
        except BaseException:
            _end_group(process)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(process)
    if _STOPPING.is_set():
        return None
    wall_s = time.time() - started
    ended = ({"status": "timeout", "reason": f"stopped after the --timeout of {timeout_s:g} s"} if status == "timeout"
             else outcome(run_dir, returncode))
    relative = run_dir.relative_to(out_dir)
    return {
        "key": point.key, "label": point.series.label, "kind": point.series.kind, "seq_len": point.seq_len,
        "seed": point.seed, "batch_size": point.batch_size, "accumulate": point.accumulate,
        **ended, "returncode": returncode, "wall_s": round(wall_s, 2),
        "device_wait_s": round(waited_s(run_dir), 2),
        "run_dir": str(relative),
        "config": str(relative / ".hydra" / "config.yaml") if (run_dir / ".hydra" / "config.yaml").exists() else "",
        "overrides": point.overrides, "command": shlex.join(command),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------------------- the results


def append_record(jsonl: Path, record: dict) -> None:
    """One whole line per finished point, flushed to disk before the next point starts. A line torn by a
    crash mid-write is ended first, so that it cannot swallow this one."""
    line = json.dumps(record) + "\n"
    with open(jsonl, "ab") as f:
        if f.tell() > 0:
            with open(jsonl, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_records(jsonl: Path) -> dict[str, dict]:
    """{key: record}, the last record of a key winning; a torn last line (a crash mid-write) is ignored."""
    records = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
    return records


@dataclasses.dataclass
class SweepSpec:
    title: str
    series: list[Series]
    lengths: list[int]
    budget: Budget
    overrides: list[str]   # data, objective, model size and the user's overrides, for every point
    out: Path
    metric: str = "auto"   # bpc, ppl, acc or auto (whichever the data reports)
    stand_in: str | None = None
    notes: dict = dataclasses.field(default_factory=dict)  # extra provenance lines (data, model, ...)
    timeout_s: float | None = None
    retry_failed: bool = False
    dry_run: bool = False
    gpus: list[str] = dataclasses.field(default_factory=list)


def add_sweep_arguments(parser: argparse.ArgumentParser, *, series: list[str], lengths: list[int] | None, steps: int,
                        tokens_per_step: int, out: str | None) -> None:
    """The options every comparison script takes (each script sets its own defaults); lengths None: no
    --lengths (the script decides its lengths otherwise)."""
    parser.add_argument("--series", nargs="+", default=series, metavar="SERIES",
                        help="attention settings, each one string of train.py overrides, optionally after a label "
                             "and a colon, e.g. model=full 'fma m=32 p=2: model=fma model.attention.block_size=32 "
                             "model.attention.rank=2' (unlabelled: named by its overrides, e.g. 'fma block_size=32'); "
                             "default: " + " ".join(f"'{one}'" if " " in one else one for one in series))
    if lengths is not None:
        parser.add_argument("--lengths", nargs="+", type=int, default=lengths,
                            help=f"sequence lengths; default: {' '.join(map(str, lengths))}")
    parser.add_argument("--budget-steps", "--steps", dest="steps", type=int, default=steps,
                        help=f"optimizer steps per point (default {steps})")
    parser.add_argument("--tokens-per-step", type=int, default=tokens_per_step,
                        help=f"training tokens per optimizer step at every length (default {tokens_per_step}); "
                             "data.batch_size = tokens / seq_len")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="most tokens per forward pass; above it, trainer.accumulate_grad_batches (default: none)")
    parser.add_argument("--val-every", type=int, default=None, help="validate every this many steps "
                                                                    "(default: steps/4, or only at the end)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds; several give mean ± std")
    parser.add_argument("--model-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="model size for every point, e.g. model.dim=32 model.depth=1 model.num_heads=2")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more Hydra overrides for every point, e.g. trainer=gpu data.vocab_size=4096")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per point before it is stopped, not counting waits for a shared GPU")
    parser.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed/oom/timeout")
    parser.add_argument("--gpus", nargs="+", default=[], metavar="ID",
                        help="run points side by side, one per listed GPU (CUDA_VISIBLE_DEVICES); default: one at "
                             "a time on what train.py picks. A GPU listed k times runs k points whose start-up "
                             "and data preparation overlap while their training and testing take turns on it, "
                             "so tokens/s stays each point's own (--timeout leaves out the wait)")
    parser.add_argument("--stand-in-label", default=None, help="marks the table as a stand-in, with this text")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the points and stop")
    parser.add_argument("--out", type=Path, default=Path(out) if out else None, required=out is None,
                        help="output folder" + (f" (default {out})" if out else ""))


DATA_GROUPS = ["synthetic", "enwik8", "wikitext103", "text"]


def data_overrides(data: str, path: str | None) -> list[str]:
    """data=<group> and its path made absolute (points may run from elsewhere)."""
    if data not in DATA_GROUPS:
        raise UsageError(f"--data {data!r}: use one of {', '.join(DATA_GROUPS)}.")
    if path is not None and data == "synthetic":
        raise UsageError("--data-path has no meaning for --data synthetic (generated in memory).")
    if data == "text" and path is None:
        raise UsageError("--data text needs --data-path /path/to/file.txt.")
    return [f"data={data}"] + ([f"data.path={hydra_value(Path(path).expanduser().resolve())}"] if path else [])


def budget_from(args: argparse.Namespace) -> Budget:
    return Budget(args.steps, args.tokens_per_step, args.micro_batch_tokens, args.val_every, tuple(args.seeds))


def spec_from(args: argparse.Namespace, *, title: str, overrides: list[str], metric: str = "auto",
              notes: dict | None = None) -> SweepSpec:
    """A SweepSpec from the common options; `overrides` (the script's preset) come before the user's."""
    user = [*args.model_overrides, *args.overrides]
    check_user_overrides(user)
    series = parse_series_list(args.series)
    for one in series:
        check_user_overrides([o for o in one.overrides if override_key(o) != "model"], option="--series")
    if len(set(args.lengths)) != len(args.lengths):
        raise UsageError("--lengths must not repeat a value.")
    return SweepSpec(title=title, series=series, lengths=args.lengths,
                     budget=budget_from(args), overrides=merge_overrides(overrides, user), out=args.out.resolve(),
                     metric=metric, stand_in=args.stand_in_label, notes=notes or {}, timeout_s=args.timeout,
                     retry_failed=args.retry_failed, dry_run=args.dry_run, gpus=list(args.gpus))


def on_slots(work, items: list, slots: list):
    """work(item, slot) for every item, side by side: each entry of slots (e.g. a GPU id; one listed k
    times runs k items at once) takes one item at a time. Yields the results as they finish. On an
    error or an interrupt, every running point is stopped (`stop_all_points`) before the error goes on,
    rather than after the other items finish."""
    free: Queue = Queue()
    for slot in slots:
        free.put(slot)

    def run(item):
        slot = free.get()
        try:
            return work(item, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(len(slots)) as pool:
        futures = [pool.submit(run, item) for item in items]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            stop_all_points()
            raise


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_sweep(spec: SweepSpec) -> int:
    """Run the points not yet recorded, recording each; write the reports; print the table last.
    Returns 0 when every point of the plan is recorded ok, 1 when any is not (named on stderr, also
    those recorded by an earlier invocation), 130 when interrupted; a dry run returns 0."""
    plan = plan_points(spec.series, spec.lengths, spec.budget, spec.overrides)
    jsonl = spec.out / "points.jsonl"
    records = read_records(jsonl)
    finished = {key for key, r in records.items() if r["status"] == "ok" or not spec.retry_failed}
    todo = [p for p in plan if p.key not in finished]
    if spec.dry_run:
        print(f"# {len(plan)} points, {len(plan) - len(todo)} already recorded in {jsonl}; cwd: {os.getcwd()}")
        for point in plan:
            prefix = "# done: " if point.key in finished else ""
            print(prefix + shlex.join(point.command(spec.out / "points" / point.name)))
        return 0

    spec.out.mkdir(parents=True, exist_ok=True)
    with open(spec.out / ".sweep.lock", "w") as lock:   # closing it releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"Another sweep is writing to {spec.out}; wait for it or pick another --out.")
        return run_points(spec, plan, records, todo)


def run_points(spec: SweepSpec, plan: list[Point], records: dict[str, dict], todo: list[Point]) -> int:
    """run_sweep's work once it holds the sweep's lock."""
    jsonl = spec.out / "points.jsonl"
    env = {"table": spec.title, **({"STAND-IN": spec.stand_in} if spec.stand_in else {}),
           "budget": spec.budget.describe(), **spec.notes,
           "common overrides": " ".join(spec.overrides), **benchlib.environment()}
    other = len(set(records) - {p.key for p in plan})
    print(f"{len(plan)} points: {len(plan) - len(todo)} already recorded in {jsonl}, {len(todo)} to run"
          + (f" ({other} records of other settings there are left out of the table)" if other else ""), flush=True)

    write_lock, counter = threading.Lock(), iter(range(1, len(todo) + 1))

    def finish(point: Point, record: dict) -> None:
        with write_lock:
            append_record(jsonl, record)
            records[point.key] = record
            shown = (f"test/{m} = {record[f'test/{m}']:.4g}" for m in ("bpc", "ppl", "acc") if f"test/{m}" in record)
            detail = ", ".join(shown) if record["status"] == "ok" else record["reason"][:200]
            print(f"[{next(counter)}/{len(todo)}] {point.series.label}, length {point.seq_len}, seed {point.seed}: "
                  f"{record['status']} ({detail}; {record['wall_s']:.0f} s)", flush=True)
            write_outputs(spec, plan, records, env)

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if len(spec.gpus) <= 1:
            for point in todo:
                record = run_point(point, spec.out, spec.timeout_s, spec.gpus[0] if spec.gpus else None)
                if record is None:
                    break
                finish(point, record)
        else:
            def work(point, gpu):
                if not _STOPPING.is_set():
                    record = run_point(point, spec.out, spec.timeout_s, gpu, spec.gpus.count(gpu) > 1)
                    if record is not None:
                        finish(point, record)

            for _ in on_slots(work, todo, spec.gpus):
                pass
    except KeyboardInterrupt:
        stop_all_points()
        print(f"\ninterrupted: {len(read_records(jsonl))} points recorded in {jsonl}; run the same command again "
              f"to finish the others.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    table = write_outputs(spec, plan, records, env)
    print(f"\nwrote {spec.out}/table.md, table.csv, table.json, metric_vs_length.png, memory_vs_length.png, "
          f"points.jsonl\n")
    print(table)
    unrecorded = {"status": "not run", "reason": "no record"}
    failed = [(point, records.get(point.key, unrecorded)) for point in plan
              if records.get(point.key, unrecorded)["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} of {len(plan)} points did not finish ok: " + "; ".join(
            f"{point.series.label}, length {point.seq_len}, seed {point.seed}: {record['status']} "
            f"({record['reason'][:200]})" for point, record in failed), file=sys.stderr)
    return 1 if failed else 0


def main_guard(main) -> None:
    """Run a script's main(); a UsageError becomes one message and exit code 2."""
    try:
        sys.exit(main())
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
