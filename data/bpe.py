"""Byte-level BPE shared by every token-level dataset: trained on the train split only, cached with the ids.

Byte-level means the 256 byte symbols are always in the vocabulary, so any text encodes without an
unknown token and decode(encode(text)) == text exactly.
"""

import codecs
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fma.errors import ConfigurationError

from .cache import atomic_path, token_dtype

LINES_PER_BATCH = 4096


def line_batches(lines: Iterable[str]) -> Iterator[list[str]]:
    """Group lines into lists, the unit `encode_batch` and the trainer parallelise over."""
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) == LINES_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def not_utf8(path: Path, fix: str, chunk_bytes: int = 1 << 22) -> ConfigurationError:
    """The error for a file that failed to decode as UTF-8, naming its first bad byte and where it is.

    Decoders report positions inside the chunk they were given, which mean nothing to the user, so
    the file is decoded again here, counting bytes, to find the offset in the file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character, held from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                byte, offset = error.object[error.start], read - pending + error.start
                return ConfigurationError(
                    f"{path} is not UTF-8 text (byte 0x{byte:02x} at offset {offset:,}: {error.reason}), "
                    f"which the BPE tokenizer needs. {fix}"
                )
            if not chunk:  # it failed to decode before: something rewrote it meanwhile
                return ConfigurationError(f"{path} changed while it was read. Run again once nothing writes to it.")
            read += len(chunk)


def train_bpe(lines: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (fewer if the text has fewer useful merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(line_batches(lines), trainer=trainer)
    return tokenizer


def write_bpe_splits(
    directory: Path, splits: dict[str, Callable[[], Iterable[str]]], vocab_size: int
) -> dict:
    """Train on the train split, save `tokenizer.json`, encode every split into `<split>.bin`.

    `splits` maps each split to a function returning its text as lines (with their line ends), so a
    file is streamed rather than loaded and train can be read twice (training, then encoding).
    Returns the meta fields vocab_size (the trained size), metric and dtype.
    """
    tokenizer = train_bpe(splits["train"](), vocab_size)
    with atomic_path(directory / "tokenizer.json") as temporary:
        tokenizer.save(str(temporary))
    dtype = token_dtype(tokenizer.get_vocab_size())
    for split, lines in splits.items():
        with atomic_path(directory / f"{split}.bin") as temporary, open(temporary, "wb") as out:
            for batch in line_batches(lines()):
                encodings = tokenizer.encode_batch(batch)
                np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=dtype).tofile(out)
    return {"vocab_size": tokenizer.get_vocab_size(), "metric": "ppl", "dtype": dtype.name}
