"""Checkpoints that survive anything: exact resume after SIGTERM (torchrun restarts the job), resume at another
world size, atomic saves under SIGKILL, damaged checkpoints found by their sums and skipped, non-finite steps
skipped, and refusals of mismatched checkpoints."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ftloop.config import parse_args
from ftloop.data.sampler import StepBatchSampler
from ftloop.errors import ConfigError
from ftloop.checksums import SUMS_FILE
from ftloop.distributed import World
from ftloop.export import main as export_main
from ftloop.fsdp.checkpoint import COMPLETE_MARKER, check_resumable, latest_checkpoint, resolve_resume, verify_checkpoint
from ftloop.model import load_config
from launch import FAULTY_TRAIN, GLOO_EXIT_ABORT, REPO, check, env, forked_python_m, forked_torchrun, torchrun
from launch import train_flags
from launch import logged_losses as losses

# Warmup and a cosine decay make the schedule part of what must be restored; grad accumulation and length
# grouping (on by default) make the data position part of it.
RUN = ["--max-steps", "8", "--gradient-accumulation-steps", "2", "--logging-steps", "1", "--eval-steps", "4",
       "--learning-rate", "1e-3", "--warmup-ratio", "0.25", "--lr-scheduler-type", "cosine", "--no-bf16",
       "--save-dtype", "fp32"]


def flags(bundle, out, *extra):
    return train_flags(bundle, out, "--eval-data", bundle["eval_json"], *RUN, *extra)


TIMINGS = {"time", "tokens_per_s", "step_time_s", "data_wait_s", "peak_allocated_gib", "peak_reserved_gib", "checkpoint_save_s"}


def logged_state(out) -> dict:
    """(step, kind) -> what metrics.jsonl says of that step besides timings: the loss, lr, grad norm, epoch and
    tokens seen of training records, the eval loss and best record of eval records (the last record wins)."""
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    kinds = {"loss": "train", "eval_loss": "eval"}
    return {(r["step"], kind): {k: v for k, v in r.items() if k not in TIMINGS}
            for r in records for key, kind in kinds.items() if key in r}


def final_weights(out) -> dict:
    return load_file(os.path.join(out, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def dropout_bundle(tiny_bundle, tmp_path_factory) -> dict:
    """The tiny bundle with dropout in the language model's attention: a resume that did not restore every
    rank's generators would draw other dropout masks, and the losses after it would differ."""
    folder = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_bundle["model_dir"], folder)
    config = json.load(open(folder / "config.json"))
    config["text_config"]["attention_dropout"] = 0.2
    json.dump(config, open(folder / "config.json", "w"))
    return dict(tiny_bundle, model_dir=str(folder))


def reference_run(bundle, out, save_steps: int = 4):
    """8 uninterrupted steps on 2 processes (4 steps an epoch), with a checkpoint every `save_steps`."""
    check(forked_torchrun(2, ["-m", "ftloop.train", *flags(bundle, out, "--save-steps", str(save_steps))]))
    return out


@pytest.fixture(scope="module")
def reference(dropout_bundle, tmp_path_factory):
    return reference_run(dropout_bundle, tmp_path_factory.mktemp("reference"))


