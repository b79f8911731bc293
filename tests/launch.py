"""Helpers that start ftloop the way users do: `python -m ftloop.train` or torchrun, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

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
    result = subprocess.run(command, env={**env(), **extra_env}, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert GLOO_EXIT_ABORT not in result.stderr, f"a rank aborted at exit:\n{result.stderr[-3000:]}"
    return result


GLOO_EXIT_ABORT = "terminate called without an active exception"
"""What a process prints when the interpreter's teardown destroys a gloo process group whose threads are alive:
SIGABRT (pytorch/pytorch#190489; measured: 6 of 12 two-rank runs of a plain script without
destroy_process_group, 0 of 12 with it; seen once in this suite after destroy_process_group, in a worker whose
FSDP model still held the group). ftloop.train's cli and every test worker end with
ftloop.distributed.leave, which skips that teardown: any run that prints it fails its test."""


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


def logged_losses(out, once: bool = True) -> dict:
    """{step: logged training loss} of a run's metrics.jsonl (the last record of a step wins); `once`: each step
    was logged once, also across a stop and resume."""
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert not once or len(train) == len({s for s, _ in train}), "a step was logged twice"
    return dict(train)


def image_and_text_rows(bundle: dict, folder) -> str:
    """A data file of two of the bundle's rows, one with an image and one without: with 2 processes and one row
    each, every step has a rank with an image and a rank with text only (whose vision tower still runs)."""
    rows = json.loads(open(bundle["train_json"]).read())
    path = os.path.join(folder, "image-and-text.json")
    with open(path, "w") as f:
        json.dump([next(r for r in rows if "image" in r), next(r for r in rows if "image" not in r)], f)
    return path


def resume_a_copy(bundle, out, resumed, flags: list[str], step: int) -> subprocess.CompletedProcess:
    """Continue a copy of `out`'s checkpoint-<step> in the new folder `resumed` (2 processes, `flags` as the first
    run had them), as a preempted run continues elsewhere: it must log the first run's losses after `step`."""
    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, f"checkpoint-{step}"), os.path.join(resumed, f"checkpoint-{step}"))
    result = check(torchrun(2, ["-m", "ftloop.train", *train_flags(bundle, resumed, *flags,
                                                                   "--resume-from-checkpoint", "auto")]))
    assert f"at step {step}" in result.stdout
    assert logged_losses(resumed) == {k: v for k, v in logged_losses(out).items() if k > step}
    return result


def checkpoint_state(path) -> dict:
    """A checkpoint's {"model": ..., "optimizer": ...} in one process, the parameters in their shapes (ftloop saves
    them flattened, their shapes in parameters.json) under their names without FSDP's and peft's wrapper parts."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = str(path) + ".pt"
    dcp_to_torch_save(str(path), target)
    state = torch.load(target, weights_only=False)
    with open(os.path.join(path, "parameters.json")) as f:
        shapes = json.load(f)
    state["model"] = {name: tensor.view(shapes[name]) for name, tensor in state["model"].items()}
    return state

