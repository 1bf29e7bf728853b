"""Any local text file, split contiguously (train first), as bytes or byte-level BPE tokens."""

import math
from functools import partial
from pathlib import Path

from fma.errors import ConfigurationError

from . import bpe
from .base import SPLITS, FileDataModule, require_file, require_positive, write_byte_splits
from .cache import file_identity

TOKENIZERS = ("byte", "bpe")
PATH_HINT = "data.path=/path/to/file.txt"


def contiguous_split(sequence, fractions: tuple[float, float, float]) -> tuple:
    """Three consecutive pieces of `sequence` (bytes or str) with about the given fractions of its length."""
    first = round(len(sequence) * fractions[0])
    second = round(len(sequence) * (fractions[0] + fractions[1]))
    return sequence[:first], sequence[first:second], sequence[second:]


class TextDataModule(FileDataModule):
    """A text file as train/valid/test.

    tokenizer: "byte" (vocab_size 256, metric "bpc") or "bpe" (a byte-level BPE of `vocab_size`
    tokens trained on the train part, metric "ppl").
    split_fractions: (train, valid, test), positive and summing to 1, cut at characters for "bpe".
    """

    dataset_name = "text"
    split_option = "data.split_fractions"

    def __init__(
        self,
        *,
        path: str | None = None,
        tokenizer: str = "byte",
        vocab_size: int = 4096,
        split_fractions=(0.9, 0.05, 0.05),
        **common,
    ):
        super().__init__(**common)
        if path is None:
            raise ConfigurationError(f"data=text reads one text file, and none was given. Pass {PATH_HINT}.")
        if tokenizer not in TOKENIZERS:
            raise ConfigurationError(
                f"Unknown data.tokenizer={tokenizer!r}; use one of {', '.join(TOKENIZERS)}."
            )
        require_positive("vocab_size", vocab_size)
        fractions = tuple(float(fraction) for fraction in split_fractions)
        if len(fractions) != 3 or min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ConfigurationError(
                f"data.split_fractions={list(fractions)} must be three positive fractions (train, valid, "
                f"test) summing to 1, e.g. data.split_fractions=[0.9,0.05,0.05]."
            )
        self.path = Path(path).expanduser()
        self.tokenizer, self.bpe_vocab_size, self.split_fractions = tokenizer, vocab_size, fractions

    def cache_key(self) -> dict:
        source = require_file(self.path, PATH_HINT)
        key = {"file": file_identity(source), "split_fractions": list(self.split_fractions)}
        if self.tokenizer == "bpe":
            return {**key, "tokenizer": "byte-level-bpe", "vocab_size": self.bpe_vocab_size}
        return {**key, "tokenizer": "byte"}

    def build_cache(self, directory: Path) -> dict:
        data = self.path.read_bytes()
        if self.tokenizer == "byte":
            pieces = contiguous_split(data, self.split_fractions)
            return write_byte_splits(directory, dict(zip(SPLITS, pieces)))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise bpe.not_utf8(self.path, "Use data.tokenizer=byte, or convert the file to UTF-8.") from error
        parts = contiguous_split(text, self.split_fractions)
        lines = {split: partial(str.splitlines, part, True) for split, part in zip(SPLITS, parts)}
        return bpe.write_bpe_splits(directory, lines, self.bpe_vocab_size)
