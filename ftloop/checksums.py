"""SHA-256 sums of a folder's files, written as `SHA256SUMS` (the format of `sha256sum`, so that
`cd checkpoint-N && sha256sum -c SHA256SUMS` checks a checkpoint by hand too), and checked against the files.

A checkpoint records one when its save completes (ftloop.fsdp.checkpoint) and is checked before it is resumed
from or exported: a flipped byte, a truncated or missing file is then one line naming the file, never weights
that load silently wrong. SHA-256 (1.3 GB/s a core here; hashlib releases the GIL, so `digests` reads several
files at once) rather than a CRC: it costs two reads of what is hashed either way, and it is what `sha256sum`
checks.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

SUMS_FILE = "SHA256SUMS"
CHUNK_BYTES = 2**20
THREADS = 4  # files hashed at once by one process (the eight ranks of a node hash theirs side by side)


def digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            sha.update(block)
    return sha.hexdigest()


def digests(folder: str, names: list[str]) -> dict[str, str]:
    """{name: sha256 hex} of the files `names` (paths relative to `folder`)."""
    with ThreadPoolExecutor(min(THREADS, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: digest(os.path.join(folder, name)), names)))


def write_sums(folder: str, sums: dict[str, str]) -> None:
    with open(os.path.join(folder, SUMS_FILE), "w") as f:
        f.writelines(f"{sums[name]}  {name}\n" for name in sorted(sums))
        f.flush()
        os.fsync(f.fileno())


def read_sums(folder: str) -> dict[str, str]:
    """{name: sha256 hex} recorded in `folder`'s SHA256SUMS; ValueError naming the line when it is damaged,
    FileNotFoundError when there is none."""
    sums = {}
    with open(os.path.join(folder, SUMS_FILE), encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            value, sep, name = line.rstrip("\n").partition("  ")
            if not sep or len(value) != 64 or not name or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"{SUMS_FILE} line {number} is damaged")
            sums[name] = value
    if not sums:
        raise ValueError(f"{SUMS_FILE} is empty")
    return sums


def problems(folder: str, sums: dict[str, str]) -> list[str]:
    """What is wrong with the files `sums` lists (relative to `folder`): missing, unreadable, or another sum."""
    found = []
    readable = []
    for name in sums:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            found.append(f"{name} is missing")
        else:
            readable.append(name)
    try:
        actual = digests(folder, readable)
    except OSError as err:
        return found + [f"cannot read {err.filename or 'a file'} ({err.strerror})"]
    found += [f"{name} is damaged (its SHA-256 differs from the one recorded when it was saved)"
              for name in readable if actual[name] != sums[name]]
    return found
