"""The launchers and the Dockerfile, without GPUs, SLURM or Docker: scripts/train_shell.sh and
scripts/slurm/train.sbatch run against a stand-in torchrun that accepts exactly torch 2.6's options (the oldest
torchrun they must start: that of the image this project used to build on), and the Dockerfile's base is checked
against pyproject.toml and constraints.txt."""

import importlib.metadata
import json
import os
import re
import stat
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SHELL = os.path.join(REPO, "scripts", "train_shell.sh")
SBATCH = os.path.join(REPO, "scripts", "slurm", "train.sbatch")
DOCKERFILE = os.path.join(REPO, "Dockerfile")

# torch 2.6.0's torchrun options, as torch/distributed/run.py's get_args_parser declares them (read from the 2.6.0
# wheel); switches take no value, the others one. 2.12 added --shutdown-timeout, which 2.6 refuses.
TORCH26_SWITCHES = [("--standalone",), ("-m", "--module"), ("--no-python", "--no_python"),
                    ("--run-path", "--run_path")]
TORCH26_OPTIONS = [
    ("--nnodes",), ("--nproc-per-node", "--nproc_per_node"), ("--rdzv-backend", "--rdzv_backend"),
    ("--rdzv-endpoint", "--rdzv_endpoint"), ("--rdzv-id", "--rdzv_id"), ("--rdzv-conf", "--rdzv_conf"),
    ("--max-restarts", "--max_restarts"), ("--monitor-interval", "--monitor_interval"),
    ("--start-method", "--start_method"), ("--role",), ("--log-dir", "--log_dir"), ("-r", "--redirects"),
    ("-t", "--tee"), ("--local-ranks-filter", "--local_ranks_filter"), ("--node-rank", "--node_rank"),
    ("--master-addr", "--master_addr"), ("--master-port", "--master_port"), ("--local-addr", "--local_addr"),
    ("--logs-specs", "--logs_specs"),
]

FAKE_PYTHON = """#!PYTHON
# Stand-in for python3. `-c CODE` (a launcher asking torch for the GPU count) prints 2. `-m torch.distributed.run
# ARGS` parses ARGS as torch 2.6's torchrun does (argparse: its options, then the script and everything after it;
# exit 2 on any other option) and, instead of starting anything, appends what it got to $FAKE_TORCHRUN_LOG.
import argparse, json, os, sys
args = sys.argv[1:]
if args[0] == "-c":
    print(2)
    sys.exit(0)
assert args[:2] == ["-m", "torch.distributed.run"], args
parser = argparse.ArgumentParser(prog="torchrun")
for names in SWITCHES:
    parser.add_argument(*names, action="store_true")
for names in OPTIONS:
    parser.add_argument(*names)
parser.add_argument("training_script")
parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
options = vars(parser.parse_args(args[2:]))
env = {k: v for k, v in os.environ.items() if k.startswith("TORCH_") or k == "SLURM_NODEID"}
with open(os.environ["FAKE_TORCHRUN_LOG"], "a") as log:
    log.write(json.dumps({"options": options, "env": env}) + "\\n")
"""

FAKE_SRUN = """#!/bin/bash
# srun's part: run the task (what follows srun's own --options) once per node, with that node's SLURM_NODEID.
while [[ "$1" == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit; done
"""

FAKE_SCONTROL = """#!/bin/bash
[[ "$*" == "show hostnames node[01-02]" ]] || { echo "unexpected: $*" >&2; exit 1; }
printf 'node01\\nnode02\\n'
"""

# ftloop's flags, to be passed on as they are: spaces, `=`, and words torchrun would take as its own options
FLAGS = ["--model-name-or-path", "Qwen/Qwen2.5-VL-3B-Instruct", "--train-data", "data/a b.json",
         "--output-dir=runs/run 1", "--learning-rate", "1e-5", "-m", "--nnodes", "7"]


def executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(stat.S_IRWXU)
    return str(path)


