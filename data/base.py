"""What every data module shares: the batch contract, resumable training order, cached splits.

Every dataloader yields `{"tokens": LongTensor[B, seq_len + 1], "first_target": LongTensor[B]}`;
positions p >= first_target of a row are targets. Training rows are a pure function of
(seed, global batch index, row), so a run resumed at step k sees exactly the batches an
uninterrupted run sees from step k on; evaluation rows score every token of a split once.
"""

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from fma.errors import ConfigurationError

from .cache import atomic_path, exclusive_lock, fingerprint, read_meta, remove_stale_temporaries, write_meta
from .windows import EvalWindows, SplitFile, TrainWindows, evenly_spaced

SPLITS = ("train", "valid", "test")
UNBOUNDED_BATCHES = 2**40  # the training loader's nominal length; trainer.max_steps ends the run long before


def require_positive(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"data.{name}={value!r} must be a positive integer; set data.{name}=<n>.")


def require_file(path: Path, hint: str) -> Path:
    """`path` if it is a regular file with something in it; otherwise an error saying what it is."""
    if path.is_dir():
        problem = "is a directory, not a file"
    elif not path.exists():
        problem = "does not exist"
    elif not path.is_file():
        problem = "is not a regular file"
    elif path.stat().st_size == 0:
        problem = "is empty"
    else:
        return path
    raise ConfigurationError(f"data.path={path} {problem}. Pass {hint}.")


