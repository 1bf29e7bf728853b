"""Throughput and memory in the logs and the progress bar (which shows the loss without a host sync
per step); crash-safe checkpoint writing; last.ckpt and a clean stop on SIGTERM/SIGINT; taking turns
on a shared GPU; and one Hydra callback, the report that ends a multirun."""

import fcntl
import json
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from data.cache import atomic_path, remove_stale_temporaries
from fma.errors import ConfigurationError

from .lit_module import logs_this_step


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class ThroughputMonitor(L.Callback):
    """Logs train/tokens_per_s (all processes, wall clock between the ends of consecutive steps, data
    loading included, validation excluded) and train/peak_mem_gib, on the steps the loggers receive.

    On a GPU a step's end is a CUDA event, so its time is when the GPU finished the step, not when the
    host had queued it (the host runs ahead, more so under CUDA graphs): each step's value is logged
    GPU_LAG steps later, waiting for that step's event only if the GPU is that far behind. Values are
    logged as CPU tensors: Lightning would copy a number to the GPU, a copy that waits for the GPU."""

    GPU_LAG = 2

    def __init__(self):
        self._ends: list[tuple[object, int]] = []   # (end of a step: CUDA event or perf_counter, its tokens)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = (batch["tokens"].shape[1] - 1) * batch["tokens"].shape[0]
        if not getattr(pl_module, "context_parallel", False):  # context parallel: every rank holds the same rows
            tokens *= trainer.world_size
        if pl_module.device.type == "cuda":
            end, lag = torch.cuda.Event(enable_timing=True), self.GPU_LAG
            end.record()
        else:
            end, lag = time.perf_counter(), 0
        self._ends = [*self._ends[-(lag + 1):], (end, tokens)]  # the ends of steps t-lag-1 .. t
        if not logs_this_step(trainer):
            return
        if len(self._ends) == lag + 2:  # step t-lag: from the end of the step before it to its own end
            (start, _), (finish, tokens) = self._ends[:2]
            if lag:
                finish.synchronize()  # elapsed_time refuses an event the GPU has not reached
            seconds = start.elapsed_time(finish) / 1e3 if lag else finish - start
            pl_module.log("train/tokens_per_s", torch.tensor(tokens / seconds), prog_bar=True)
        pl_module.log("train/peak_mem_gib", torch.tensor(peak_memory_gib(pl_module.device)))

    def on_validation_end(self, trainer, pl_module):
        self._ends = []  # do not count evaluation time as a training step


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, with train/loss read from the GPU only when the bar redraws (every refresh_rate
    steps): logged with prog_bar=True, Lightning would read it at every step, a host sync per step."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = f"{loss.item():.4g}"
        return metrics


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint under a temporary name and renames it into place: a run killed while
    saving leaves the previous checkpoint intact instead of a truncated one.

    The temporary file such a kill leaves (as large as a checkpoint) is removed the next time the
    folder is used: saving into it (atomic_path does that) or loading from it, which is how a
    killed run's folder is used again (ckpt_path= resumes into a new folder).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(Path(path)) as temporary:
            super().save_checkpoint(checkpoint, temporary, storage_options)

    def load_checkpoint(self, path, *args, **kwargs):
        remove_stale_temporaries(Path(path).parent)
        return super().load_checkpoint(path, *args, **kwargs)


