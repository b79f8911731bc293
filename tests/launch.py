"""Helpers that start ftloop the way users do: `python -m ftloop.train` or torchrun, in a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHON"] = sys.executable  # scripts/train_shell.sh runs the interpreter that runs the tests
    return e


def torchrun(nproc: int, target: list[str], timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc <target>`; target is ["-m", "ftloop.train", ...] or [script, ...].

    The timeout turns a collective hang into a failed test instead of a stuck suite.
    """
    # --standalone: torchrun binds a free port itself, so concurrent runs cannot race for one.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *target]
    output_dir = target[target.index("--output-dir") + 1] if "--output-dir" in target else None
    backup = None
    if output_dir and os.path.isdir(output_dir):  # what the test put there, for a second attempt to start from
        backup = tempfile.mkdtemp()
        shutil.copytree(output_dir, os.path.join(backup, "out"))
    result = subprocess.run(command, env={**env(), **extra_env}, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if GLOO_CONNECT_ABORT in result.stderr and "SIGABRT" in result.stderr:
        # A rare C++ abort of one gloo worker (std::terminate; the same signature as the open upstream
        # pytorch/gloo#514 in its TCP connection setup), seen about once a suite on the loaded 2-core machine
        # and not reproduced in 20 runs alone. It is not ftloop's behaviour under test: run once more, from the
        # output folder as the test left it (the first attempt's metrics and checkpoints would count twice);
        # any other failure, or the same abort twice, still fails.
        if output_dir:
            shutil.rmtree(output_dir, ignore_errors=True)
            if backup:
                shutil.copytree(os.path.join(backup, "out"), output_dir)
        result = subprocess.run(command, env={**env(), **extra_env}, cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
    if backup:
        shutil.rmtree(backup, ignore_errors=True)
    return result


GLOO_CONNECT_ABORT = "terminate called without an active exception"


def python_m(module: str, args: list[str], timeout: float = 240, extra_env: dict | None = None):
    """`python -m module args`; extra_env values of None remove that variable."""
    environment = {**env(), **(extra_env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.run([sys.executable, "-m", module, *args], env=environment, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


FAULTY_TRAIN = os.path.join(REPO, "tests", "faulty_train.py")  # ftloop.train with ftloop.faults injected


def train_flags(bundle: dict, output_dir, *extra: str) -> list[str]:
    """Flags for a short run on the tiny test bundle."""
    return ["--model-name-or-path", bundle["model_dir"], "--train-data", bundle["train_json"],
            "--image-folder", bundle["image_folder"], "--output-dir", str(output_dir), "--report-to", "none",
            "--dataloader-num-workers", "0", "--save-steps", "0", *extra]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-12000:]}"
    return result
