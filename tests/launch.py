"""Helpers that start ftloop the way users do: `python -m ftloop.train` or torchrun, in a subprocess."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time

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


_FORK_SERVER = multiprocessing.get_context("forkserver")
# What each forked process would import first. Names of installed modules only: the server does not see the tests'
# folder on its path (Python 3.11 passes it sys.path and ignores it), and a module it cannot import is skipped.
_FORK_SERVER.set_forkserver_preload(["ftloop.train", "ftloop.export",
                                     "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                                     "transformers.models.qwen3_vl.modeling_qwen3_vl"])


def forked_torchrun(nproc: int, target: list[str], timeout: float = 240,
                    **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun(nproc, target)` without the launcher: the same entry point in nproc processes with the environment
    torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID), forked from a server
    that imported ftloop once. A tiny run spends most of its time importing torch and transformers in every process
    (measured: a 3-step 2-rank run with 3 checkpoints and an export, 5.4 s under torchrun, 1.0 s forked), so tests
    of what a run computes use this; tests of the launcher and the process (signals, a dead agent, restarts, two
    nodes, the launch scripts, tracebacks and exit codes, variables read at import) start real processes. As
    torchrun does, the first process that fails stops the others (SIGTERM); the exit code is that process's."""
    environment = {**env(), **extra_env}
    port = free_port()
    environment |= {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
                    "MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": f"forked-{port}",
                    "TORCHELASTIC_RESTART_COUNT": "0"}
    return _forked(target, [environment | {"RANK": str(r), "LOCAL_RANK": str(r)} for r in range(nproc)], timeout)


def forked_python_m(module: str, args: list[str], timeout: float = 240,
                    extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`python_m(module, args)` in one process forked from the warm server (see forked_torchrun)."""
    environment = {k: v for k, v in {**env(), **(extra_env or {})}.items() if v is not None}
    return _forked(["-m", module, *args], [environment], timeout)


def _forked(target: list[str], environments: list[dict], timeout: float) -> subprocess.CompletedProcess:
    """One forked process per environment, their output gathered as a terminal would show it."""
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        for path in (out, err):
            open(path, "w").close()
        processes = [_FORK_SERVER.Process(target=_run_forked, args=(target, e, out, err)) for e in environments]
        for p in processes:
            p.start()
        deadline, code = time.monotonic() + timeout, 0
        while any(p.exitcode is None for p in processes):
            multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout=0.5)
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed and not code:
                code = failed[0]
                for p in processes:
                    if p.exitcode is None:
                        p.terminate()
            if time.monotonic() > deadline:
                for p in processes:
                    p.kill()
                raise subprocess.TimeoutExpired(target, timeout)
        result = subprocess.CompletedProcess(target, code, open(out).read(), open(err).read())
    assert GLOO_EXIT_ABORT not in result.stderr, f"a rank aborted at exit:\n{result.stderr[-3000:]}"
    return result


def _run_forked(target: list[str], environment: dict, stdout: str, stderr: str) -> None:
    """One process of `forked`: its environment, working folder and output files, then the target's main code."""
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(REPO)
    multiprocessing.set_start_method(None, force=True)  # a fresh interpreter's default, not the test process's
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(file, fd)
        os.close(file)
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            sys.modules.pop(target[1], None)  # preloaded as a module; `python -m` runs a fresh copy as __main__
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(bundle, resumed, *flags,
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

