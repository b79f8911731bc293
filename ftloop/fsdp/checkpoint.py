"""Sharded training checkpoints that a crash cannot corrupt, and resuming from them.

`output_dir/checkpoint-<step>` holds, written with torch.distributed.checkpoint (DCP) by every rank from the
shards it holds, as they lie in memory:
  - `model`: each original parameter, flattened, as a ShardedTensor whose local shard is a view into this rank's
    flat parameter (ftloop.fsdp.internals computes every rank's slice, so building it sends nothing). Nothing is
    unsharded or gathered: a save costs DCP's few planning collectives whatever the model's size, and its memory is
    the one tensor DCP stages at a time (each tensor in its own file: see `write_rank_files`); a resume reads straight into the flat parameters. DCP reads
    any slice back, so a checkpoint resumes at another world size. (FSDP's SHARDED_STATE_DICT, used before,
    unsharded every unit in full precision, kept a clone of every local chunk, and sent one all_gather_object
    per parameter.)
  - `optimizer`: its state cut the same way (ftloop's Adafactor keys its state, factored statistics included,
    by original parameter name; AdamW's moments are cut like the parameters),
  - `parameters.json`: each parameter's shape (the tensors are saved flat; `python -m ftloop.export` reads it),
  - `rng/rank-<r>.pt`: python and torch (and CUDA) generator states of each rank,
  - `trainer_state.json`: step, scheduler, sampler position, tokens seen, best eval record, the dtypes the
    tensors were saved in, the world size,
  - `run_config.json`: the configuration of the run that wrote it,
  - `hf/`: the model config, tokenizer and image processor (enough for `python -m ftloop.export`).

Atomic: everything is written under `checkpoint-<step>.tmp`; when every rank has finished, rank 0 writes the
`.complete` marker last and puts the folder in place (ftloop.atomic.publish). A kill at any moment leaves the
previous checkpoints untouched and at most one interrupted save, which `recover_interrupted_saves` (run before
resuming) finishes when it was complete, and deletes when it was not; resume never picks a folder without the
marker.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ftloop.atomic import OLD, TMP, WRITE_ERRORS, publish, recover, temporary_folder, write_failure
from ftloop.checksums import SUMS_FILE, digests, problems, read_sums, write_sums
from ftloop.config import previous_run
from ftloop.distributed import World, agree, print0
from ftloop.errors import ConfigError, one_line
from ftloop.fsdp.internals import flat_shards, sharded_tensor

COMPLETE_MARKER = ".complete"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"
PARAMETERS = "parameters.json"
FORMAT = 2  # trainer_state.json's checkpoint_format: 2 = flat slices of each parameter (before: FSDP's state dict)
MODEL_FILES = "hf"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every finished checkpoint in output_dir, oldest first."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = CHECKPOINT_NAME.match(name)
            path = os.path.join(output_dir, name)
            if match and is_complete(path):
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def recover_interrupted_saves(output_dir: str) -> list[str]:
    """Finish or undo the saves a kill interrupted (rank 0, before training starts); one line for each.

    Each checkpoint's interrupted publish (ftloop.atomic.recover: a `.tmp` is published when it holds its marker,
    deleted when it does not; a `.old` comes back unless the new one is complete), then any `checkpoint-N` without
    its marker (it never finished) is deleted. The `best` and `final` exports likewise, where a `.tmp` is never
    known to be whole: the previous export comes back (an export is written again from a checkpoint)."""
    said = []
    if not os.path.isdir(output_dir):
        return said
    steps = {int(m.group(1)) for name in os.listdir(output_dir)
             if (m := re.fullmatch(rf"checkpoint-(\d+)(?:{re.escape(TMP)}|{re.escape(OLD)})?", name))}
    for step in sorted(steps):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        said += recover(path, is_complete)
        if os.path.isdir(path) and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            said.append(f"removed {path}: its save never finished")
    for export in ("best", "final"):
        said += recover(os.path.join(output_dir, export), lambda folder: not folder.endswith(TMP))
        for name in os.listdir(output_dir):  # any other temporary of it (another tool's, an older ftloop's)
            if name.startswith(export + TMP):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                said.append(f"removed {os.path.join(output_dir, name)}: an export that never finished")
    return said


def prune_checkpoints(output_dir: str, keep: int, protected_step: int | None) -> list[str]:
    """Delete all but the newest `keep` checkpoints, never the one written at `protected_step` (the best)."""
    found = complete_checkpoints(output_dir)
    doomed = [path for step, path in found[:-keep] if step != protected_step] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _dtypes(state) -> list[str]:
    """The floating dtypes found anywhere in a (nested) state dict."""
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return sorted({dtype for value in state for dtype in _dtypes(value)})
    return [str(state.dtype).removeprefix("torch.")] if torch.is_tensor(state) and state.is_floating_point() else []


def _model_state(model: FSDP) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """({name: this rank's slice of the flattened parameter, a view into its flat parameter}, {name: shape}).
    Sharded slices are ShardedTensors (built without a collective); unsharded ones (one rank, NO_SHARD) the whole
    flattened parameter, which DCP writes once."""
    state, shapes = {}, {}
    for shard in flat_shards(model):
        data = shard.flat.detach()
        for piece in shard.slices:
            local = data[piece.offset:piece.offset + piece.numel]
            state[piece.name] = local if shard.group is None else sharded_tensor(
                local, math.prod(piece.shape), piece.pieces, shard.group)
            shapes[piece.name] = list(piece.shape)
    return state, shapes


ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq")


def _stepped(model: FSDP):
    """(a tensor the optimizer steps, [(original parameter's slice, where it starts in that tensor)], group) of
    every unit: its flat shard, or with use_orig_params each original parameter's 1-D slice."""
    for shard in flat_shards(model):
        if shard.originals is None:
            yield shard.flat, [(piece, piece.offset) for piece in shard.slices], shard.group
        else:
            for param, piece in zip(shard.originals, shard.slices):
                yield param, [(piece, 0)], shard.group


def _adamw_state(model: FSDP, optimizer, moments: dict | None = None) -> dict:
    """AdamW's moments cut like the parameters ({"<param>.exp_avg": slice, ..., "step"}), from its state or, for a
    load, from `moments` (zeroed buffers per stepped tensor, filled by DCP)."""
    out = {"step": torch.zeros(())}
    for tensor, pieces, group in _stepped(model):
        if not tensor.requires_grad:
            continue
        state = moments[tensor] if moments is not None else optimizer.state.get(tensor) or {}
        if "step" in state and not out["step"]:  # the same for every tensor: read once (a device sync on GPUs)
            out["step"] = state["step"].detach().float().cpu()
        for key in ADAMW_MOMENTS:
            whole = state[key] if key in state else torch.zeros_like(tensor)  # saved before any step
            for piece, offset in pieces:
                local = whole.detach().view(-1)[offset:offset + piece.numel]
                out[f"{piece.name}.{key}"] = local if group is None else sharded_tensor(
                    local, math.prod(piece.shape), piece.pieces, group)
    return out


def _load_adamw_state(optimizer, moments: dict, step: torch.Tensor) -> None:
    """Give AdamW the moments DCP filled, through its own load_state_dict (which puts `step` where the fused and
    capturable kernels want it)."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state = {index[id(tensor)]: {"step": step.clone(), **buffers} for tensor, buffers in moments.items()}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _optimizer_state(model: FSDP, optimizer, template: bool, moments: dict | None = None) -> dict:
    # ftloop's Adafactor knows its sharded form; AdamW's state is the shape of what it steps.
    if hasattr(optimizer, "sharded_state_dict"):
        return optimizer.sharded_state_template() if template else optimizer.sharded_state_dict()
    return _adamw_state(model, optimizer, moments)


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(model: FSDP, optimizer, path: str, trainer_state: dict, run_config: dict,
                    write_model_files: Callable[[str], None], world: World) -> None:
    """Write checkpoint `path` atomically. Collective: every rank calls it. `write_model_files(folder)` writes
    the config, tokenizer and image processor on rank 0.

    A write that fails on any rank (a full disk, a folder made read-only) is one ConfigError line on every rank
    (ftloop.atomic.write_failure: the folder, the free bytes, the last checkpoint that is whole), and the
    temporary folder is removed: nothing half-written is left, and no rank waits for another that stopped."""
    tmp = path + TMP
    kept = latest_checkpoint(os.path.dirname(path))

    def written(attempt: Callable[[], object]) -> Callable[[], object]:
        def run():
            try:
                return attempt()
            except CheckpointException as err:  # DCP's, on every rank: what failed on the first rank it names
                failed = next(iter(err.failures.values()), (err, None))[0]
                raise ConfigError(write_failure(path, failed, kept)) from None
            except WRITE_ERRORS as err:
                raise ConfigError(write_failure(path, err, kept)) from None
        return run

    def finish(rank_sums: list[dict[str, str]], dtypes: dict, shapes: dict) -> None:  # rank 0
        record = dict(trainer_state, dtypes=dtypes, world_size=world.world_size, checkpoint_format=FORMAT)
        for name, value in ((TRAINER_STATE, record), (PARAMETERS, shapes), (RUN_CONFIG, run_config)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(value, f, indent=None if name == PARAMETERS else 1)
        write_model_files(os.path.join(tmp, MODEL_FILES))
        sums = {name: value for own in rank_sums for name, value in own.items()}
        sums.update(digests(tmp, _files_of_rank_zero(tmp)))
        write_sums(tmp, sums)
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:  # last: the folder is whole
            f.write(f"{trainer_state.get('step')}\n")
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)

    try:
        agree(world, written(lambda: os.makedirs(os.path.join(temporary_folder(path), "rng"))), "rank 0")
        dtypes, shapes = agree(world, written(lambda: write_rank_files(model, optimizer, tmp, world.rank)))
        # Each rank hashes the files it wrote (still in its page cache), side by side; rank 0 records them all.
        rank_sums = agree(world, written(lambda: digests(tmp, _files_of_rank(tmp, world.rank))), gather=True)
        agree(world, written(lambda: finish(rank_sums, dtypes, shapes)), "rank 0")
    except ConfigError:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files_of_rank(folder: str, rank: int) -> list[str]:
    """The files rank `rank` wrote into a checkpoint folder: its DCP files (`__<rank>_<n>.distcp`) and its
    generators."""
    prefix = f"__{rank}_"
    return [name for name in sorted(os.listdir(folder)) if name.startswith(prefix)] + [f"rng/rank-{rank}.pt"]


def _files_of_rank_zero(folder: str) -> list[str]:
    """The files of a checkpoint that no rank hashed as its own: DCP's `.metadata` and what rank 0 writes last."""
    own = re.compile(r"^(__\d+_\d+\.distcp|rng/rank-\d+\.pt)$")
    found = [os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names]
    return sorted(name for name in found if not own.match(name) and name not in (SUMS_FILE, COMPLETE_MARKER))


def verify_checkpoint(path: str, world: World) -> str | None:
    """What is wrong with checkpoint `path` (a missing, truncated or changed file, against the SHA-256 sums its
    save recorded), or None. Collective: every rank hashes a share of the files, the largest first, and every rank
    gets the same answer."""
    def listed() -> dict[str, str] | str:
        try:
            return read_sums(path)
        except FileNotFoundError:
            return f"it has no {SUMS_FILE} (the sums of its files, recorded when its save completes)"
        except (OSError, ValueError) as err:
            return f"{err}"

    sums = agree(world, listed, "rank 0", share=True)
    if isinstance(sums, str):
        return sums
    sizes = {name: os.path.getsize(os.path.join(path, name)) if os.path.isfile(os.path.join(path, name)) else 0
             for name in sums}
    loads, mine = [0] * world.world_size, {}
    for name in sorted(sums, key=lambda n: (-sizes[n], n)):  # the same share on every rank: largest to the idlest
        rank = loads.index(min(loads))
        loads[rank] += sizes[name] + 1
        if rank == world.rank:
            mine[name] = sums[name]
    found = agree(world, lambda: problems(path, mine), gather=True)
    found = sorted(problem for rank_problems in found for problem in rank_problems)
    if not found:
        return None
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{found[0]}{more}"


def write_rank_files(model: FSDP, optimizer, folder: str, rank: int) -> tuple[dict[str, list[str]], dict]:
    """This rank's part of a checkpoint: its model and optimizer shards (DCP, collective) and its generators;
    returns the dtypes they were saved in and the parameters' shapes."""
    parameters, shapes = _model_state(model)
    state = {"model": parameters, "optimizer": _optimizer_state(model, optimizer, template=False)}
    # A file per tensor: torch 2.13's writer keeps every tensor of a file alive until the file is written (and copies
    # each view of a flat parameter first), so one file per rank would hold a second copy of the rank's shard.
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, single_file_per_rank=False))
    torch.save(_rng_state(next(model.parameters()).device), os.path.join(folder, "rng", f"rank-{rank}.pt"))
    return {"parameters": _dtypes(state["model"]), "optimizer_state": _dtypes(state["optimizer"])}, shapes


def read_trainer_state(path: str) -> dict:
    if not is_complete(path):
        raise ConfigError(f"--resume-from-checkpoint {path}: not a complete checkpoint (no {COMPLETE_MARKER} "
                          "marker: its save never finished); use an earlier one, or `auto`")
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume-from-checkpoint {path}: cannot read its {TRAINER_STATE} ({one_line(err)}); "
                          "resume from an earlier checkpoint, or `auto`") from None
    if state.get("checkpoint_format") != FORMAT:
        raise ConfigError(f"--resume-from-checkpoint {path}: written by an earlier ftloop, whose checkpoint layout "
                          "(FSDP's sharded state dict) this one does not read; finish that run, or export it with "
                          "`python -m ftloop.export`, using the ftloop that wrote it")
    return state


IGNORED_CONFIG_KEYS = {"transformers_version", "_name_or_path", "use_cache", "dtype", "torch_dtype",
                       "architectures", "auto_map", "output_attentions", "output_hidden_states", "return_dict"}


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if key in IGNORED_CONFIG_KEYS:
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_model_config(path: str, hf_config) -> None:
    """Refuse a checkpoint of another model: its saved config must match the one being trained."""
    with open(os.path.join(path, MODEL_FILES, "config.json")) as f:
        saved = _flatten(json.load(f))
    current = _flatten(json.loads(hf_config.to_json_string()))
    differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)} saved, {current.get(k)} now" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(f"--resume-from-checkpoint {path}: it was written for another model ({shown}{more}); "
                          "resume with the --model-name-or-path it was trained from")


