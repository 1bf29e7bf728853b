"""enwik8: the first 10^8 bytes of an English Wikipedia dump, modelled byte by byte (bits per character).

Standard split: the first 90M bytes train, the next 5M valid, the last 5M test.
"""

import gzip
import http.client
import shutil
import urllib.request
import zipfile
import zlib
from pathlib import Path

from fma.errors import ConfigurationError

from .base import SPLITS, FileDataModule, require_file, write_byte_splits
from .cache import atomic_path, exclusive_lock, file_identity, sha256_file

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_ZIP_BYTES = 36_445_475
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # of the unzipped file
PATH_HINT = "data.path=/path/to/enwik8 (or enwik8.zip / enwik8.gz)"


def download_enwik8(destination: Path) -> Path:
    """Fetch enwik8.zip to `destination` (once; checked by size and SHA-256 before it gets that name)."""
    with exclusive_lock(destination.with_name(f"{destination.name}.lock")):
        if destination.exists():
            return destination
        try:
            with atomic_path(destination) as temporary:
                with urllib.request.urlopen(ENWIK8_URL, timeout=60) as response, open(temporary, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                size, digest = temporary.stat().st_size, sha256_file(temporary)
                if (size, digest) != (ENWIK8_ZIP_BYTES, ENWIK8_ZIP_SHA256):
                    raise ConfigurationError(
                        f"The download of {ENWIK8_URL} is corrupt: {size:,} bytes with SHA-256 {digest}, "
                        f"expected {ENWIK8_ZIP_BYTES:,} bytes with SHA-256 {ENWIK8_ZIP_SHA256}. Run again, "
                        f"or download it yourself and pass {PATH_HINT}."
                    )
        except (OSError, http.client.HTTPException) as error:
            raise ConfigurationError(
                f"Could not download enwik8 from {ENWIK8_URL} ({error}). Without network access, copy the "
                f"file here and pass {PATH_HINT}."
            ) from error
    return destination


def read_enwik8(path: Path, expected_bytes: int) -> bytes:
    """The enwik8 bytes of a raw, .zip (member `enwik8`) or .gz file, checked to be `expected_bytes` long."""
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                if "enwik8" not in archive.namelist():
                    raise ConfigurationError(
                        f"{path} has no member named 'enwik8' (it holds {archive.namelist()[:5]}). "
                        f"Use the original {ENWIK8_URL}, or pass {PATH_HINT}."
                    )
                data = archive.read("enwik8")
        elif path.suffix == ".gz":
            data = gzip.decompress(path.read_bytes())
        else:
            data = path.read_bytes()
    except (zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ConfigurationError(f"{path} is not a readable archive ({error}). Pass {PATH_HINT}.") from error
    if len(data) != expected_bytes:
        raise ConfigurationError(
            f"{path} holds {len(data):,} bytes of enwik8, but the split needs {expected_bytes:,} "
            f"(data.split_bytes=). The file is truncated or not enwik8 (the 100,000,000-byte original has "
            f"SHA-256 {ENWIK8_SHA256}): fetch it again from {ENWIK8_URL} and pass {PATH_HINT}."
        )
    return data


class Enwik8DataModule(FileDataModule):
    """enwik8 at byte level: vocab_size 256, metric "bpc".

    path: the raw file, enwik8.zip or enwik8.gz; None downloads enwik8.zip into cache_dir.
    split_bytes: (train, valid, test) byte counts, consecutive from the start of the file.
    """

    dataset_name = "enwik8"
    split_option = "data.split_bytes"

    def __init__(self, *, path: str | None = None, split_bytes=(90_000_000, 5_000_000, 5_000_000), **common):
        super().__init__(**common)
        self.path = Path(path).expanduser() if path is not None else None
        self.split_bytes = tuple(int(count) for count in split_bytes)
        if len(self.split_bytes) != 3 or min(self.split_bytes) < 1:
            raise ConfigurationError(
                f"data.split_bytes={list(self.split_bytes)} must be three positive byte counts: "
                f"train, valid, test."
            )

    def source(self) -> Path:
        if self.path is None:
            return download_enwik8(self.cache_dir / self.dataset_name / "download" / "enwik8.zip")
        return require_file(self.path, PATH_HINT)

    def cache_key(self) -> dict:
        return {"file": file_identity(self.source()), "split_bytes": list(self.split_bytes)}

    def build_cache(self, directory: Path) -> dict:
        data = memoryview(read_enwik8(self.source(), sum(self.split_bytes)))
        train, valid = self.split_bytes[0], self.split_bytes[0] + self.split_bytes[1]
        pieces = data[:train], data[train:valid], data[valid:]
        return write_byte_splits(directory, dict(zip(SPLITS, pieces)))
