"""Language-model data: byte- and token-level corpora and synthetic tasks as Lightning data modules.

Every module yields {"tokens": LongTensor[B, seq_len + 1], "first_target": LongTensor[B]} batches
and, after prepare_data(), exposes `vocab_size` and `metric` ("bpc" or "ppl").
"""

from .base import FileDataModule, TokenDataModule
from .enwik8 import Enwik8DataModule
from .synthetic import SyntheticDataModule
from .text import TextDataModule
from .wikitext import WikiText103DataModule

__all__ = [
    "Enwik8DataModule",
    "FileDataModule",
    "SyntheticDataModule",
    "TextDataModule",
    "TokenDataModule",
    "WikiText103DataModule",
]