def _kahan_buffer(run_config: dict) -> bool:
    """Whether the optimizer state holds --bf16-master-rounding kahan's compensation buffer."""
    optim, model = run_config["optim"], run_config["model"]
    return (optim["optim"] == "adafactor" and model["param_dtype"] == "bf16"
            and optim.get("bf16_master_rounding") == "kahan")


def check_resumable(path: str, hf_config, order_settings: dict, run_config: dict) -> dict:
    """The trainer state of checkpoint `path`, after checking it was written for this model and these rows
    (the data order continues from a position, which only means something for the same rows, seed and
    `order_settings` of the sampler) and with the optimizer state this run's `run_config` keeps."""
    saved = read_trainer_state(path)
    with open(os.path.join(path, RUN_CONFIG)) as f:
        then = json.load(f)
    kahan_then = _kahan_buffer(then)
    if kahan_then != _kahan_buffer(run_config):
        rounding = then["optim"].get("bf16_master_rounding", "nearest")
        raise ConfigError(f"--resume-from-checkpoint {path}: its optimizer state was saved "
                          f"{'with' if kahan_then else 'without'} the Kahan buffer of --bf16-master-rounding kahan, "
                          f"and this run {'keeps none' if kahan_then else 'keeps one'}; resume with --param-dtype "
                          f"{then['model']['param_dtype']} --bf16-master-rounding {rounding}, as it was saved")
    _check_lora(path, then.get("lora", {}), run_config.get("lora", {}))
    check_model_config(path, hf_config)
    sampler = saved["sampler"]
    if sampler["num_rows"] != order_settings["num_rows"] or sampler["seed"] != order_settings["seed"]:
        raise ConfigError(f"--resume-from-checkpoint {path}: the training rows or --seed changed "
                          f"({sampler['num_rows']} rows and seed {sampler['seed']} then, {order_settings['num_rows']} "
                          f"and {order_settings['seed']} now), so the data order cannot continue; resume with the same "
                          "data and seed, or start afresh")
    if any(k not in sampler for k in order_settings):
        raise ConfigError(f"--resume-from-checkpoint {path}: written by an earlier ftloop, whose order of rows this "
                          "one cannot continue; finish that run with the ftloop that started it, or start afresh")
    then_order = {k: sampler[k] for k in order_settings}
    batching = [k for k in order_settings if k != "lengths"]
    if all(then_order[k] == order_settings[k] for k in batching) and then_order["lengths"] != order_settings["lengths"]:
        raise ConfigError(f"--resume-from-checkpoint {path}: the rows' token lengths changed (other --max-pixels, "
                          "--system-prompt, --max-seq-length, tokenizer or data?), and with packing or "
                          "--length-group-steps they decide which rows share a step; resume with the inputs it was "
                          "saved with, or start afresh")
    if then_order != order_settings:

        def said(o: dict) -> str:
            return (f"--group-by-length {o['grouped']}, --length-group-steps {o['length_group_steps']}, "
                    f"packed sequences of {o['pack_tokens'] or 'no'} tokens")
        raise ConfigError(f"--resume-from-checkpoint {path}: the batching changed ({said(then_order)} then; "
                          f"{said(order_settings)} now), so the data order cannot continue; resume with the flags "
                          "it was saved with, or start afresh")
    return saved


