"""One run per `--output-dir`, in a folder proven writable, before anything slow starts.

`claim_output_dir`, run by rank 0 before the data check and the model load:
- creates the folder and writes and removes a file in it: a read-only folder or a full disk is one line now, not an
  `OSError` after minutes of loading;
- takes an exclusive lock on `<output-dir>/.ftloop.lock` (`flock`) for the run's life, and writes who holds it
  (host, pid, start time, the job's id). The kernel releases it when the process dies however it dies, so a stale
  file never blocks a run; a second run on the folder (two started together, or a scheduler's requeue while the
  first run's workers still live) is refused in one line naming the holder. Two writers on one folder would delete
  each other's saves and mark mixed checkpoints complete.

The lock works wherever `flock` does: local disks, NFS (Linux maps it to NFS byte-range locks), Lustre mounted with
`flock`. A DataLoader worker forked by rank 0 shares the lock and leaves within PyTorch's 5 s check after its rank
dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from ftloop.distributed import World, agree
from ftloop.errors import ConfigError

LOCK_FILE = ".ftloop.lock"


def _holder() -> dict:
    # What names a run to the people who launched it: the scheduler's job, torchrun's run.
    job = {"SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID"), "TORCHELASTIC_RUN_ID": os.environ.get("TORCHELASTIC_RUN_ID")}
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            **{key: value for key, value in job.items() if value}}


def _said(holder: dict) -> str:
    jobs = "".join(f", {key} {value}" for key, value in holder.items() if key not in ("host", "pid", "started"))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}{jobs}"


def prove_writable(output_dir: str) -> None:
    """Create `output_dir` and write, sync and remove a file in it; ConfigError (one line) when that fails."""
    probe = os.path.join(output_dir, f".ftloop-write-test-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"ftloop")
                f.flush()
                os.fsync(f.fileno())
        finally:
            if os.path.exists(probe):
                os.remove(probe)
    except OSError as err:
        full = " (the disk is full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise ConfigError(f"--output-dir {output_dir}: cannot write there{full}: {err.strerror} (errno {err.errno}); "
                          "give a folder this user can write, with room for the checkpoints") from None


def lock_output_dir(output_dir: str) -> int:
    """Take `output_dir`'s lock; the open descriptor that holds it (closing it, or the process ending, releases
    it). ConfigError naming the holder when another process has it."""
    fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        held = err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}") if held else {}
        except ValueError:
            holder = {}  # written this instant
        os.close(fd)
        if held:
            raise ConfigError(f"--output-dir {output_dir}: another run is using it ({_said(holder)}); wait for it to "
                              "end or stop it, or give another --output-dir") from None
        raise ConfigError(f"--output-dir {output_dir}: cannot lock {LOCK_FILE} ({err.strerror}); on a network file "
                          "system, mount it with locking (Lustre: -o flock)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    return fd


@contextlib.contextmanager
def claim_output_dir(output_dir: str, world: World) -> Iterator[None]:
    """Rank 0 proves `output_dir` writable and holds its lock until the block ends; a refusal is every rank's
    (collective)."""
    held = []

    def claim() -> None:
        prove_writable(output_dir)
        held.append(lock_output_dir(output_dir))

    agree(world, claim, "rank 0")
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
