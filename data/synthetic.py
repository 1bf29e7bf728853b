"""Generated tasks that only long-range attention solves, each row a pure function of (seed, split, index).

The last token id, vocab_size - 1, is a separator; only the predictable part of a row is scored
(positions >= first_target), so a perfect model reaches loss 0. Copy asks for every token of the
first half again; recall for the values of a few key-value pairs from the start of the row.
"""

import numpy as np
from torch.utils.data import Dataset

from fma.errors import ConfigurationError

from .base import TokenDataModule, require_positive
from .windows import ANY_INDEX, row

SPLIT_STREAMS = {"train": 0, "valid": 1, "test": 2}  # disjoint seeds per split


def copy_task(rng: np.random.Generator, length: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """[s_1 .. s_k, SEP, s_1 .. s_k (cycled to fill)] with k = (length - 1) // 2 random symbols.

    Each copied token repeats the one k + 1 positions back; only the copy is scored.
    """
    separator = vocab_size - 1
    k = (length - 1) // 2
    symbols = rng.integers(separator, size=k)
    return np.concatenate([symbols, [separator], np.resize(symbols, length - k - 1)]), k + 1


def recall_task(rng: np.random.Generator, length: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """Associative recall across the row: [k v .. k v, FILL .., SEP, 0 f(0) 1 f(1) .. P-1 f(P-1)].

    P = min(number of keys, (length - 1) // 4) pairs open the row, keys 0..P-1 each once in random
    order, each with a random value f(k); filler follows; after the separator every key is asked
    once, in order. Keys, values, the filler and the separator are disjoint symbols. Each answer lies
    only in the pairs, at least length - 4P tokens back. Scored: the query part (its keys follow a
    fixed order; its values need the retrieval).
    """
    separator, filler = vocab_size - 1, vocab_size - 2
    num_keys = filler // 2
    pairs = min(num_keys, (length - 1) // 4)
    value_of = rng.integers(num_keys, filler, size=pairs)
    keys = rng.permutation(pairs)
    tokens = np.full(length, filler)
    tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2] = keys, value_of[keys]
    first_target = length - 2 * pairs
    tokens[first_target - 1] = separator
    tokens[first_target::2], tokens[first_target + 1 :: 2] = np.arange(pairs), value_of
    return tokens, first_target


TASKS = {"copy": copy_task, "recall": recall_task}
MINIMUM_SEQ_LEN = {"copy": 2, "recall": 4}  # one symbol to copy / one pair and its query
MINIMUM_VOCAB_SIZE = {"copy": 3, "recall": 6}  # two symbols / two keys, two values, filler and separator


class TaskRows(Dataset):
    """Row i of a split: `task` drawn from rng([seed, split stream, i]); `count` rows (unbounded: train)."""

    def __init__(self, *, task: str, split: str, count: int, seq_len: int, vocab_size: int, seed: int):
        self.task, self.stream, self.count = task, SPLIT_STREAMS[split], count
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.stream, index])
        return row(*TASKS[self.task](rng, self.seq_len + 1, self.vocab_size))


class SyntheticDataModule(TokenDataModule):
    """In-memory "copy" or "recall" rows of seq_len + 1 tokens; metric "ppl".

    vocab_size counts the separator (and recall's filler). num_val / num_test: rows in the valid / test split.
    cache_dir is accepted so that every data config takes the same keys; nothing is cached.
    """

    metric = "ppl"

    def __init__(
        self,
        *,
        task: str = "copy",
        vocab_size: int = 16,
        num_val: int = 64,
        num_test: int = 256,
        cache_dir: str | None = None,
        **common,
    ):
        super().__init__(**common)
        if task not in TASKS:
            raise ConfigurationError(f"Unknown synthetic data.task={task!r}; use one of {', '.join(TASKS)}.")
        if self.seq_len < MINIMUM_SEQ_LEN[task]:
            raise ConfigurationError(
                f"The {task} task needs data.seq_len >= {MINIMUM_SEQ_LEN[task]}; raise data.seq_len=."
            )
        if vocab_size < MINIMUM_VOCAB_SIZE[task]:
            raise ConfigurationError(
                f"The {task} task needs data.vocab_size >= {MINIMUM_VOCAB_SIZE[task]}; "
                f"raise data.vocab_size=."
            )
        for name, value in [("num_val", num_val), ("num_test", num_test)]:
            require_positive(name, value)
        self.task, self.vocab_size = task, vocab_size
        self.split_rows = {"train": ANY_INDEX, "valid": num_val, "test": num_test}

    def rows(self, split: str) -> TaskRows:
        return TaskRows(
            task=self.task,
            split=split,
            count=self.split_rows[split],
            seq_len=self.seq_len,
            vocab_size=self.vocab_size,
            seed=self.seed,
        )

    def train_items(self) -> Dataset:
        return self.rows("train")

    def eval_items(self, split: str) -> Dataset:
        return self.rows(split)