def run_pids(out) -> list[int]:
    """Every process of the run writing to `out`: torchrun, its ranks and their DataLoader workers (forked, so
    they carry their rank's command line)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def worker_pid(out, local_rank: int) -> int | None:
    """The pid of the ftloop.train worker of `local_rank` writing to `out` (its rank, not a loader worker)."""
    for pid in run_pids(out):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        worker = b"ftloop.train" in cmdline or FAULTY_TRAIN.encode() in cmdline
        if worker and f"LOCAL_RANK={local_rank}".encode() in environ and not is_loader_worker(str(pid)):
            return pid
    return None


def is_loader_worker(pid: str) -> bool:
    """A DataLoader worker is forked from its rank (same command line and environment); a rank's parent is
    torchrun, which has no LOCAL_RANK."""
    try:
        parent = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
        return b"LOCAL_RANK=" in open(f"/proc/{parent}/environ", "rb").read()
    except OSError:
        return False


def launch_and_wait(command, out, until, timeout=120):
    """Start `command`, poll until `until()` is true, return the running process."""
    proc = subprocess.Popen(command, env=env() | {"PYTHONUNBUFFERED": "1"}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not until():
        assert proc.poll() is None, f"ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)
    return proc


def logged_steps(out) -> int:
    path = os.path.join(out, "metrics.jsonl")
    return len(losses(out, once=False)) if os.path.exists(path) else 0


def test_sigterm_saves_and_torchrun_restart_resumes_bit_identical(dropout_bundle, reference, tmp_path):
    """SIGTERM reaches one rank mid-run: every rank stops after the same step, saves and exits 143; torchrun
    --max-restarts starts them again, --resume-from-checkpoint auto continues, and the result is bit for bit
    the uninterrupted run's, dropout included. Mutation checks (tried): without the restore of the torch
    generator the losses after the stop differ; so they did, at step 4 by 0.017, while the DataLoaders drew their
    workers' seed from the global generator (fixed: they have their own)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", "-m", "ftloop.train",
               *flags(dropout_bundle, out, "--save-steps", "4", "--resume-from-checkpoint", "auto")]
    proc = launch_and_wait(command, out, until=lambda: logged_steps(out) >= 2)
    os.kill(worker_pid(out, 1), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-5000:]
    assert "stopped by SIGTERM after step" in stderr
    stopped_at = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 2 <= stopped_at < 8
    assert f"resumed from {out}/checkpoint-{stopped_at} at step {stopped_at}" in stdout
    # The restart reads the row check back from --output-dir instead of measuring every row again.
    assert stdout.count("row check cached in") == 2 and "(same data, tokenizer and flags)" in stdout  # train, eval
    assert losses(out) == losses(reference)  # every step's loss, before and after the restart
    assert logged_state(out) == logged_state(reference)  # and the lr, tokens seen, epoch, best record
    expected, got = final_weights(reference), final_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("delivery, loader_workers, signum", [
    ("launcher", 2, signal.SIGINT),  # Ctrl-C to torchrun (Kubernetes' SIGTERM reaches it in the next case too)
    ("every process", 2, signal.SIGTERM),  # scancel, a process group
    ("one rank", 1, signal.SIGINT),
])
def test_a_stop_signal_however_delivered_ends_in_one_checkpoint(dropout_bundle, reference, tmp_path, delivery,
                                                                loader_workers, signum):
    """DataLoader workers ignore the stop signals (their rank shuts them down), so a signal that reaches them too
    still ends in every rank finishing the step and one complete checkpoint, from which the run continues as if
    never stopped. Before the workers ignored them: `DataLoader worker (pid ...) is killed by signal` and no
    checkpoint, in the first two cases."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "ftloop.train", *flags(dropout_bundle, out, "--dataloader-num-workers", str(loader_workers))]
    proc = launch_and_wait(command, out, until=lambda: logged_steps(out) >= 2)
    targets = {"launcher": [proc.pid], "every process": run_pids(out), "one rank": [worker_pid(out, 1)]}[delivery]
    assert delivery != "every process" or len(targets) == 1 + 2 + 2 * loader_workers, targets
    for pid in targets:
        os.kill(pid, signum)
    _, stderr = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    said = [line for line in stderr.splitlines() if line.startswith(f"ftloop: stopped by {name} after step ")]
    assert "killed by signal" not in stderr and len(said) == 1, stderr  # rank 0 speaks for all
    assert GLOO_EXIT_ABORT not in stderr
    # torchrun exits 1, as it does when any worker fails or when it is signalled itself; when it was not (the
    # signal went to one rank), its summary lists the ranks' exits: 128 + the signal, but a rank still on its
    # way out (after the checkpoint's last barrier) when torchrun saw the first one leave is killed (-15).
    rank_codes = sorted(int(code) for code in re.findall(r"exitcode\s+:\s*(-?\d+)", stderr))
    print(f"{delivery}, {loader_workers} loader workers, {name}: torchrun exit {proc.returncode}, ranks {rank_codes}")
    assert proc.returncode == 1, stderr
    if delivery == "one rank":
        assert 128 + signum in rank_codes and set(rank_codes) <= {128 + signum, -signal.SIGTERM}, stderr
    else:
        assert rank_codes == [], stderr
    stopped_at = int(stderr.split(f"stopped by {name} after step ")[1].split(";")[0])
    assert sorted(os.listdir(out)) == [".ftloop", ".ftloop.lock", f"checkpoint-{stopped_at}", "metrics.jsonl"]
    assert latest_checkpoint(str(out)) == str(out / f"checkpoint-{stopped_at}")
    if loader_workers == 2 and delivery == "launcher":  # the exact continuation (one rank's: the restart test above)
        check(forked_torchrun(2, ["-m", "ftloop.train", *flags(dropout_bundle, out, "--resume-from-checkpoint", "auto",
                                                                "--dataloader-num-workers", "2")]))
        assert losses(out, once=False) == losses(reference)


def test_sigkill_of_one_rank_mid_training_ends_the_run_and_keeps_the_last_checkpoint(tiny_bundle, tmp_path):
    """A rank killed outright (OOM killer, a lost node) cannot save: the others leave well within --ddp-timeout
    instead of waiting in a collective, and the newest complete checkpoint is the one a resume takes."""
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "ftloop.train", *flags(tiny_bundle, out, "--save-steps", "2", "--ddp-timeout", "60")]
    proc = launch_and_wait(command, out, until=lambda: latest_checkpoint(str(out)) is not None
                           and logged_steps(out) >= 3)
    os.kill(worker_pid(out, 1), signal.SIGKILL)
    killed_at = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - killed_at < 60
    assert GLOO_EXIT_ABORT not in stderr  # the surviving rank took its process group down before exiting
    saved = sorted(int(name.split("-")[1]) for name in os.listdir(out) if name.startswith("checkpoint-"))
    assert latest_checkpoint(str(out)) == str(out / f"checkpoint-{saved[-1]}")


def test_resume_at_another_world_size_and_save_total_limit(tiny_bundle, tmp_path):
    """The 2-process checkpoint of step 3 (mid-epoch) continues on 1 process (4 micro-batches per step: the same global
    batch): same rows in the same steps, so the same losses and weights up to float summation order (no
    dropout here: masks are drawn per rank). Checkpoints beyond --save-total-limit are deleted, never the best.

    The bounds: measured, the losses agree to 8.8e-8 (relative) and the weights to 5.3e-6 (absolute, lr 1e-3);
    one row skipped at the resume (the sampler's position one row on, tried) moves them by 0.074 and 8.1e-3. So
    1e-5 and 5e-5: about 10x what summation order costs, and over 100x below what a skipped row does. (The
    checkpoint is mid-epoch: at an epoch boundary, a wrong position would not show.)
    """
    reference = reference_run(tiny_bundle, tmp_path / "reference", save_steps=3)
    out = tmp_path / "one_process"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    result = check(forked_python_m("ftloop.train", flags(
        tiny_bundle, out, "--gradient-accumulation-steps", "4", "--resume-from-checkpoint", "auto",
        "--save-steps", "1", "--save-total-limit", "2")))
    assert "resumed from" in result.stdout and "at step 3 (epoch 0, row 12)" in result.stdout
    expected, got = losses(reference), losses(out)
    assert sorted(got) == [4, 5, 6, 7, 8]
    loss_difference = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in got)
    ref_w, w = final_weights(reference), final_weights(out)
    weight_difference = max(float((ref_w[k] - w[k]).abs().max()) for k in ref_w)
    print(f"relative loss difference {loss_difference:.3g}, weight difference {weight_difference:.3g}")
    assert loss_difference < 1e-5 and weight_difference < 5e-5
    state = json.load(open(out / "checkpoint-7" / "trainer_state.json"))
    assert state["best_step"] == 4  # the eval at step 4 was the best so far: that checkpoint is protected
    assert sorted(os.listdir(out), key=str) == sorted([".ftloop", ".ftloop.lock", "best", "checkpoint-4", "checkpoint-6",
                                                       "checkpoint-7", "final", "metrics.jsonl"])


def test_sigkill_during_save_leaves_the_previous_checkpoint(dropout_bundle, reference, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-4", out / "checkpoint-4")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               FAULTY_TRAIN, "--fault-pause-after-shards-s", "3",  # both ranks linger after writing their shards
               *flags(dropout_bundle, out, "--save-steps", "2", "--resume-from-checkpoint", "auto")]
    saving = out / "checkpoint-6.tmp"
    proc = launch_and_wait(command, out, until=lambda: (saving / "rng" / "rank-1.pt").exists())
    os.kill(worker_pid(out, 1), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (out / "checkpoint-6").exists() and saving.exists() and not (saving / COMPLETE_MARKER).exists()
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-4")

    # A newer checkpoint, marked complete, with bytes changed in one of rank 1's shards: auto skips it, saying
    # why, after both ranks hashed their share of its files.
    damaged = out / "checkpoint-5"
    shutil.copytree(out / "checkpoint-4", damaged)
    flipped = damage(damaged, "flip")
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *flags(dropout_bundle, out, "--resume-from-checkpoint",
                                                                    "auto", "--save-steps", "0")]))
    assert f"removed {saving}" in result.stdout
    assert (f"--resume-from-checkpoint auto: skipped {damaged}: damaged: {flipped} is damaged (its SHA-256 differs"
            in result.stdout)
    assert f"resumed from {out}/checkpoint-4 at step 4" in result.stdout
    expected = {step: loss for step, loss in losses(reference).items() if step > 4}
    assert losses(out, once=False) == expected  # steps 5-6 logged before the kill, then redone alike


def checkpoint_tensors(path) -> dict:
    target = str(path) + ".pt"
    dcp_to_torch_save(str(path), target)
    state = torch.load(target, weights_only=False)
    return {f"{group}/{k}": v for group in ("model", "optimizer") for k, v in state[group].items()
            if torch.is_tensor(v)}


def test_nonfinite_steps_are_skipped_on_every_rank_then_the_run_stops(tiny_bundle, tmp_path):
    # The NaN is in rank 1's gradient shard only: rank 0 must skip the step too (its shard of the checkpoint
    # would change otherwise), since the decision is taken on the global gradient norm.
    out = tmp_path / "nan"
    result = forked_torchrun(2, [FAULTY_TRAIN, "--fault-nan-gradient-at-steps", "3,5,6",
                                 "--fault-nan-gradient-on-rank", "1",
                                 *flags(tiny_bundle, out, "--save-steps", "1", "--max-bad-steps", "2")])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "ftloop: error: 2 non-finite steps in a row (up to step 6)" in result.stderr
    # checkpoint-5 holds step 4's weights, from which steps 5 and 6 went wrong: it is not named
    assert f"last good checkpoint is {out}/checkpoint-4;" in result.stderr  # saved right after an applied update
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if r.get("skipped_nonfinite_step")] == [3, 5, 6]
    before, skipped, after = (checkpoint_tensors(out / f"checkpoint-{s}") for s in (2, 3, 4))
    assert before.keys() == skipped.keys()
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # no update, optimizer state untouched
    assert not torch.equal(skipped["optimizer/step"], after["optimizer/step"])  # step 4 trained again
    assert any(not torch.equal(skipped[k], after[k]) for k in skipped if k.startswith("model/"))


def test_an_unexpected_error_exits_1_with_its_traceback_and_no_abort(tiny_bundle, tmp_path):
    """A bug's way out: Python's traceback and exit 1 on every rank (through ftloop.train.cli, which leaves
    without the interpreter's teardown, where a gloo group still held can abort the process: GLOO_EXIT_ABORT)."""
    result = torchrun(2, [FAULTY_TRAIN, "--fault-raise-at-step", "2", *flags(tiny_bundle, tmp_path / "out")])
    assert result.returncode == 1 and "RuntimeError: fault injected at step 2" in result.stderr
    assert "SIGABRT" not in result.stderr and "exitcode  : 1 " in result.stderr, result.stderr[-3000:]


def resumable(bundle, out, checkpoint: str, *extra: str) -> dict:
    """ftloop.train's check of a checkpoint against the run, before any weights load (in this process)."""
    cfg = parse_args(flags(bundle, out, "--resume-from-checkpoint", checkpoint, *extra))
    data = cfg.data
    order = StepBatchSampler(16, 1, 0, 1, 1, cfg.train.seed, lengths=[1] * 16, mega_steps=data.length_group_steps,
                             group_by_length=data.group_by_length,
                             pack_tokens=data.sequence_tokens if data.packing else 0).order_settings()
    return check_resumable(checkpoint, load_config(cfg.model), order, cfg.to_dict())


def test_mismatched_checkpoints_are_refused(dropout_bundle, reference, tmp_path):
    out = tmp_path / "refused"
    checkpoint = str(reference / "checkpoint-4")
    result = forked_python_m("ftloop.train", flags(dropout_bundle, out, "--resume-from-checkpoint", checkpoint,
                                                   "--param-dtype", "bf16"))
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"ftloop: error: --resume-from-checkpoint {checkpoint}: parameters saved as float32, "
                            "this run configures bfloat16") and "--allow-dtype-change" in error

    result = check(forked_python_m("ftloop.train", flags(dropout_bundle, out, "--resume-from-checkpoint", checkpoint,
                                                         "--param-dtype", "bf16", "--allow-dtype-change",
                                                         "--max-steps", "5")))
    assert "at step 4" in result.stdout

    # The Kahan buffer of bf16 masters is optimizer state the fp32 checkpoint does not hold: said, even with
    # --allow-dtype-change, by the check that runs before any weights load (as the --seed case below shows).
    assert resumable(dropout_bundle, out, checkpoint)["step"] == 4  # the same run: accepted
    with pytest.raises(ConfigError) as refused:
        resumable(dropout_bundle, out, checkpoint, "--param-dtype", "bf16", "--bf16-master-rounding", "kahan",
                  "--allow-dtype-change")
    assert "saved without the Kahan buffer of --bf16-master-rounding kahan" in str(refused.value)
    assert "resume with --param-dtype fp32 --bf16-master-rounding stochastic" in str(refused.value)

    result = forked_python_m("ftloop.train", flags(dropout_bundle, out, "--resume-from-checkpoint", checkpoint,
                                                   "--seed", "1"))
    assert result.returncode == 2 and "the training rows or --seed changed" in result.stderr
    assert "Loading weights" not in result.stderr  # refused before the model is loaded

    other = tmp_path / "other-model"
    shutil.copytree(checkpoint, other)
    config = json.load(open(other / "hf" / "config.json"))
    config["text_config"]["num_hidden_layers"] += 1
    json.dump(config, open(other / "hf" / "config.json", "w"))
    with pytest.raises(ConfigError, match=r"written for another model \(text_config\.num_hidden_layers: "):
        resumable(dropout_bundle, out, str(other))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_row_that_fails_mid_run_is_named_by_its_rank(tiny_bundle, tmp_path, split):
    """An image deleted after the check passed: the rank that meets its row (in a training step or in an
    evaluation pass) names row and file, and all ranks exit 2 together instead of waiting for it."""
    bundle = dict(tiny_bundle, image_folder=str(tmp_path / "images"))
    shutil.copytree(tiny_bundle["image_folder"], bundle["image_folder"])
    data = tiny_bundle[f"{split}_json"]
    rows = json.load(open(data))
    row_number, row = next((i + 1, r) for i, r in enumerate(rows) if r.get("image"))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ftloop.train", *flags(bundle, out, "--max-steps", "40", "--save-steps", "0",
                                            "--eval-steps", "3")]
    proc = launch_and_wait(command, out, until=lambda: logged_steps(out) >= 1)
    os.remove(os.path.join(bundle["image_folder"], row["image"]))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("ftloop: error: ")]
    named = [line for line in errors if line.startswith("ftloop: error: [rank ")]
    assert len(named) == 1, stderr[-3000:]
    assert f"{data}: row {row_number}: image not found" in named[0]
    if not named[0].startswith("ftloop: error: [rank 0]"):  # rank 0 says where to look
        what = "a row" if split == "train" else "an eval row"
        pointer = f"{what} failed to load on 1 other rank(s), which name it; fix or remove it and resume"
        assert f"ftloop: error: {pointer}" in errors
    assert "Connection closed by peer" not in stderr  # every rank left together, none crashed