def _check_lora(path: str, then: dict, now: dict) -> None:
    """The adapters a checkpoint holds are the ones this run trains: the same rank and targets (else its tensors
    do not fit), alpha and dropout (else the resumed run would not continue the saved one). --merge-lora only
    shapes the export."""
    def said(lora: dict) -> str:
        if not lora.get("lora_rank"):
            return "no LoRA"
        flags = []
        for key, value in lora.items():
            if key != "merge_lora":
                value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                flags.append(f"--{key.replace('_', '-')} {value}")
        return " ".join(flags)

    if said(then) != said(now):
        raise ConfigError(f"--resume-from-checkpoint {path}: it was saved with {said(then)}, this run has "
                          f"{said(now)}; resume with the LoRA flags it was saved with")


def _check_dtypes(path: str, saved: dict, live: dict, allow: bool) -> None:
    differ = [f"{what} saved as {'/'.join(saved[what])}, this run configures {'/'.join(live[what])}"
              for what in ("parameters", "optimizer_state") if saved.get(what) != live[what]]
    if differ and not allow:
        raise ConfigError(f"--resume-from-checkpoint {path}: " + "; ".join(differ) +
                          " (--param-dtype); set them back, or pass --allow-dtype-change to cast on load")


def load_checkpoint(model: FSDP, optimizer, path: str, saved_state: dict, allow_dtype_change: bool,
                    world: World) -> None:
    """Load model and optimizer shards (resharded to this world size) and this rank's RNG. Collective. The
    parameters are read straight into the flat parameters' views; nothing else of their size is made."""
    moments = None if hasattr(optimizer, "sharded_state_dict") else {
        tensor: {key: torch.zeros_like(tensor) for key in ADAMW_MOMENTS}
        for tensor, _, _ in _stepped(model) if tensor.requires_grad}
    state = {"model": _model_state(model)[0], "optimizer": _optimizer_state(model, optimizer, True, moments)}
    live = {"parameters": _dtypes(state["model"]), "optimizer_state": _dtypes(state["optimizer"])}
    _check_dtypes(path, saved_state["dtypes"], live, allow_dtype_change)
    dcp.load(state, checkpoint_id=path)
    if moments is None:
        optimizer.load_sharded_state_dict(state["optimizer"])
    else:
        _load_adamw_state(optimizer, moments, state["optimizer"]["step"])
    # At another world size, rank r continues the generator of saved rank r mod W (the streams of dropout
    # masks cannot be resharded; only the same world size resumes bit for bit).
    rng = torch.load(os.path.join(path, "rng", f"rank-{world.rank % saved_state['world_size']}.pt"),
                     weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if world.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], world.device)


