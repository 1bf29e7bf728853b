"""Throughput and memory in the logs and the progress bar; crash-safe checkpoint writing; taking turns
on a shared GPU."""

import fcntl
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data.cache import atomic_path, remove_stale_temporaries


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class ThroughputMonitor(L.Callback):
    """Logs train/tokens_per_s (all processes, wall clock between consecutive steps, data loading
    included, validation excluded) and train/peak_mem_gib."""

    def __init__(self):
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            tokens = (batch["tokens"].shape[1] - 1) * batch["tokens"].shape[0] * trainer.world_size
            pl_module.log("train/tokens_per_s", tokens / (now - self._last), prog_bar=True)
        pl_module.log("train/peak_mem_gib", peak_memory_gib(pl_module.device))
        self._last = now

    def on_validation_end(self, trainer, pl_module):
        self._last = None  # do not count evaluation time as a training step


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
