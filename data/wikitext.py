"""WikiText-103: Wikipedia articles, tokenised by a byte-level BPE trained on its train split (perplexity)."""

from collections.abc import Iterator
from functools import partial
from pathlib import Path

from fma.errors import ConfigurationError

from . import bpe
from .base import SPLITS, FileDataModule, require_positive
from .cache import atomic_path, exclusive_lock, file_identity

HUB_DATASET = ("Salesforce/wikitext", "wikitext-103-raw-v1")
HUB_SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}
PATH_HINT = "data.path=/dir/with/wiki.train.tokens"


def split_files(directory: Path) -> dict[str, Path]:
    """wiki.<split>.tokens for the three splits in `directory`, or else the wiki.<split>.raw versions."""
    if not directory.is_dir():
        problem = "is a file, not a directory" if directory.exists() else "does not exist"
        raise ConfigurationError(f"data.path={directory} {problem}. Pass {PATH_HINT}.")
    for suffix in (".tokens", ".raw"):
        files = {split: directory / f"wiki.{split}{suffix}" for split in SPLITS}
        if all(path.is_file() for path in files.values()):
            return files
    raise ConfigurationError(
        f"{directory} must hold wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens (or "
        f"wiki.train.raw, wiki.valid.raw and wiki.test.raw); it has "
        f"{sorted(p.name for p in directory.glob('wiki.*'))}. "
        f"Unzip wikitext-103 there, or pass {PATH_HINT}."
    )


def read_lines(path: Path) -> Iterator[str]:
    """The file's lines with their line ends untouched, so the text is reproduced byte for byte."""
    try:
        with open(path, encoding="utf-8", newline="") as lines:
            yield from lines
    except UnicodeDecodeError as error:
        raise bpe.not_utf8(path, f"Convert it to UTF-8, or unzip wikitext-103 again and pass {PATH_HINT}.") from error


def fetch_from_hub(directory: Path) -> Path:
    """wikitext-103-raw-v1 from the Hugging Face hub, written once into `directory` as wiki.<split>.raw."""
    with exclusive_lock(directory.with_name(f"{directory.name}.lock")):
        files = {split: directory / f"wiki.{split}.raw" for split in SPLITS}
        if all(path.is_file() for path in files.values()):
            return directory
        try:
            from datasets import load_dataset

            dataset = load_dataset(*HUB_DATASET)
        except Exception as error:  # offline, hub down, missing package: all have the same fix
            raise ConfigurationError(
                f"WikiText-103 could not be loaded from the Hugging Face hub ({type(error).__name__}: "
                f"{error}). Download and unzip wikitext-103 yourself and pass {PATH_HINT}."
            ) from error
        for split, path in files.items():
            with atomic_path(path) as temporary:
                temporary.write_text(
                    "".join(dataset[HUB_SPLIT_NAMES[split]]["text"]), encoding="utf-8", newline=""
                )
    return directory


class WikiText103DataModule(FileDataModule):
    """WikiText-103 with a byte-level BPE of `vocab_size` tokens: metric "ppl".

    path: a directory with wiki.{train,valid,test}.tokens (or .raw); None loads it from the hub.
    After prepare_data(), `vocab_size` is the trained tokenizer's real size.
    """

    dataset_name = "wikitext103"

    def __init__(self, *, path: str | None = None, vocab_size: int = 16384, **common):
        super().__init__(**common)
        self.path = Path(path).expanduser() if path is not None else None
        require_positive("vocab_size", vocab_size)
        self.bpe_vocab_size = vocab_size

    def files(self) -> dict[str, Path]:
        return split_files(self.path or fetch_from_hub(self.cache_dir / self.dataset_name / "hub"))

    def cache_key(self) -> dict:
        files = {split: file_identity(path) for split, path in self.files().items()}
        return {"files": files, "tokenizer": "byte-level-bpe", "vocab_size": self.bpe_vocab_size}

    def build_cache(self, directory: Path) -> dict:
        lines = {split: partial(read_lines, path) for split, path in self.files().items()}
        return bpe.write_bpe_splits(directory, lines, self.bpe_vocab_size)
