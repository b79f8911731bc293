"""One run per --output-dir, proven writable before anything slow; workers that outlive their torchrun agent
leave with a whole checkpoint; a full disk is one line and leaves nothing half-written."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ftloop.distributed import World
from ftloop.errors import ConfigError
from ftloop.fsdp.checkpoint import complete_checkpoints, verify_checkpoint
from ftloop.output_dir import LOCK_FILE, claim_output_dir, lock_output_dir, prove_writable
from launch import REPO, env, train_flags
from test_cli import one_error_line
from test_resume import launch_and_wait, logged_steps


def test_a_second_claim_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(tmp_path):
    out = tmp_path / "out"
    with claim_output_dir(str(out), World.single()):
        holder = json.load(open(out / LOCK_FILE))
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"^--output-dir {out}: another run is using it \(pid {os.getpid()} "
                                              rf"on {holder['host']}, started "):
            lock_output_dir(str(out))  # a descriptor of its own: as another process would
    os.close(lock_output_dir(str(out)))  # released with the block
    # A holder that died leaves its file behind, but the kernel dropped its lock.
    dead = subprocess.run([sys.executable, "-c", f"import os; from ftloop.output_dir import lock_output_dir; "
                           f"lock_output_dir({str(out)!r}); os._exit(0)"], env=env(), cwd=REPO)
    assert dead.returncode == 0 and json.load(open(out / LOCK_FILE))["pid"] != os.getpid()
    os.close(lock_output_dir(str(out)))


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"^--output-dir .*a-file/out: cannot write there: Not a directory"):
        prove_writable(str(tmp_path / "a-file" / "out"))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ConfigError, match=r"cannot write there \(the disk is full\): No space left on device"):
        prove_writable(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []  # the probe is removed however it failed


def own_namespace_works() -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (`unshare -rm`)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_namespace = pytest.mark.skipif(not own_namespace_works(), reason="no user namespaces to mount a tiny tmpfs")


def in_tiny_filesystem(folder, size: str, command: list[str], read_only: bool = False, timeout: float = 240):
    """`command` in a mount namespace where `folder` is a fresh tmpfs of `size` (read-only if asked); the run's
    output and a listing of `folder/out` (the tmpfs is gone when the command ends)."""
    folder.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    script = (f'mount -t tmpfs -o {options} tmpfs "{folder}" && "$@"; code=$?; '
              f'cp -r "{folder}/out" "{folder}.copy" 2>/dev/null; exit $code')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@needs_namespace
def test_a_read_only_output_dir_is_refused_before_the_data_check(tiny_bundle, tmp_path):
    folder = tmp_path / "ro"
    result = in_tiny_filesystem(folder, "1m", [sys.executable, "-m", "ftloop.train",
                                               *train_flags(tiny_bundle, folder / "out")], read_only=True)
    assert result.returncode == 2
    assert one_error_line(result) == (f"ftloop: error: --output-dir {folder}/out: cannot write there: Read-only file system "
                                      "(errno 30); give a folder this user can write, with room for the checkpoints")
    assert "rows" not in result.stdout + result.stderr  # before the data check


@needs_namespace
def test_a_full_disk_is_one_line_and_leaves_the_earlier_checkpoints_whole(tiny_bundle, tmp_path):
    """On a 5 MiB file system each checkpoint (1.3 MiB) fills it further: the third cannot be written. Both ranks
    stop with one line (the folder, the free bytes, the last whole checkpoint and its size), its temporary folder
    is removed, and the two before it verify."""
    folder = tmp_path / "disk"
    result = in_tiny_filesystem(folder, "5m", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", "2", "-m", "ftloop.train",
                                               *train_flags(tiny_bundle, folder / "out", "--save-steps", "1",
                                                            "--max-steps", "8")])
    assert result.returncode == 1, result.stderr[-3000:]  # torchrun's code for a failed worker
    copy = tmp_path / "disk.copy"
    saved = complete_checkpoints(str(copy))
    assert len(saved) >= 2 and not any(name.endswith(".tmp") for name in os.listdir(copy)), os.listdir(copy)
    step, last = saved[-1]
    errors = {line for line in result.stderr.splitlines() if line.startswith("ftloop: error: ")}
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors.pop().startswith(
        f"ftloop: error: cannot write {folder}/out/checkpoint-{step + 1}: No space left on device (errno 28); ")
    assert f"the last checkpoint, {folder}/out/checkpoint-{step}, is whole (" in result.stderr
    for _, path in saved:
        assert verify_checkpoint(path, World.single()) is None


def worker_pids(agent: int) -> list[int]:
    """The processes whose parent is `agent` (torchrun's workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == agent:
                found.append(int(pid))
        except (OSError, IndexError):
            continue
    return found


def test_a_second_run_is_refused_and_workers_leave_with_a_checkpoint_when_their_agent_dies(tiny_bundle, tmp_path):
    """The requeue case: a run's torchrun agent is killed outright while its workers train on; a second run on
    the folder is refused naming rank 0's pid, and the workers notice the agent is gone, stop together at the
    next step with a whole checkpoint and leave within seconds."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "ftloop.train", *train_flags(tiny_bundle, out, "--max-steps", "100000", "--logging-steps", "1")]
    proc = launch_and_wait(command, out, until=lambda: logged_steps(out) >= 2)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    holder = json.load(open(out / LOCK_FILE))
    assert holder["pid"] in workers

    # The second run (its rank 0 claims the folder as this does: test_a_read_only_output_dir... shows the claim
    # comes first in ftloop.train) is refused, naming the holder.
    with pytest.raises(ConfigError, match=rf"^--output-dir {out}: another run is using it \(pid {holder['pid']} on "):
        lock_output_dir(str(out))

    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=60)  # the pipes close when the last worker has left
    finally:
        for pid in workers:  # workers that stay would train on for hours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    left_after = time.monotonic() - killed
    assert not any(os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
                   for pid in workers)
    assert f"the torchrun agent (pid {proc.pid}) is gone" in stderr
    saved = complete_checkpoints(str(out))
    assert len(saved) == 1 and f"checkpoint {saved[0][1]} saved" in stderr
    assert verify_checkpoint(saved[0][1], World.single()) is None
    assert left_after < 20, left_after
    print(f"workers left {left_after:.1f} s after their agent was killed")


@needs_namespace
def test_a_full_disk_during_the_export_is_one_line_on_every_rank(tiny_bundle, tmp_path):
    """The final export (rank 0 writes what every rank gathers) on a 256 KiB file system, in 64 KB shards so that a
    write fails while units are still to be gathered: rank 0's failed write is every rank's one line, after the
    gathers the others are in, and no temporary folder is left."""
    folder = tmp_path / "disk"
    result = in_tiny_filesystem(folder, "256k", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "2", "-m", "ftloop.train",
                                                 *train_flags(tiny_bundle, folder / "out", "--max-steps", "2",
                                                              "--max-shard-size", "64KB")])  # fails mid-stream
    assert result.returncode == 1, result.stderr[-3000:]
    errors = {line for line in result.stderr.splitlines() if line.startswith("ftloop: error: ")}
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors.pop().startswith(f"ftloop: error: cannot write {folder}/out/final: SafetensorError: Error while "
                                   "serializing: I/O error: No space left on device (os error 28); ")
    assert "no checkpoint was saved before it" in result.stderr
    assert sorted(os.listdir(tmp_path / "disk.copy")) == [".ftloop", ".ftloop.lock", "metrics.jsonl"]