def stepped(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended completed an optimizer step (the last of its accumulated
    micro-batches): the only points where a run can stop and resume exactly."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class LastCheckpoint(Checkpoint):
    """Saves `path` (checkpoints/last.ckpt) every `every_n_train_steps` optimizer steps and at the step
    where training stops (trainer.max_steps, or a stop asked for by StopOnSignal), always at the end
    of an optimizer step's last batch.

    The final state is saved there, not after fit returns: Lightning resumes a checkpoint saved after
    fit one logged step late when its last step validated, while one saved at the end of a batch
    resumes at the next step, as an uninterrupted run would. Being a Checkpoint, Lightning runs it
    after the other callbacks, so it sees the stop StopOnSignal asks for at the same batch.
    """

    def __init__(self, path: str, every_n_train_steps: int):
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ConfigurationError(
                f"last.ckpt is saved every callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps!r} steps "
                f"(by default trainer.val_check_interval), which must be a whole number of steps, at least 1; set "
                f"trainer.val_check_interval=<steps> or callbacks.last_checkpoint.every_n_train_steps=<steps>.")
        self.path, self.every_n_train_steps = path, every_n_train_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if stepped(trainer, batch_idx) and (step % self.every_n_train_steps == 0 or trainer.should_stop
                                            or 0 < trainer.max_steps <= step):
            trainer.save_checkpoint(self.path, weights_only=False)


class Interrupted(BaseException):
    """A run stopped by a signal. A BaseException, as KeyboardInterrupt is, so that no `except
    Exception` on its way (hydra.utils.instantiate's, a library's) takes it for an error of its own."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum   # what a shell reports for a process a signal ended: 143 SIGTERM, 130 SIGINT


class StopOnSignal(L.Callback):
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) end a run cleanly. While training, the
    run stops at the end of the optimizer step under way, every process at the same one, where
    LastCheckpoint saves a checkpoint that resumes exactly; `stopped` then says so and `received` which
    signal it was. At any other time, or on a second signal, Interrupted is raised at once.

    A context manager around the whole run (the handlers are installed on entry, the previous ones
    restored on exit) and a callback of its trainer: Lightning installs a SIGTERM handler of its own
    when fit starts, which stops mid-validation too and saves nothing; on_train_start puts this one
    back, and Lightning's teardown restores the handlers it found, these.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: signal.Signals | None = None
        self.stopped = False
        self._training = False
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
        self._install({signum: self._handle for signum in self.SIGNALS})
        return self

    def __exit__(self, *exc_info) -> None:
        self._install(self._previous)

    @staticmethod
    def _install(handlers: dict) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        # No output here: a handler that writes can interrupt a write to the same stream.
        first, signum = self.received is None, signal.Signals(signum)
        self.received = self.received or signum
        if not (self._training and first):
            raise Interrupted(signum, f"stopped at once by {signum.name}")

    def on_train_start(self, trainer, pl_module):
        self._install({signum: self._handle for signum in self.SIGNALS})
        self._training = True

    def on_train_end(self, trainer, pl_module, *_):
        self._training = False

    on_exception = on_train_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # reduce_boolean_decision: under DDP every process stops at the step where any one was signalled
        if stepped(trainer, batch_idx) and trainer.strategy.reduce_boolean_decision(self.received is not None,
                                                                                    all=False):
            trainer.should_stop = self.stopped = True


class MultirunReport(HydraCallback):
    """Ends a multirun (`train.py -m`) by naming the points that did not finish ok, from their
    result.json, and exiting with code 1 if there are any. (train.py lets every point run to its end;
    Hydra's own launcher would stop the multirun at the first point that exits.)"""

    def __init__(self):
        self.points: list[tuple[int, str, Path]] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        number = OmegaConf.select(config, "hydra.job.num", default=None)  # unset outside a multirun
        if number is not None:
            self.points.append((number, " ".join(job_return.overrides or []), Path(config.hydra.runtime.output_dir)))

    def on_multirun_end(self, config, **kwargs) -> None:
        failed = []
        for number, overrides, folder in self.points:
            try:
                result = json.loads((folder / "result.json").read_text())
                status, reason = result["status"], result["reason"]
            except (OSError, ValueError, KeyError):
                status, reason = "failed", f"no readable {folder / 'result.json'}"
            if status != "ok":
                failed.append(f"#{number} ({overrides}): {status}: {reason}")
        if failed:
            print(f"\n{len(failed)} of {len(self.points)} points did not finish ok:\n  " + "\n  ".join(failed),
                  file=sys.stderr)
            sys.exit(1)


class ExclusiveDevice(L.Callback):
    """Holds an exclusive lock on `lock_path` while fitting and while testing, so that runs sharing one
    GPU take turns on it: each one's tokens/s is its own, while process start-up and data preparation
    overlap. The operating system drops the lock when the process ends, however it ends.

    `wait_file`, if given, holds the seconds spent waiting for the lock so far (rewritten about once a
    second while waiting), so that a supervisor can leave the wait out of a time limit.
    """

    def __init__(self, lock_path: str, wait_file: str | None = None):
        self.lock_path, self.wait_file = lock_path, wait_file
        self._lock, self._waited = None, 0.0

    def setup(self, trainer, pl_module, stage):
        self._lock = open(self.lock_path, "a")
        started = last_report = time.monotonic()
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
                if time.monotonic() - last_report >= 1.0:
                    last_report = time.monotonic()
                    self._report(self._waited + last_report - started)
        self._waited += time.monotonic() - started
        self._report(self._waited)

    def teardown(self, trainer, pl_module, stage):
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _report(self, seconds: float) -> None:
        if self.wait_file:
            with atomic_path(Path(self.wait_file)) as temporary:
                temporary.write_text(f"{seconds:.3f}")