class RankSampler(DistributedSampler):
    """Global item indices for one rank, batch after batch from global batch `start_batch`.

    Rank r's row j of global batch b is item (b * world_size + r) * batch_size + j: ranks never share
    an item, and the order depends on nothing but (b, r, j). Being a DistributedSampler tells
    Lightning the data is already split across ranks; otherwise it would wrap the loader in its own,
    which lists every index (2**62 of them) up front.
    """

    def __init__(self, items: Dataset, *, start_batch: int, batch_size: int, rank: int, world_size: int):
        super().__init__(items, num_replicas=world_size, rank=rank, shuffle=False)
        self.start_batch, self.batch_size = start_batch, batch_size

    def __iter__(self):
        for batch in range(self.start_batch, self.start_batch + UNBOUNDED_BATCHES):
            first = (batch * self.num_replicas + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return UNBOUNDED_BATCHES * self.batch_size


class ResumableLoader(DataLoader):
    """The training loader. Its position is rebuilt from trainer.global_step whenever it is created,
    so it has no state of its own; having the (empty) state methods tells Lightning that resuming
    mid-epoch is exact, instead of warning that it is not.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TokenDataModule(L.LightningDataModule):
    """Dataloaders over `train_items()` (item i for any i >= 0) and `eval_items(split)` (all rows, in order).

    `vocab_size` and `metric` ("bpc" for bytes, "ppl" for tokens) are set once `prepare_data()` ran.
    """

    vocab_size: int | None = None
    metric: str | None = None
    # Context parallelism (train.py's context_parallel=true sets it): every rank gets the same rows, those of
    # one process, and the LightningModule gives each rank its contiguous slice of every sequence.
    same_rows_on_every_rank: bool = False

    def __init__(
        self,
        *,
        seq_len: int,
        batch_size: int,
        eval_batch_size: int | None = None,
        val_windows: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in [("seq_len", seq_len), ("batch_size", batch_size)]:
            require_positive(name, value)
        for name, value in [("eval_batch_size", eval_batch_size), ("val_windows", val_windows)]:
            if value is not None:
                require_positive(name, value)
        if not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"data.seed={seed!r} must be a non-negative integer.")
        self.seq_len, self.batch_size, self.eval_batch_size = (
            seq_len,
            batch_size,
            eval_batch_size or batch_size,
        )
        self.val_windows, self.num_workers, self.seed = val_windows, num_workers, seed

    def train_items(self) -> Dataset:
        raise NotImplementedError

    def eval_items(self, split: str) -> Dataset:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        """Starts at global batch trainer.global_step * accumulate_grad_batches (0 without a trainer)."""
        trainer = self.trainer
        start_batch = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world_size = self.data_parallel_rank()
        items = self.train_items()
        sampler = RankSampler(
            items, start_batch=start_batch, batch_size=self.batch_size, rank=rank, world_size=world_size
        )
        return ResumableLoader(items, batch_size=self.batch_size, sampler=sampler, **self.worker_options())

    def val_dataloader(self) -> DataLoader:
        """The fixed subset of `val_windows` validation rows, evenly spaced over the split."""
        items = self.eval_items("valid")
        return self.eval_loader(Subset(items, evenly_spaced(len(items), self.val_windows)))

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.eval_items("test"))

    def eval_loader(self, items: Dataset) -> DataLoader:
        """Rank r scores rows r, r + world_size, ...: every row once across ranks, none repeated
        (the metric sums NLL and counts over ranks, so uneven shards are exact)."""
        rank, world_size = self.data_parallel_rank()
        return DataLoader(items, batch_size=self.eval_batch_size, sampler=range(rank, len(items), world_size),
                          **self.worker_options())

    def data_parallel_rank(self) -> tuple[int, int]:
        """(this rank's share, shares): (global rank, world size) under DDP; (0, 1) without a trainer or
        with `same_rows_on_every_rank`."""
        if self.trainer is None or self.same_rows_on_every_rank:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def worker_options(self) -> dict:
        """Workers outlive one pass, so periodic validation does not restart them every time. For a GPU
        the batches are pinned: a copy from pageable memory waits for the GPU to finish its queued work,
        which would stall the host at every step, while a pinned one is queued like a kernel."""
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0, "pin_memory": on_gpu}


class FileDataModule(TokenDataModule):
    """A dataset built once into `cache_dir/<dataset_name>/<fingerprint>/` and memory-mapped from there.

    Subclasses say what the cache is built from (`cache_key`, which also checks the inputs) and
    how (`build_cache`, writing train/valid/test.bin); this class finds or builds the cache and cuts
    windows from it.
    """

    dataset_name: str
    split_option = ""  # the setting that sizes the splits, if there is one (named in the split check's fix)

    def __init__(self, *, cache_dir: str, **common):
        super().__init__(**common)
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache: Path | None = None
        self.meta: dict | None = None

    def cache_key(self) -> dict:
        """Everything the cache depends on: source files (name, size, sha256) and settings."""
        raise NotImplementedError

    def build_cache(self, directory: Path) -> dict:
        """Write train/valid/test.bin into `directory`; return meta fields vocab_size, metric and dtype."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Find the complete cache for the current sources and settings, building it if there is none,
        then check that every split holds a window.

        train.py calls this before it builds the model, so a split too short for `seq_len` (the test
        split included) stops the run before its first step, not after training. Finding the cache
        happens once per instance: Lightning calls prepare_data again in fit and test, and hashing
        the sources (hundreds of MB for WikiText-103) every time would be wasted.
        """
        if self.meta is None:
            # Killed builds and downloads leave temporary files, in caches that may never be built again.
            remove_stale_temporaries(self.cache_dir / self.dataset_name, "*/*.tmp")
            key = self.cache_key()
            directory = self.cache_dir / self.dataset_name / fingerprint(key)
            with exclusive_lock(directory.with_name(f"{directory.name}.lock")):
                meta = read_meta(directory)
                if meta is None:
                    meta = {"source": key, **self.build_cache(directory)}
                    itemsize = np.dtype(meta["dtype"]).itemsize
                    meta["lengths"] = {
                        split: (directory / f"{split}.bin").stat().st_size // itemsize for split in SPLITS
                    }
                    write_meta(directory, meta)
            self.cache, self.meta = directory, meta
            self.vocab_size, self.metric = meta["vocab_size"], meta["metric"]
        for split in SPLITS:
            self.check_split_length(split, self.meta["lengths"][split])

    def check_split_length(self, split: str, length: int) -> None:
        """A split must hold one window, seq_len + 1 tokens; below two tokens no seq_len fits."""
        if length >= self.seq_len + 1:
            return
        more_data = "a larger file"
        if self.split_option:
            more_data += f", or a larger {split} split ({self.split_option}=)"
        if length > 1:
            raise ConfigurationError(
                f"The {split} split of {self.dataset_name} has {length:,} tokens, fewer than seq_len + 1 = "
                f"{self.seq_len + 1:,}. Lower data.seq_len= (at most {length - 1:,}), or use {more_data}."
            )
        raise ConfigurationError(
            f"The {split} split of {self.dataset_name} {'is empty' if length == 0 else 'has 1 token'}, "
            f"too few for a window at any data.seq_len. Use {more_data}."
        )

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # for a rank on which Lightning did not call it (a no-op once done)

    def split_tokens(self, split: str) -> SplitFile:
        return SplitFile(self.cache / f"{split}.bin", self.meta["dtype"], self.meta["lengths"][split])

    def train_items(self) -> Dataset:
        return TrainWindows(self.split_tokens("train"), self.seq_len, self.seed)

    def eval_items(self, split: str) -> Dataset:
        return EvalWindows(self.split_tokens(split), self.seq_len)


def write_byte_splits(directory: Path, splits: dict[str, bytes | memoryview]) -> dict:
    """Byte-level data: each split's bytes are its token ids (vocab 256, bits per character)."""
    for split, data in splits.items():
        with atomic_path(directory / f"{split}.bin") as temporary:
            temporary.write_bytes(data)
    return {"vocab_size": 256, "metric": "bpc", "dtype": "uint8"}