def clear_previous_run(output_dir: str) -> list[str]:
    """Delete what an earlier run left in `output_dir` (checkpoints, `best`, `final`, metrics.jsonl); the
    paths deleted. Anything else in the folder stays."""
    removed = []
    for name in previous_run(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(path)
    return removed


def resolve_resume(flag: str, output_dir: str, world: World, overwrite: bool = False) -> str | None:
    """The checkpoint --resume-from-checkpoint names (`auto`: the newest complete one, or None). Collective.
    `overwrite` (--overwrite-output-dir) on a fresh start: an earlier run's outputs are deleted first."""
    if world.is_main and overwrite and not flag:
        for path in clear_previous_run(output_dir):
            print0(f"removed {path}: --overwrite-output-dir")
    if world.is_main:  # an interrupted save is finished when it was complete, else cleared: never resumed from
        for line in recover_interrupted_saves(output_dir):
            print0(line)
    if world.world_size > 1:
        dist.barrier()
    if flag != "auto":
        if flag:
            problem = verify_checkpoint(flag, world) if is_complete(flag) else None  # incomplete: said by the check
            if problem:
                raise ConfigError(f"--resume-from-checkpoint {flag}: damaged: {problem}; resume from an earlier "
                                  "checkpoint, or `auto` (the newest one that is whole)")
        return flag or None
    found = complete_checkpoints(output_dir)
    for _, path in reversed(found):
        problem = verify_checkpoint(path, world)
        if not problem:
            print0(f"--resume-from-checkpoint auto: {path}")
            return path
        print0(f"--resume-from-checkpoint auto: skipped {path}: damaged: {problem}")
    if found:
        raise ConfigError(f"--resume-from-checkpoint auto: no checkpoint in {output_dir} is whole (each said above); "
                          "restore one from a copy, or start afresh with --overwrite-output-dir")
    print0(f"--resume-from-checkpoint auto: no checkpoint in {output_dir}, starting afresh")
    return None
