"""Crash- and race-safe on-disk caches: every file lands under its final name whole or not at all.

A cache directory is `cache_dir/<dataset>/<fingerprint>/`, the fingerprint hashing everything the
cache was built from, so a changed source or setting never reuses stale data. Its `meta.json` is
written last: a directory without one (an interrupted build) is rebuilt, never trusted.
"""

import fcntl
import hashlib
import json
import os
import re
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1  # bump when the layout or the tokenisation code changes, to invalidate old caches
# <name>.<pid>@<host>.<8 hex>.tmp; names written before the host was recorded lack "@<host>".
TEMPORARY_NAME = re.compile(r".+\.(?P<pid>\d+)(@(?P<host>[^@/]+))?\.[0-9a-f]{8}\.tmp")


@contextmanager
def atomic_path(path: Path):
    """Yield a unique temporary path next to `path`; `os.replace` it onto `path` if the block succeeds.

    The name carries the pid, the host and a random suffix, so concurrent writers never share a temp
    file; on any failure (including Ctrl-C) the temp file is removed and `path` is left untouched.
    Only SIGKILL (or a crash of the machine) leaves one behind: writing into the folder again first
    removes those of dead writers (`remove_stale_temporaries`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    temporary = path.with_name(f"{path.name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def writer_is_dead(temporary: Path) -> bool:
    """Whether the process that named `temporary` (atomic_path's format) has ended, for certain.

    Only a process of this host can be checked; a name from another host (a shared filesystem) is
    never judged dead. A pid that is alive (perhaps reused by an unrelated process) or that belongs
    to another user counts as alive: a stale file may be kept, a live writer's file is never lost.
    Names without a host, from before the host was recorded, are judged by their pid alone.
    """
    match = TEMPORARY_NAME.fullmatch(temporary.name)
    if match is None or match["host"] not in (None, socket.gethostname()):
        return False
    try:
        os.kill(int(match["pid"]), 0)  # signal 0 sends nothing: it only asks whether the pid exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive under another user; too large to be a pid
        pass
    return False


def remove_stale_temporaries(directory: Path, pattern: str = "*.tmp") -> None:
    """Delete the temporary files (`pattern` below `directory`) of writers that are dead.

    They are never trusted (the real name appears only by rename), but a SIGKILLed writer leaves
    them behind, up to a whole split or checkpoint in size.
    """
    for temporary in directory.glob(pattern):
        if writer_is_dead(temporary):
            temporary.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive `flock` on `path` (created if needed) for the block.

    Lets one DDP rank build while the others wait and then find the finished cache, instead of all
    ranks repeating the same work. Correctness does not rest on it (files are written atomically);
    the kernel releases the lock if the holder dies, so it never goes stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed in chunks so large files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: Path) -> dict:
    """Name, size and content hash of a source file: the part of a fingerprint that a file contributes."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def fingerprint(key: dict) -> str:
    """16 hex digits naming a cache built from `key` (JSON-able: sources and settings)."""
    text = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0 .. vocab_size - 1."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def read_meta(directory: Path) -> dict | None:
    """The `meta.json` of a complete cache in `directory`, else None.

    Complete means meta.json exists (it is written last) and every split file has the size it
    records, so a cache whose files were truncated or swapped afterwards is rebuilt too.
    """
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except FileNotFoundError:
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, length in meta["lengths"].items():
        split_file = directory / f"{split}.bin"
        if not split_file.is_file() or split_file.stat().st_size != length * itemsize:
            return None
    return meta


def write_meta(directory: Path, meta: dict) -> None:
    """Write `meta.json`, the marker that every other file of the cache is complete."""
    with atomic_path(directory / "meta.json") as temporary:
        temporary.write_text(json.dumps(meta, indent=2, sort_keys=True))