@pytest.fixture
def launch(tmp_path):
    """launch(script, *flags, **env) runs a launcher in tmp_path against the stand-ins; returns (torchrun calls,
    stdout). Variables the launchers read are cleared from the test's own environment first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python = FAKE_PYTHON.replace("PYTHON", sys.executable, 1).replace("SWITCHES", repr(TORCH26_SWITCHES))
    python = executable(bin_dir / "python3", fake_python.replace("OPTIONS", repr(TORCH26_OPTIONS)))
    executable(bin_dir / "srun", FAKE_SRUN)
    executable(bin_dir / "scontrol", FAKE_SCONTROL)
    log = tmp_path / "torchrun.jsonl"

    def run(script, *flags, **extra_env):
        read = ("TORCH", "PET_", "SLURM_", "FTLOOP_", "SHUTDOWN_TIMEOUT", "NPROC_PER_NODE", "NNODES", "MASTER_",
                "RDZV_", "PWD")
        env = {k: v for k, v in os.environ.items() if not k.startswith(read)}
        env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=python, FAKE_TORCHRUN_LOG=str(log),
                   HF_HOME=str(tmp_path / "hf"), **extra_env)
        shell = "sh" if script == TRAIN_SHELL else "bash"
        result = subprocess.run([shell, script, *flags], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return calls, result.stdout

    return run


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_GPUS_ON_NODE": "4"}


@pytest.mark.usefixtures("launch")  # which writes the stand-in
def test_the_stand_in_refuses_what_torch_2_6_refuses(tmp_path):
    fake = str(tmp_path / "bin" / "python3")
    env = {**os.environ, "FAKE_TORCHRUN_LOG": str(tmp_path / "log")}
    good = subprocess.run([fake, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ftloop.train", "--x"],
                          env=env, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    bad = subprocess.run([fake, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--shutdown-timeout", "30",
                          "-m", "ftloop.train"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--shutdown-timeout" in bad.stderr, (bad.returncode, bad.stderr)


def test_train_shell_starts_torch_2_6_torchrun_with_the_grace_and_the_flight_recorder(launch, tmp_path):
    (call,), _ = launch(TRAIN_SHELL, *FLAGS)
    options, env = call["options"], call["env"]
    assert {k: options[k] for k in ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")} == {
        "nproc_per_node": "2", "nnodes": "1", "node_rank": "0", "master_addr": "127.0.0.1", "master_port": "29500"}
    assert options["module"] and options["training_script"] == "ftloop.train"
    assert options["training_script_args"] == FLAGS
    traces = os.path.realpath(tmp_path / "nccl_traces")
    assert env == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30", "TORCH_FR_BUFFER_SIZE": "2000",
                   "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_DUMP_TEMP_FILE": env["TORCH_FR_DUMP_TEMP_FILE"]}
    assert os.path.realpath(os.path.dirname(env["TORCH_FR_DUMP_TEMP_FILE"])) == traces
    assert os.path.basename(env["TORCH_FR_DUMP_TEMP_FILE"]) == "rank_"
    assert os.path.isdir(traces)  # torch writes no dump into a folder that does not exist


def test_sbatch_starts_torch_2_6_torchrun_on_each_node_with_the_grace_and_the_flight_recorder(launch, tmp_path):
    calls, stdout = launch(SBATCH, *FLAGS, SLURM_SUBMIT_DIR=str(tmp_path), **SLURM)
    assert [c["env"].pop("SLURM_NODEID") for c in calls] == ["0", "1"]
    prefix = f"{tmp_path}/nccl_traces/4242/rank_"
    for call in calls:
        options = call["options"]
        assert {k: options[k] for k in ("nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id")} == {
            "nnodes": "2", "nproc_per_node": "4", "rdzv_backend": "c10d", "rdzv_endpoint": "node01:29500",
            "rdzv_id": "4242"}
        assert options["module"] and options["training_script"] == "ftloop.train"
        assert options["training_script_args"] == FLAGS
        assert call["env"] == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "100", "TORCH_FR_BUFFER_SIZE": "2000",
                               "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_DUMP_TEMP_FILE": prefix}
    assert os.path.isdir(os.path.dirname(prefix))
    assert f"NCCL traces {prefix}<rank>" in stdout


def test_the_torch_installed_here_takes_the_grace_from_the_environment(monkeypatch):
    """What the launchers rely on, in torch itself (2.13 here, as in the image): torchrun's launch config takes
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT when no --shutdown-timeout is given."""
    from torch.distributed.run import config_from_args, get_args_parser

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "100")
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)  # torchrun's own name for the flag, which would win
    config, _, _ = config_from_args(get_args_parser().parse_args(["--nproc_per_node", "1", "-m", "ftloop.train"]))
    assert config.shutdown_timeout == 100


@pytest.mark.parametrize("script", [TRAIN_SHELL, SBATCH], ids=["train_shell", "sbatch"])
@pytest.mark.parametrize("given, expected", [
    ({"SHUTDOWN_TIMEOUT": "90"}, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "90"}),
    ({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "75"}, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "75"}),
    ({"SHUTDOWN_TIMEOUT": "90", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "75"}, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "90"}),
    ({"TORCH_FR_BUFFER_SIZE": "0"}, {"TORCH_FR_BUFFER_SIZE": "0"}),
    ({"TORCH_NCCL_TRACE_BUFFER_SIZE": "500"}, {"TORCH_FR_BUFFER_SIZE": "500", "TORCH_NCCL_TRACE_BUFFER_SIZE": "500"}),
    ({"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}, {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}),
    ({"FTLOOP_NCCL_TRACE_DIR": "{tmp}/traces"}, {"TORCH_FR_DUMP_TEMP_FILE": "{tmp}/traces/rank_"}),
    ({"TORCH_FR_DUMP_TEMP_FILE": "{tmp}/fr/x_"}, {"TORCH_FR_DUMP_TEMP_FILE": "{tmp}/fr/x_"}),
    ({"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "{tmp}/old/y_"},
     {"TORCH_FR_DUMP_TEMP_FILE": "{tmp}/old/y_", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "{tmp}/old/y_"}),
], ids=["SHUTDOWN_TIMEOUT", "torch's grace", "SHUTDOWN_TIMEOUT first", "buffer", "buffer, older name", "no dump",
        "trace folder", "dump file", "dump file, older name"])
def test_values_the_user_set_win(launch, tmp_path, script, given, expected):
    """Each value set beforehand reaches torchrun as given; one set under an older name that torch >= 2.8 reads
    after the TORCH_FR_* name is carried over to that name, or the launcher's default there would hide it."""
    given = {k: v.format(tmp=tmp_path) for k, v in given.items()}
    calls, _ = launch(script, *FLAGS, SLURM_SUBMIT_DIR=str(tmp_path), **SLURM, **given)
    for call in calls:
        assert {k: call["env"].get(k) for k in expected} == {k: v.format(tmp=tmp_path) for k, v in expected.items()}
        assert os.path.isdir(os.path.dirname(call["env"]["TORCH_FR_DUMP_TEMP_FILE"]))


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comment lines dropped."""
    lines = [line for line in open(DOCKERFILE).read().splitlines() if not line.lstrip().startswith("#")]
    logical = re.split(r"(?<!\\)\n", "\n".join(lines))
    return [(w[0].upper(), w[1] if len(w) > 1 else "") for line in logical
            if (w := line.replace("\\\n", " ").strip().split(None, 1))]


def docker_args() -> dict:
    return dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG" and "=" in a)


def test_the_base_image_is_pinned():
    bases = [a.split()[-1] if a.startswith("--platform") else a.split()[0] for i, a in dockerfile() if i == "FROM"]
    assert bases
    for base in bases:
        name, _, tag = base.rpartition(":")
        assert "$" not in base and ("@sha256:" in base or ("/" not in tag and name and tag != "latest")), base


def project() -> dict:
    return tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]


def pins() -> dict:
    return dict(line.split("==") for line in open(os.path.join(REPO, "constraints.txt")).read().splitlines()
                if line and not line.startswith("#"))


def requires_python_of_the_pins() -> dict:
    """Requires-Python of each package of constraints.txt installed here at its pinned version."""
    found = {}
    for name, version in pins().items():
        try:
            metadata = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if metadata["Version"] == version:
            found[name] = SpecifierSet(metadata.get("Requires-Python") or "")
    assert "transformers" in found, "transformers is not installed at its pinned version"
    return found


def test_the_base_python_fits_pyproject_and_the_pins_and_its_torch_reads_the_grace():
    args = docker_args()
    python, torch = args["BASE_PYTHON"], args["BASE_TORCH"]
    (base,) = [a for i, a in dockerfile() if i == "FROM"]
    assert f":{torch}-" in base, (torch, base)  # the ARG names the tag's torch
    # torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT from torch 2.12 on (torch/distributed/launcher/api.py)
    assert Version(torch) >= Version("2.12")
    assert SpecifierSet(project()["requires-python"]).contains(python)
    for name, spec in requires_python_of_the_pins().items():
        assert spec.contains(python), (name, str(spec), python)
    # and the image checks, at build time, that it ships what these ARGs say
    build_checks = " ".join(a for i, a in dockerfile() if i == "RUN")
    assert "== '${BASE_PYTHON}'" in build_checks and "== '${BASE_TORCH}'" in build_checks


def test_pyproject_promises_no_python_the_pins_refuse():
    admitted = SpecifierSet(project()["requires-python"])
    pinned = requires_python_of_the_pins()
    for python in ("3.9", "3.10", "3.11", "3.12", "3.13", "3.14"):
        if admitted.contains(python):
            assert all(spec.contains(python) for spec in pinned.values()), (python, pinned)


def test_every_pip_install_keeps_the_image_torch_and_the_tested_versions():
    runs = [a for i, a in dockerfile() if i == "RUN"]
    text = " ".join(runs)
    # the image's own torch, to its exact build, is a constraint written before any install
    assert re.search(r"""print\(f"torch==\{torch.__version__\}"\)' > /tmp/torch.txt""", text)
    installs = re.findall(r"pip install([^;&]*)", text)
    assert len(installs) >= 2
    for install in installs:
        assert "-c constraints.txt" in install and "-c /tmp/torch.txt" in install, install
    # ftloop with its flash extra, built against that torch
    assert "extras=lora,flash" in text
    assert any('".[$extras]"' in i and "--no-build-isolation" in i for i in installs)
    extras = project()["optional-dependencies"]
    assert [Requirement(r).name for r in extras["flash"]] == ["flash-attn"]
    # nothing else asks for another torch than the image's
    torch = docker_args()["BASE_TORCH"]
    assert not {"torch", "torchvision", "torchaudio"} & set(pins())
    requirements = [Requirement(r) for r in project()["dependencies"] + [r for e in extras.values() for r in e]]
    for requirement in requirements:
        if requirement.name == "torch":
            assert requirement.specifier.contains(torch), requirement


def docker_run_commands(path) -> list[str]:
    """Each `docker run` command of a file (options following it, continuation lines joined, comment marks and
    Markdown code spans left out)."""
    text = re.sub(r"\\\n[#\s]*", " ", open(path).read())
    return re.findall(r"docker run\s+-[^`\n]*", text)


@pytest.mark.parametrize("path", ["README.md", "Dockerfile"])
def test_every_docker_run_gives_nccl_and_the_loader_workers_shared_memory(path):
    commands = docker_run_commands(os.path.join(REPO, path))
    assert commands
    for command in commands:
        assert "--ipc=host" in command or "--shm-size" in command, command