def largest_shard(path, rank: int) -> str:
    """The largest DCP file rank `rank` wrote into checkpoint `path` (the name in it)."""
    names = [name for name in os.listdir(path) if name.startswith(f"__{rank}_")]
    return max(names, key=lambda name: (os.path.getsize(os.path.join(path, name)), name))


def damage(path, how: str) -> str:
    """Damage checkpoint `path` as a bad disk, a full disk or a careless hand would; the file it touched."""
    def truncate(name: str) -> str:
        os.truncate(os.path.join(path, name), os.path.getsize(os.path.join(path, name)) // 2)
        return name

    if how == "flip":  # 64 bytes in the middle of rank 1's largest shard: weights that would load silently wrong
        name = largest_shard(path, 1)
        with open(os.path.join(path, name), "r+b") as f:
            f.seek(os.path.getsize(os.path.join(path, name)) // 2)
            data = f.read(64)
            f.seek(-len(data), os.SEEK_CUR)
            f.write(bytes(b ^ 0xFF for b in data))
        return name
    if how == "missing shard":
        name = largest_shard(path, 0)
        os.remove(os.path.join(path, name))
        return name
    if how == "missing sums":
        os.remove(os.path.join(path, SUMS_FILE))
        return SUMS_FILE
    return truncate({"truncated shard": largest_shard(path, 1), "truncated trainer state": "trainer_state.json",
                     "truncated metadata": ".metadata", "truncated rng": "rng/rank-1.pt",
                     "truncated sums": SUMS_FILE}[how])


DAMAGES = ["flip", "missing shard", "missing sums", "truncated shard", "truncated trainer state",
           "truncated metadata", "truncated rng", "truncated sums"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_is_one_line_naming_its_file(reference, tmp_path, how, capsys):
    """Each damage is found from the sums the save recorded, and is one line naming the file: for a resume from
    it, and for its export; `auto` takes the previous checkpoint instead, saying why (none whole: refused)."""
    out = tmp_path / "out"
    good, path = out / "checkpoint-4", out / "checkpoint-6"
    shutil.copytree(reference / "checkpoint-4", good)
    shutil.copytree(good, path)
    assert verify_checkpoint(str(path), World.single()) is None
    name = damage(path, how)
    problem = verify_checkpoint(str(path), World.single())
    assert problem is not None and name in problem, problem
    with pytest.raises(ConfigError, match=rf"^--resume-from-checkpoint {path}: damaged: .*{re.escape(name)}"):
        resolve_resume(str(path), str(out), World.single())
    with pytest.raises(ConfigError, match=rf"^{path}: damaged: .*{re.escape(name)}"):
        export_main([str(path), str(tmp_path / "export")])
    assert not (tmp_path / "export").exists()

    assert resolve_resume("auto", str(out), World.single()) == str(good)
    assert f"skipped {path}: damaged: " in capsys.readouterr().out
    shutil.rmtree(good)
    with pytest.raises(ConfigError, match=f"no checkpoint in {out} is whole"):
        resolve_resume("auto", str(out), World.single())


def test_the_sums_are_sha256sum_s(reference):
    """`sha256sum -c SHA256SUMS` checks a checkpoint by hand: every file of it is listed, but the list and the
    marker written after it."""
    path = reference / "checkpoint-4"
    result = subprocess.run(["sha256sum", "--check", "--strict", SUMS_FILE], cwd=path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {line.split("  ", 1)[1] for line in open(path / SUMS_FILE).read().splitlines()}
    on_disk = {os.path.relpath(os.path.join(root, name), path) for root, _, names in os.walk(path) for name in names}
    assert listed == on_disk - {SUMS_FILE, COMPLETE_MARKER}
