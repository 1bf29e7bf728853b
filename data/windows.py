"""Rows cut from a token stream: random training windows and exact-coverage evaluation windows.

A row is `{"tokens": LongTensor[seq_len + 1], "first_target": LongTensor[]}`; positions
`p >= first_target` are targets (the causal objective additionally skips p = 0).
"""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

ANY_INDEX = 2**62  # training items exist for every index below this: the stream is effectively unbounded


def row(tokens: np.ndarray, first_target: int) -> dict:
    """One dataset item; the default collate stacks these into tokens [B, seq_len + 1], first_target [B]."""
    return {"tokens": torch.from_numpy(tokens.astype(np.int64)), "first_target": torch.tensor(first_target)}


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """`limit` of the indices 0 .. count - 1, evenly spread over the range (all of them if limit is None).

    Used for the fixed validation subset: spread over the whole split it is representative, and
    being a pure function of (count, limit) it is the same subset at every validation.
    """
    if limit is None or limit >= count:
        return list(range(count))
    return (np.arange(limit) * count // limit).tolist()


class SplitFile:
    """One cached split: `length` token ids of `dtype`, raw in `path`, memory-mapped on first access.

    Pickling (DataLoader workers started by spawn) sends the path, not the mapped data.
    """

    def __init__(self, path: Path, dtype: str, length: int):
        self.path, self.dtype, self.length = path, dtype, length
        self.array = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if self.array is None:
            self.array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,))
        return self.array[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "array": None}


class TrainWindows(Dataset):
    """Item i: the seq_len + 1 tokens at an offset drawn from rng([seed, i]); every i >= 0 is an item.

    Being a pure function of (seed, i), any item can be recomputed anywhere: in any worker, on any
    rank, after any resume.
    """

    def __init__(self, tokens: SplitFile, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def __len__(self) -> int:
        return ANY_INDEX

    def __getitem__(self, index: int) -> dict:
        start = np.random.default_rng([self.seed, index]).integers(len(self.tokens) - self.seq_len)
        return row(self.tokens[start : start + self.seq_len + 1], first_target=0)


class EvalWindows(Dataset):
    """Non-overlapping windows scoring every token of a split (but its first) exactly once.

    Window j holds tokens[j*L : j*L + L + 1] (L = seq_len), whose targets are j*L + 1 .. j*L + L;
    ceil((N - 1) / L) windows cover targets 1 .. N - 1. The last one, if it would run past the end,
    is shifted left to end at the split's end, and its first_target skips the targets an earlier
    window already scored.
    """

    def __init__(self, tokens: SplitFile, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return -(-(len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        unshifted = index * self.seq_len
        start = min(unshifted, len(self.tokens) - self.seq_len - 1)
        first_target = 0 if start == unshifted else unshifted + 1 - start
        return row(self.tokens[start : start + self.seq_len + 1], first_target)
