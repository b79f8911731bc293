"""Folders that appear whole or not at all: every checkpoint and every export is written into `<path>.tmp`
(`temporary_folder`) and then put in place by `publish`, which moves an older `<path>` aside to `<path>.old`,
renames the new folder and deletes the old one. A kill at any moment leaves `<path>` whole, or `<path>.old` whole
beside a `<path>.tmp`; `recover` (run before a run resumes) settles that: the new folder when it is known to be
complete, else the old one back.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from safetensors import SafetensorError

TMP, OLD = ".tmp", ".old"


def temporary_folder(path: str) -> str:
    """An empty `<path>.tmp` to write into (the leftover of an earlier attempt is cleared first)."""
    tmp = path.rstrip(os.sep) + TMP
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, path: str) -> None:
    """Put the finished folder `tmp` at `path`, replacing what is there; see the module docstring."""
    path = path.rstrip(os.sep)
    old = path + OLD
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)  # the leftover of an earlier interrupted publish, if any
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover(path: str, complete: Callable[[str], bool]) -> list[str]:
    """Finish or undo a `publish` of `path` that a kill interrupted; one line for each thing done.

    A `<path>.tmp` that `complete` accepts was whole and only not yet renamed: it is published (it is newer than
    `<path>`); one it does not accept never finished: deleted. A `<path>.old` is what a publish was replacing:
    deleted once `<path>` is complete, else put back."""
    said, tmp, old = [], path + TMP, path + OLD
    if os.path.isdir(tmp):
        if complete(tmp):
            publish(tmp, path)
            said.append(f"completed {path}: its save was interrupted after it was written")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            said.append(f"removed {tmp}: its save never finished")
    if os.path.isdir(old):
        if os.path.isdir(path) and complete(path):
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"removed {old}: {path} replaced it")
        elif complete(old):
            shutil.rmtree(path, ignore_errors=True)
            os.rename(old, path)
            said.append(f"restored {path}: a save that was replacing it never finished")
        else:
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"removed {old}: its save never finished")
    return said


# What a failed write raises: torch.save's zip writer reports a full disk as a RuntimeError, safetensors as its own.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def folder_bytes(path: str) -> int:
    """The bytes of the files under `path`."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def write_failure(path: str, err: BaseException, kept: str | None,
                  then: str = "then resume with --resume-from-checkpoint auto") -> str:
    """One line for a folder that could not be written: which, why, the free bytes where it was going, what is
    still whole (`kept`: the last checkpoint, or None), and what to do (`then`, after making room)."""
    parent = os.path.dirname(path.rstrip(os.sep)) or "."
    try:
        free = f"{shutil.disk_usage(parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "its free space unknown"
    reason = f"{err.strerror} (errno {err.errno})" if isinstance(err, OSError) and err.strerror else \
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    whole = f"the last checkpoint, {kept}, is whole ({folder_bytes(kept) / 2**20:.1f} MiB)" if kept else \
        "no checkpoint was saved before it"
    return f"cannot write {path}: {reason}; {free}, {whole}; free space there (or lower --save-total-limit), {then}"
